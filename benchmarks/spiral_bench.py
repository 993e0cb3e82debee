#!/usr/bin/env python
"""Spiral-phase family (LocBFactor, LocSpiral, LocOccupancy): whole-map time and peak memory.

Test maps: the chunkem phantom (gemmi-rendered poly-Ala model with a B
gradient, two noisy halves averaged) at 1 Å/voxel, built once per size and
cached as ``.npy`` under the cache folder. Each run is its own process
(``python spiral_bench.py --child ...``): it memory-maps the cached map and
mask, wraps them as dask-backed Volumes (128³ chunks), runs the op on the
threaded scheduler with ``--threads`` threads and computes its output maps.
Reported: wall time of the op (graph build + compute), the process's peak
RSS, its RSS before the op (the inputs) and the difference, so that the
memory growth with the number of bands can be read directly (the band
bank streams band by band: it should not grow).

The paper (Kaur et al. 2021) reports 12 minutes for a 400³ map on a 4-core
laptop (MATLAB); the issue's goal is under 1 minute on 2 cores.

Measured 2026-11-22 on the 2-core dev VM, quiet (load 1.0-2.0), after the
band-limited windows (each band's four inverse FFTs run on the window
``|k| <= centre + 6.4 sigma`` of its spectrum: pruned z and y passes)::

    op          size  bands  inverse FFTs  wall s  build s  inputs MB  peak - inputs MB  load before/after
    locbfactor  256³  10     40            10.9    0.5      401        790               1.1/1.0
    locbfactor  256³  30     120           31.1    1.8      401        921               1.0/1.2
    locbfactor  400³  10     40            42.2    1.0      1122       2463              1.2/1.6
    locbfactor  400³  30     120           114.4   1.6      1121       2445              1.6/2.0

Goal (< 1 min at 400³ on 2 cores) met for 10 bands (42.2 s; 67.3 s before the
windows, quiet); 30 bands take 114 s. Back to back at load ~4, 400³ x 10
bands: 131 -> 81 s wall, 125 -> 75 CPU-s with vs without the windows, local B
maps equal to 0.008 Å². What remains per band at 400³: the x pass of each
inverse (every output line, ~0.2 s), the per-voxel log/fit updates and the
noise quantile. Memory does not grow with the band count.

Usage::

    python benchmarks/spiral_bench.py                              # 256 400 × 10 30 bands, locbfactor
    python benchmarks/spiral_bench.py --sizes 256 --bands 10 20 30 --ops locbfactor locspiral
    python benchmarks/spiral_bench.py --quadrature eco             # the reference's cheaper quadrature
    CHUNKEM_BENCH_CACHE=/scratch/bench python benchmarks/spiral_bench.py

Prints one table and writes it as TSV in the cache folder.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import bench_cache  # noqa: E402

HERE = Path(__file__).resolve().parent
PY = sys.executable
RANGES = {"locbfactor": (15.0, 3.5), "locspiral": (25.0, 3.5), "lococcupancy": (25.0, 10.0)}


def _cache() -> Path:
    return bench_cache("spiral")


def _phantom(size: int) -> tuple[Path, Path]:
    d = _cache()
    mp, kp = d / f"map{size}.npy", d / f"mask{size}.npy"
    if not (mp.exists() and kp.exists()):
        from chunkem.phantoms import make_phantom

        t = time.perf_counter()
        n_res = int(120 * (size / 64) ** 1.5) if size <= 128 else 1200
        ph = make_phantom(box=size, voxel_size=1.0, n_residues=n_res, resolution=3.0, b_range=(20, 120), seed=0)
        avg = ((ph.half1.values + ph.half2.values) / 2).astype(np.float32)
        np.save(mp, avg)
        np.save(kp, ph.mask.values.astype(np.float32))
        print(f"phantom {size}³: {len(ph.model)} atoms, built in {time.perf_counter() - t:.0f} s -> {d}", flush=True)
    return mp, kp


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _child(args: argparse.Namespace) -> None:
    import dask

    from chunkem.ops import spiral as S
    from chunkem.volume import make_volume

    arr = np.load(args.map, mmap_mode="r")
    msk = np.load(args.mask, mmap_mode="r")
    import dask.array as da

    vol = make_volume(da.from_array(arr, chunks=128), voxel_size=1.0)
    mask = make_volume(da.from_array(msk, chunks=128), voxel_size=1.0)
    peak = [_rss()]
    base = peak[0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.02)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    kw = dict(mask=mask, resolution_range=RANGES[args.op], n_bands=args.bands, quadrature=args.quadrature)
    with dask.config.set(scheduler="threads", num_workers=args.threads):
        if args.op == "locbfactor":
            r = S.locbfactor(vol, **kw)
            outs = [r.b_factor.data, r.intercept.data, r.quality.data]
        elif args.op == "locspiral":
            r = S.locspiral(vol, **kw)
            outs = [r.map.data, r.quality.data]
        else:
            r = S.lococcupancy(vol, **kw)
            outs = [r.occupancy.data]
        t_build = time.perf_counter() - t0
        res = dask.compute(*outs)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    peak[0] = max(peak[0], _rss())
    import resource

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"wall_s": wall, "build_s": t_build, "base_rss": base, "peak_rss": max(peak[0], maxrss),
                      "check": float(np.nanmean(res[0]))}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 400])
    p.add_argument("--bands", nargs="+", type=int, default=[10, 30])
    p.add_argument("--ops", nargs="+", default=["locbfactor"], choices=sorted(RANGES))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quadrature", choices=["riesz", "eco"], default="riesz")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--map", help=argparse.SUPPRESS)
    p.add_argument("--mask", help=argparse.SUPPRESS)
    p.add_argument("--op", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        args.bands = args.bands[0]
        _child(args)
        return
    rows = []
    header = ("op", "size", "bands", "quadrature", "inverse FFTs", "wall s", "build s", "inputs MB", "peak MB",
              "peak - inputs MB", "load 1-min before/after")
    for size in args.sizes:
        mp, kp = _phantom(size)
        for op in args.ops:
            for nb in args.bands:
                env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                cmd = [PY, str(Path(__file__).resolve()), "--child", "--map", str(mp), "--mask", str(kp), "--op", op,
                       "--bands", str(nb), "--threads", str(args.threads), "--quadrature", args.quadrature]
                load0 = os.getloadavg()[0]
                out = subprocess.run(cmd, capture_output=True, text=True, env=env)
                load1 = os.getloadavg()[0]
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{op} {size}³ {nb} bands failed")
                r = json.loads(out.stdout.strip().splitlines()[-1])
                n_inv = nb * (4 if args.quadrature == "riesz" else 3)
                row = (op, f"{size}³", nb, args.quadrature, n_inv, f"{r['wall_s']:.1f}", f"{r['build_s']:.1f}",
                       f"{r['base_rss'] / 2**20:.0f}", f"{r['peak_rss'] / 2**20:.0f}",
                       f"{(r['peak_rss'] - r['base_rss']) / 2**20:.0f}", f"{load0:.1f}/{load1:.1f}")
                rows.append(row)
                print("  ".join(str(c) for c in row), flush=True)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    print()
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    tsv = _cache() / "spiral_bench.tsv"
    tsv.write_text("\t".join(header) + "\n" + "\n".join("\t".join(str(c) for c in r) for r in rows) + "\n")
    print(f"\n{os.cpu_count()} CPUs visible, {args.threads} threads; table also in {tsv}")


if __name__ == "__main__":
    main()
