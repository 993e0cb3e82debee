"""Local resolution: chunkem (local FSC fast/exact, MonoRes) vs TEMPy and cctbx on phantoms with known truth.

For each box size a phantom is built (:func:`chunkem.phantoms.make_phantom`:
B rising 20 → 200 Å² along x, half-map FSC 3.5 Å, known local resolution)
and written as MRC. Every tool runs as its own process on the same files;
the table gives the whole-process wall time and the accuracy against the
phantom's local resolution inside the mask (RMSE, bias, Pearson r).

Peers, each in its own venv that the script makes in the bench cache
(``$CHUNKEM_BENCH_CACHE/locres``, default ``/tmp/chunkem-bench/locres``) on
first use, or ``--tempy-venv`` / ``--cctbx-venv`` to reuse one:

* TEMPy (PyPI ``biotempy``; its pins do not build on Python 3.11, so the
  script installs ``numpy scipy biopython gemmi voxcov mrcfile pyfftw
  matplotlib`` and then ``biotempy`` with ``--no-deps``, see
  ``../shared/design/PEERS.md``) computes a blocres-like local FSC in a
  sphere of 7 × the global resolution around each requested point
  (``ScoringFunctions.map_local_resolution(protein_mask=...)``, threshold set
  to 0.143 like the truth). It costs a few ms per point, so it runs on every
  ``--tempy-stride``-th mask voxel and its time for the whole mask is
  extrapolated (reported beside the measured time).
* cctbx (``cctbx-base``, the phenix.local_resolution engines of
  ``iotbx.map_model_manager``): ``local_resolution_map`` (local half-map
  correlation in 20 resolution bins, smoothing radius = the resolution, FSC
  0.143, the same family as chunkem's fast mode) and, with
  ``--cctbx-local-fsc``, ``local_fsc`` (FSC in boxes); resolution and
  ``d_min`` are left to cctbx.

Wall time and peak memory (RSS summed over the process tree) are those of
the whole process, ``/usr/bin/time -v`` and psutil.

Usage::

    python benchmarks/locres_bench.py                       # installs the peers on the first run
    python benchmarks/locres_bench.py --sizes 128 --tempy-stride 4 --exact-step 4
    python benchmarks/locres_bench.py --tempy-venv ~/venvs/tempy --cctbx-venv ~/venvs/cctbx --cctbx-local-fsc

Prints a table and writes ``locres_bench.json`` in ``--out``.

Measured (session 5, 2026-11-22, 2-core machine with the hypervisor
stealing about half of the CPU time, so every tool slower than in session 4
below; all rows in one run per size; TEMPy on every 4th mask voxel, its
all-mask time extrapolated; peak = RSS summed over the process tree)::

      box tool                                        wall s all-mask s  peak MB  RMSE Å  bias Å      r rank
      128 chunkem localfsc fast                          6.2        6.2      350   0.278  -0.092  0.878 ok
      128 chunkem monores                               23.0       23.0      354   0.352   0.221  0.871 ok
      128 cctbx local_resolution_map                    40.1       40.1      500   0.360   0.102  0.837 ok
      128 cctbx local_fsc                              204.0      204.0      291   0.509  -0.161  0.490 ok
      128 TEMPy map_local_resolution                    24.0     1231.8      227   0.332   0.246  0.915 ok
      256 chunkem localfsc fast                         23.2       23.2     1194   0.243  -0.078  0.910 ok
      256 chunkem monores                              126.2      126.2     1295   0.367   0.249  0.887 ok
      256 cctbx local_resolution_map                   356.9      356.9     2919   0.327   0.096  0.884 ok
      256 TEMPy map_local_resolution                   138.8     8639.3     1147   0.316   0.265  0.960 ok

  chunkem fast: 1/199 (128³) and 1/372 (256³) of TEMPy's all-mask time with
  lower RMSE; 1/6.5 and 1/15 of cctbx local_resolution_map (the same
  band-wise family: local CC per resolution bin), at 0.70 and 0.41x its peak
  memory and lower RMSE. MonoRes: 1/54 and 1/68 of TEMPy, 1/1.7 and 1/2.8 of
  cctbx; RMSE 0.02-0.05 Å above TEMPy's (same bias), below cctbx's at 128³
  and above at 256³. cctbx local_fsc (FSC in boxes, phenix.local_resolution style) at its
  default box settings is slow and coarse-grained here (r 0.49); 256³ not run.

Session 4 (quiet machine, load 1.1-1.4; before peak memory was measured)::

      box tool                                     wall s  all-mask s  RMSE Å  bias Å      r rank
      128 chunkem localfsc fast                       5.8         5.8   0.278  -0.092  0.878 ok
      128 chunkem monores                            23.9        23.9   0.352   0.221  0.871 ok
      128 TEMPy map_local_resolution                 19.1      1111.8   0.332   0.246  0.915 ok
      256 chunkem localfsc fast                      15.4        15.4   0.243  -0.078  0.910 ok
      256 chunkem monores                           102.0       102.0   0.367   0.249  0.887 ok
      256 TEMPy map_local_resolution                125.1      7795.7   0.316   0.265  0.960 ok

  MonoRes before folding its steps: 256³ 211.5 s, 4.54 GB peak; after:
  116.4 s, 1.44 GB; with float32 kernels (shared FH/|k|): 93.5 s, 1.36 GB
  (CLI, /usr/bin/time; same map to float round-off: 1 of 1.76 M voxels
  moved by > 0.1 Å, RMSE 0.367 Å unchanged).

400³ phantom (1.3 Å, 48 000 residues, 7.4 % mask, default window 21 Å),
whole CLI process, quiet machine (load < 1), session 4::

      local FSC fast                   55.2 s wall  66.6 s CPU  3.69 GB  RMSE 0.243 Å
      local FSC fast, 0.143 and 0.5    50.0 s wall  66.1 s CPU  5.70 GB  (3.73 GB since session 5, below)
      MonoRes (70 steps)              563.8 s wall 794.4 s CPU  4.40 GB  RMSE 0.275 Å
      MonoRes, float32 kernels        403.3 s wall 573.6 s CPU  4.28 GB  RMSE 0.275 Å

  The fast map is identical before and after the per-cutoff fold (56.3 s,
  3.66 GB before). Two cutoffs, session 5 (CPU steal about 50 %): the 5.5 GB
  were not the two maps held for writing (a one-pass streaming writer saved
  0.1 GB: 5.59 -> 5.49 GB) but the 0.5 cutoff's running state lagging
  behind the band gate, which waited for the 0.143 state only, so every
  band's local FSC map stayed in memory until the lagging chain caught up.
  Gating each band on every cutoff's state: 53.5 -> 52.3 s, 5.59 ->
  **3.73 GB** (as one cutoff), the same maps (max difference 0.0). MonoRes before its steps were folded kept one ratio map
  per step until the end: 70 × 256 MB = 18 GB at 400³ (not run).

Earlier run (session 2, load average 8-12, so 2-4x an idle machine's wall
times; the same RMSE, bias and r as above): 128³ fast 77.0 s, MonoRes
270.4 s, TEMPy 9450 s all-mask; 256³ fast 206.9 s, MonoRes 960.5 s, TEMPy
47 951 s all-mask.

Rerun at load 2.4 (``--sizes 128 --no-monores --exact-step 4``)::

      128 chunkem localfsc fast                      14.9        14.9   0.278  -0.092  0.878 ok
      128 chunkem localfsc exact step 4              30.2        30.2   0.285  -0.051  0.861 ok

400³ phantom (10 % mask, window 20.8 Å, 10 bands), fast local FSC, 2
threads: 160 s wall / 162 s CPU at load 2.5-3 (258 s wall at load 5-6);
the code before the running crossing and block skipping took 271 s CPU.

Windowed sums over the bounding box of the still-active voxels only, band
inverses from spectrum windows, one band in memory at a time (whole CLI
process, ``/usr/bin/time``, old and new back to back, load 3-3.7)::

      box   code   wall s   CPU s   peak RSS
      400   old     195.2   186.1    9.23 GB
      400   new      67.9    99.7    4.78 GB
      256   old      52.5    54.5    1.88 GB
      256   new      27.0    27.3    1.35 GB

Same maps (largest difference in the mask 0.0014 Å at 400³; RMSE vs the
truth 0.244 Å both). ``--band-spacing`` = 1/(2 · window) (the exact mode's
padded shells) costs 1.7x (400³: 167 s wall / 167 s CPU at load 4.7).
Then the second half's band inverse waits for the first's: 400³ peak
4.55 -> 4.20 GB, 84 -> 86 s wall (back to back, load 4.5-4.8).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _peers import PY, bench_cache, peer_python, setup_cctbx, timed  # noqa: E402

TEMPY_SCRIPT = r"""
import json, sys, time
import numpy as np
from TEMPy.maps.map_parser import MapParser
from TEMPy.protein.scoring_functions import ScoringFunctions
d, stride, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
h1 = MapParser.readMRC(f"{d}/half1.mrc")
h2 = MapParser.readMRC(f"{d}/half2.mrc")
mask = MapParser.readMRC(f"{d}/mask.mrc")
sub = np.zeros_like(mask.fullMap)
sub[::stride, ::stride, ::stride] = 1
mask.fullMap = (mask.fullMap > 0.5) * sub
t0 = time.time()
r = ScoringFunctions().map_local_resolution(h1, h2, protein_mask=mask, verbose=False, fsc_threshold=0.143)
keys = np.array(list(r.keys()), dtype=int)
vals = np.array(list(r.values()), dtype=float)
np.savez(out, keys=keys, vals=vals, call_s=time.time() - t0)
"""

# cctbx (phenix.local_resolution engines) on the same half maps, resolution and d_min left to cctbx:
# ``local_resolution_map``: local half-map CC in 20 bins, smoothing radius = the resolution, FSC 0.143;
# ``local_fsc``: FSC in boxes (phenix.local_resolution style), which also wants the full map.
CCTBX_SCRIPT = r"""
import sys
from iotbx.data_manager import DataManager
from iotbx.map_model_manager import map_model_manager
d, how, out = sys.argv[1], sys.argv[2], sys.argv[3]
dm = DataManager()
h1 = dm.get_real_map(f"{d}/half1.mrc")
h2 = dm.get_real_map(f"{d}/half2.mrc")
full = h1.customized_copy(map_data=(h1.map_data() + h2.map_data()) * 0.5)
mmm = map_model_manager(map_manager=full, map_manager_1=h1, map_manager_2=h2)
m = mmm.local_fsc(nproc=1) if how == "local_fsc" else mmm.local_resolution_map()
m.write_map(out)
"""


def setup_tempy(cache: Path) -> Path:
    """The python of a venv holding TEMPy (``biotempy``; its pins do not build on 3.11, so no-deps)."""
    return peer_python(cache / "venv-tempy", "TEMPy.protein.scoring_functions",
                       ["numpy", "scipy", "biopython", "gemmi", "voxcov", "mrcfile", "pyfftw", "matplotlib"],
                       ["--no-deps", "biotempy"])


def _timed(cmd: list, work: Path, label: str) -> dict:
    log = work / (label.replace(" ", "_").replace("/", "_") + ".log")
    t = timed(cmd, cwd=work, log=log)
    if t["rc"] != 0:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise RuntimeError(f"{label} failed with code {t['rc']} (log {log})")
    return t


def _scores(est: np.ndarray, truth: np.ndarray) -> dict:
    e = est.astype(np.float64)
    t = truth.astype(np.float64)
    ok = np.isfinite(e) & (e > 0)
    e, t = e[ok], t[ok]
    edges = np.percentile(t, [100 / 3, 200 / 3])
    q = np.digitize(t, edges)
    meds = [float(np.median(e[q == k])) for k in range(3)]
    return {
        "n": int(e.size),
        "rmse_A": float(np.sqrt(np.mean((e - t) ** 2))),
        "bias_A": float(np.mean(e - t)),
        "pearson_r": float(np.corrcoef(e, t)[0, 1]) if e.size > 2 else float("nan"),
        "median_A": float(np.median(e)),
        "tercile_medians_A": meds,
        "ranking_ok": bool(meds[0] < meds[1] < meds[2]),
    }


def _row(n: int, tool: str, t: dict, est: np.ndarray, truth: np.ndarray, **extra) -> dict:
    return {"box": n, "tool": tool, "wall_s": round(t["wall_s"], 2), "peak_mb": round(t["tree_mb"], 1), **extra,
            **_scores(est, truth)}


def bench_size(n: int, args, work: Path, peers: dict) -> list[dict]:
    from chunkem.io import open_map, save
    from chunkem.phantoms import make_phantom

    t0 = time.perf_counter()
    residues = args.residues or int(1000 * (n / 128) ** 3 * (1.0 / args.voxel) ** 3)
    ph = make_phantom(box=n, n_residues=residues, voxel_size=args.voxel, resolution=3.5, b_range=(20.0, 200.0),
                      seed=0)
    d = work / f"box{n}"
    d.mkdir(parents=True, exist_ok=True)
    for key in ("half1", "half2", "mask"):
        save(getattr(ph, key), d / f"{key}.mrc", progress=False)
    print(f"[{n}³] phantom: {residues} residues, {time.perf_counter() - t0:.1f} s; "
          f"truth {ph.params['local_resolution_range']} Å", flush=True)
    m = ph.mask.values > 0.5
    truth = ph.local_resolution.values
    rows = []
    chunkem = [PY, "-m", "chunkem.cli.main", "locres", d / "half1.mrc", d / "half2.mrc", "--mask", d / "mask.mrc",
               "--no-progress"]
    runs = [("chunkem localfsc fast", ["--mode", "fast"])]
    if not args.no_monores:
        runs.append(("chunkem monores", ["--method", "monores"]))
    if args.exact_step:
        runs.append((f"chunkem localfsc exact step {args.exact_step}",
                     ["--mode", "exact", "--step", str(args.exact_step)]))
    for label, extra in runs:
        out = d / (label.replace(" ", "_") + ".mrc")
        t = _timed(chunkem + extra + ["-o", out], d, label)
        rows.append(_row(n, label, t, open_map(out).values[m], truth[m]))
        print(f"[{n}³] {label}: {t['wall_s']:.1f} s", flush=True)
    if "cctbx" in peers:
        script = work / "cctbx_localres.py"
        script.write_text(CCTBX_SCRIPT)
        for how in ["local_resolution_map"] + (["local_fsc"] if args.cctbx_local_fsc else []):
            out = d / f"cctbx_{how}.mrc"
            t = _timed([peers["cctbx"], script, d, how, out], d, f"cctbx {how}")
            est = open_map(out).values
            if est.shape != m.shape:
                raise RuntimeError(f"cctbx wrote a {est.shape} map for a {m.shape} input")
            rows.append(_row(n, f"cctbx {how}", t, est[m], truth[m]))
            print(f"[{n}³] cctbx {how}: {t['wall_s']:.1f} s", flush=True)
    if "tempy" in peers:
        script = work / "tempy_localres.py"
        script.write_text(TEMPY_SCRIPT)
        npz = d / "tempy.npz"
        t = _timed([peers["tempy"], script, d, str(args.tempy_stride), npz], d, "tempy")
        z = np.load(npz)
        keys, vals = z["keys"], z["vals"]
        n_points = len(vals)
        full = float(z["call_s"]) * m.sum() / max(n_points, 1) + (t["wall_s"] - float(z["call_s"]))
        rows.append(_row(n, f"TEMPy map_local_resolution (every {args.tempy_stride}th voxel)", t, vals,
                         truth[keys[:, 0], keys[:, 1], keys[:, 2]], points=n_points,
                         wall_s_all_mask_voxels_extrapolated=round(full, 1)))
        print(f"[{n}³] TEMPy: {t['wall_s']:.1f} s for {n_points} points (all {int(m.sum())} mask voxels: "
              f"~{full:.0f} s)", flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--voxel", type=float, default=1.0, help="voxel size in Å")
    ap.add_argument("--residues", type=int, default=None, help="phantom residues (default scales with the box)")
    ap.add_argument("--tempy-venv", default=os.environ.get("TEMPY_VENV"),
                    help="reuse this venv holding biotempy (default: made in the bench cache on first use)")
    ap.add_argument("--cctbx-venv", default=os.environ.get("CCTBX_VENV"),
                    help="reuse this venv holding cctbx-base (default: made in the bench cache on first use)")
    ap.add_argument("--no-tempy", action="store_true")
    ap.add_argument("--no-cctbx", action="store_true")
    ap.add_argument("--cctbx-local-fsc", action="store_true",
                    help="also cctbx local_fsc (FSC in boxes; minutes at 128³)")
    ap.add_argument("--tempy-stride", type=int, default=4)
    ap.add_argument("--exact-step", type=int, default=0, help="also run the exact mode with this --step")
    ap.add_argument("--no-monores", action="store_true", help="skip MonoRes (one global FFT pass per step)")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    cache = bench_cache("locres")
    peers: dict[str, Path] = {}
    if not args.no_tempy:
        peers["tempy"] = Path(args.tempy_venv) / "bin" / "python" if args.tempy_venv else setup_tempy(cache)
    if not args.no_cctbx:
        peers["cctbx"] = Path(args.cctbx_venv) / "bin" / "python" if args.cctbx_venv else setup_cctbx(cache)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="locres_bench_") as tmp:
        for n in args.sizes:
            rows += bench_size(n, args, Path(tmp), peers)
    print()
    print(f"{'box':>5} {'tool':<48} {'wall s':>8} {'all-mask s':>10} {'peak MB':>8} {'RMSE Å':>7} {'bias Å':>7} "
          f"{'r':>6} rank")
    for r in rows:
        allmask = r.get("wall_s_all_mask_voxels_extrapolated", r["wall_s"])
        print(f"{r['box']:>5} {r['tool']:<48} {r['wall_s']:>8.1f} {allmask:>10.1f} {r['peak_mb']:>8.0f} "
              f"{r['rmse_A']:>7.3f} {r['bias_A']:>7.3f} {r['pearson_r']:>6.3f} "
              f"{'ok' if r['ranking_ok'] else 'WRONG'}")
    out = Path(args.out) / "locres_bench.json"
    out.write_text(json.dumps({"rows": rows, "cpus": os.cpu_count()}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
