"""chunkem from Python: a phantom, its half maps as lazy zarr Volumes, FSC,
postprocess, local resolution and a model map — all on the default threads.

Run:  python examples/python_api.py [OUTDIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import chunkem
from chunkem.phantoms import make_phantom


def main(outdir: Path) -> None:
    outdir.mkdir(parents=True, exist_ok=True)
    ph = make_phantom(seed=1)                        # numpy-backed Volumes + the model
    for name in ("half1", "half2", "mask"):
        chunkem.save(getattr(ph, name), outdir / f"{name}.zarr", chunks=32)
    h1, h2, mask = (chunkem.open_map(outdir / f"{n}.zarr") for n in ("half1", "half2", "mask"))
    print("lazy:", type(h1.data).__name__, h1.data.chunksize, h1.attrs["voxel_size"], "Å")

    res = chunkem.fsc(h1, h2, mask=mask)             # FSCResult
    print(f"FSC 0.143: {res.resolution_0143:.2f} Å (phantom tuned to {ph.params['fsc_resolution']} Å unmasked)")

    pp = chunkem.postprocess(h1, h2, mask=mask)      # B in RELION sign (negative sharpens)
    chunkem.save(pp.map, outdir / "postprocess.mrc")
    print(f"Guinier B: {pp.bfactor:.1f} Å² (RELION sign)")

    lr = chunkem.local_resolution(h1, h2, mask=mask)  # fast local FSC
    print(f"local resolution median {lr.median:.2f} Å")

    mm = chunkem.model_map(ph.model, like=h1, resolution=3.5)
    chunkem.save(mm, outdir / "modelmap.mrc")
    print("wrote", sorted(p.name for p in outdir.iterdir()))


if __name__ == "__main__":  # guard needed when a LocalCluster spawns workers
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "chunkem-example"))
