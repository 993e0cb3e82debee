"""FDR confidence map of a map and the molecular mask at a false discovery rate.

Background noise from four boxes near the faces (or a user box centre, or the
voxels outside --noise-mask), right-sided p-values, Benjamini–Yekutieli (BY,
default) or Benjamini–Hochberg (BH) adjustment over the centred sphere.
Writes the confidence map 1 - q (OUT), the binary mask q <= --fdr
(OUT_mask.mrc, or --mask-out), OUT.json (noise statistics, threshold, counts)
and OUT.png (noise histogram, central slices). The ranking is exact and never
gathers the map.

Examples
--------
  chunkem fdr map.mrc confidence.mrc
  chunkem fdr map.mrc confidence.mrc --fdr 0.01 --method BH --lowpass 5
  chunkem fdr map.mrc confidence.mrc --box-centre 20 20 20 --noise-box 30 --mask-out mask.mrc
"""

from __future__ import annotations

import argparse
import time

from .common import add_compute_args, check_output, compute_session, sidecar, warm_matplotlib, write_json


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map", help="input map (MRC/CCP4 or .zarr), unmasked")
    parser.add_argument("output", help="output confidence map (.mrc or .zarr)")
    parser.add_argument("--mask-out", metavar="PATH", default=None,
                        help="binary mask at --fdr (default OUT_mask.<ext>)")
    parser.add_argument("--method", choices=["BY", "BH"], default="BY", help="multiple-testing adjustment")
    parser.add_argument("--fdr", type=float, default=0.01, help="false discovery rate of the mask (default 0.01)")
    parser.add_argument("--noise-box", type=int, metavar="VOXELS", default=None,
                        help="noise box edge (default max(int(0.05 N), 10))")
    parser.add_argument("--box-centre", type=float, nargs=3, metavar=("Z", "Y", "X"), default=None,
                        help="centre (voxel indices) of a single noise box in the solvent")
    parser.add_argument("--noise-mask", metavar="MASK", default=None,
                        help="estimate the noise outside this molecular mask (<= 0.5) instead of boxes")
    parser.add_argument("--lowpass", type=float, metavar="Å", default=None, help="tanh low-pass first")
    parser.add_argument("--whole-box", action="store_true",
                        help="test every voxel, not only the centred sphere")
    parser.add_argument("--voxel-size", type=float, metavar="Å", default=None, help="override the header voxel size")
    add_compute_args(parser)


def _mask_path(out) -> str:
    name = str(out)
    for ext in (".mrc", ".map", ".ccp4", ".zarr"):
        if name.endswith(ext):
            return name[: -len(ext)] + "_mask" + ext
    return name + "_mask.mrc"


def main(args: argparse.Namespace) -> int:
    from ..io import open_map, save
    from ..ops.fdr import fdr_confidence

    out = check_output(args.output, args.map, args.noise_mask)
    mask_out = check_output(args.mask_out or _mask_path(out), args.map, args.noise_mask, out)
    t0 = time.perf_counter()
    warm = warm_matplotlib()  # the PNG's imports overlap the computation
    vol = open_map(args.map, chunks=args.chunks, voxel_size=args.voxel_size)
    noise_mask = open_map(args.noise_mask, chunks=args.chunks) if args.noise_mask else None
    with compute_session(args, nbytes_hint=int(vol.size) * 8) as session:
        print(f"chunkem fdr: {args.map} {tuple(vol.shape)} on {session.describe()}")
        r = fdr_confidence(vol, method=args.method, fdr=args.fdr, noise_box=args.noise_box,
                           box_centre=tuple(args.box_centre) if args.box_centre else None,
                           lowpass=args.lowpass, mask=noise_mask, sphere=not args.whole_box)
        save(r.confidence, out, progress=not args.no_progress)
        save(r.mask, mask_out, progress=not args.no_progress)
        compute_info = session.to_dict()
    elapsed = time.perf_counter() - t0
    report = {"verb": "fdr", "input": args.map, "output": str(out), "mask_output": str(mask_out),
              **r.to_dict(), "compute": compute_info, "elapsed_s": round(elapsed, 3)}
    jp = write_json(sidecar(out, ".json"), report)
    warm.join()
    r.plot(sidecar(out, ".png"))
    for w in r.warnings:
        print(f"warning: {w}")
    print(f"noise μ {r.noise_mean:.4g} σ {r.noise_sigma:.4g} ({r.noise_source}); {r.n_selected} voxels at "
          f"{args.method} FDR {args.fdr:g} (map threshold {r.map_threshold:.4g})")
    print(f"wrote {out}, {mask_out} and {jp} in {elapsed:.1f} s")
    return 0
