#!/usr/bin/env python
"""LocScale and FDR: chunkem side by side with locscale (and emmer) on the same phantom.

Test case: the chunkem phantom (gemmi-rendered poly-Ala model, B rising 20 → 120 Å²
along x, two noisy halves averaged) at 1 Å/voxel, its model map at 3.2 Å rendered
from the model with its own B, and the phantom's mask binarised at 0.5 (so that
locscale, which binarises at 0.99, scales the same voxels). Built once per size and
cached under ``$CHUNKEM_BENCH_CACHE`` (default ``/tmp/chunkem-bench/locscale``).

Every run is its own process timed by ``/usr/bin/time -v`` (whole-process wall time
and peak RSS, Python start-up included):

* ``chunkem locscale full.mrc OUT --model-map modelmap.mrc --mask mask.mrc
  --resolution 3.2 --mode {fast,exact,locscale2} --cluster threads``;
* ``chunkem fdr full.mrc OUT``;
* with ``--locscale-venv DIR`` (a venv holding ``locscale`` 2.3.1, see
  ``../shared/design/PEERS.md``: it needs gfortran and pulls TensorFlow, so it is never
  a chunkem dependency): ``locscale -em full.mrc -mm modelmap.mrc -ma mask.mrc -res 3.2
  -np 2 -o ls_out.mrc``, and the RSCC (inside the mask) between its output and
  each chunkem mode;
* with ``--emmer-venv DIR``: emmer's ``compute_confidence_map`` (window 20) on the same map
  at every size, compared with ``chunkem fdr --noise-box 20`` (mask Dice, voxels whose
  1 % decision differs).

Sizes beyond the first run chunkem and emmer only (``--sizes 128 256 400``; locscale at 128³).

Usage::

    python benchmarks/locscale_bench.py                                    # chunkem only, 128³
    python benchmarks/locscale_bench.py --locscale-venv ~/venvs/locscale   # + locscale at 128³
    python benchmarks/locscale_bench.py --sizes 128 256 400 --modes fast exact

Prints one table and writes it as TSV in the cache folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import PY, bench_cache, timed  # noqa: E402

RES = 3.2


def _cache() -> Path:
    return bench_cache("locscale")


def build_case(size: int) -> Path:
    """Phantom, model map and binary mask of edge ``size`` at 1 Å (cached)."""
    d = _cache() / f"case{size}"
    if (d / "done").exists():
        return d
    from chunkem.io import save
    from chunkem.ops.modelmap import model_map
    from chunkem.phantoms import make_phantom
    from chunkem.volume import like

    d.mkdir(parents=True, exist_ok=True)
    n_res = int(1100 * (size / 128) ** 3 * 0.8) if size > 128 else 1100
    t = time.perf_counter()
    ph = make_phantom(n_residues=n_res, box=size, voxel_size=1.0, resolution=RES, seed=0)
    full = like(ph.half1, (np.asarray(ph.half1.values) + np.asarray(ph.half2.values)) / 2, name="full")
    save(full, d / "full.mrc")
    save(model_map(ph.model, resolution=RES, like=full), d / "modelmap.mrc")
    save(like(ph.mask, (np.asarray(ph.mask.values) > 0.5).astype(np.float32), name="mask"), d / "mask.mrc")
    save(ph.truth, d / "truth.mrc")
    (d / "done").write_text(json.dumps({"n_residues": n_res, "build_s": time.perf_counter() - t}))
    return d


def rscc_in_mask(a: Path, b: Path, mask: Path) -> float:
    import mrcfile

    with mrcfile.open(a, permissive=True) as fa, mrcfile.open(b, permissive=True) as fb, \
            mrcfile.open(mask, permissive=True) as fm:
        m = np.asarray(fm.data) > 0.5
        x = np.asarray(fa.data, dtype=np.float64)[m]
        y = np.asarray(fb.data, dtype=np.float64)[m]
    x -= x.mean()
    y -= y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def fdr_agreement(chunkem_conf: Path, emmer_npy: Path) -> dict:
    """Agreement of two confidence maps: voxels whose 1 %-FDR decision differs, and the masks' Dice."""
    import mrcfile

    with mrcfile.open(chunkem_conf, permissive=True) as f:
        a = np.asarray(f.data, dtype=np.float64)
    b = np.load(emmer_npy).astype(np.float64)
    if b.shape != a.shape:
        return {"fdr_note": f"emmer map shape {b.shape} != {a.shape}"}
    ma, mb = a >= 0.99, b >= 0.99
    return {"mask_disagree_frac": float(np.mean(ma != mb)),
            "mask_dice": float(2 * np.sum(ma & mb) / max(1, ma.sum() + mb.sum()))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128])
    ap.add_argument("--modes", nargs="+", default=["fast", "exact", "locscale2"])
    ap.add_argument("--locscale-venv", default=os.environ.get("LOCSCALE_VENV"))
    ap.add_argument("--emmer-venv", default=os.environ.get("EMMER_VENV"))
    ap.add_argument("--np", type=int, default=2, help="locscale processes (-np)")
    ap.add_argument("--threads", type=int, default=2, help="chunkem threads")
    args = ap.parse_args()

    rows = []
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for i, size in enumerate(args.sizes):
        d = build_case(size)
        print(f"case {size}³ in {d}", flush=True)
        peer = i == 0
        ls_out = d / "ls_out.mrc"
        if peer and args.locscale_venv:
            exe = Path(args.locscale_venv) / "bin" / "locscale"
            r = timed([str(exe), "-em", "full.mrc", "-mm", "modelmap.mrc", "-ma", "mask.mrc", "-res", str(RES),
                       "-np", str(args.np), "-o", "ls_out.mrc", "-op", "ls_proc", "-v"], d, d / "locscale.log", env)
            rows.append({"size": size, "tool": "locscale 2.3", "mode": f"model map, -np {args.np}", **r,
                         "rscc_vs_locscale": 1.0 if r["rc"] == 0 else float("nan")})
            print(rows[-1], flush=True)
        for mode in args.modes:
            out = d / f"chunkem_{mode}.mrc"
            cmd = [PY, "-m", "chunkem.cli.main", "locscale", "full.mrc", out.name, "--model-map", "modelmap.mrc",
                   "--mask", "mask.mrc", "--resolution", str(RES), "--mode", mode, "--cluster", "threads",
                   "--threads-per-worker", str(args.threads), "--no-progress"]
            r = timed(cmd, d, d / f"chunkem_{mode}.log", env)
            row = {"size": size, "tool": "chunkem locscale", "mode": mode, **r}
            if peer and ls_out.exists() and r["rc"] == 0:
                row["rscc_vs_locscale"] = rscc_in_mask(out, ls_out, d / "mask.mrc")
            if r["rc"] == 0:
                row["rscc_vs_truth"] = rscc_in_mask(out, d / "truth.mrc", d / "mask.mrc")
            rows.append(row)
            print(row, flush=True)
        box = 20  # the same noise-box edge for both tools (emmer's window_size)
        r = timed([PY, "-m", "chunkem.cli.main", "fdr", "full.mrc", "chunkem_conf.mrc", "--noise-box", str(box),
                   "--cluster", "threads", "--no-progress"], d, d / "chunkem_fdr.log", env)
        rows.append({"size": size, "tool": "chunkem fdr", "mode": f"BY 1%, box {box}", **r})
        print(rows[-1], flush=True)
        if args.emmer_venv:  # emmer's FDR is quick: at every size (its cost grows with the sort of all voxels)
            code = ("import mrcfile, numpy as np;"
                    "from emmer.ndimage.mask.compute_confidence_map import compute_confidence_map;"
                    "m=mrcfile.open('full.mrc').data;"
                    f"c=compute_confidence_map(m,1.0,{box});"
                    "np.save('emmer_conf.npy', np.asarray(c[0] if isinstance(c, tuple) else c))")
            r = timed([str(Path(args.emmer_venv) / "bin" / "python"), "-c", code], d, d / "emmer_fdr.log", env)
            row = {"size": size, "tool": "emmer fdr", "mode": f"BY 1%, window {box}", **r}
            if r["rc"] == 0 and (d / "chunkem_conf.mrc").exists():
                row.update(fdr_agreement(d / "chunkem_conf.mrc", d / "emmer_conf.npy"))
            rows.append(row)
            print(rows[-1], flush=True)

    cols = ["size", "tool", "mode", "rc", "wall_s", "rss_mb", "tree_mb", "rscc_vs_locscale", "rscc_vs_truth",
            "mask_dice", "mask_disagree_frac"]
    lines = ["\t".join(cols)]
    for r in rows:
        lines.append("\t".join(f"{r.get(c, ''):.3f}" if isinstance(r.get(c), float) else str(r.get(c, ""))
                               for c in cols))
    table = "\n".join(lines)
    print(table)
    (_cache() / "results.tsv").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
