"""chunkem inside your own dask session: make a Client (local, SLURM or an
address) and chunkem computes on it; nothing in chunkem closes it.

Run:  python examples/dask_session.py [tcp://scheduler:8786]
"""

from __future__ import annotations

import sys

from distributed import Client, LocalCluster

import chunkem
from chunkem.ops.filter import lowpass
from chunkem.phantoms import make_phantom


def main(address: str | None) -> None:
    client = Client(address) if address else Client(LocalCluster(n_workers=2, threads_per_worker=1))
    with client:
        ph = make_phantom(seed=2)
        h1, h2 = ph.half1.chunk(32), ph.half2.chunk(32)   # 8 chunks each
        res = chunkem.fsc(h1, h2)                         # runs on the client's workers
        low = lowpass(h1, resolution=6.0)   # lazy
        print(f"FSC 0.143 = {res.resolution_0143:.2f} Å on {len(client.scheduler_info()['workers'])} workers")
        print("low-passed mean:", float(low.mean().compute()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
