"""RELION-style post-processing: sharpen, FSC-weight and low-pass two half maps.

Averages the halves, weights by sqrt(2 FSC/(1+FSC)) with the mask-corrected
FSC, fits a Guinier B to ln(mean |F|) vs s² (10 Å to the limit), applies it
and low-passes at the FSC = 0.143 resolution. B-factor sign (RELION):
amplitudes × exp(-B s²/4), so the fitted B is negative for a real map and
--bfactor -80 sharpens. Writes OUT (the map), OUT_masked (map × mask), and
beside it OUT.json, OUT_fsc.csv, OUT_fsc.png and OUT_guinier.png.

Examples
--------
  chunkem postprocess half1.mrc half2.mrc --mask mask.mrc -o post.mrc
  chunkem postprocess half1.mrc half2.mrc --mask mask.mrc -o post.mrc --bfactor -60 --lowpass 3.8
  chunkem postprocess h1.zarr h2.zarr --mask m.zarr -o post.zarr --autob-highres to_resolution
"""

from __future__ import annotations

import argparse
import time
import warnings

from .common import add_compute_args, check_output, compute_session, sidecar, write_json


def _highres(text: str):
    if text in ("relion", "to_resolution"):
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'relion', 'to_resolution' or a resolution in Å, got {text!r}")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("half1", help="first unfiltered half map")
    parser.add_argument("half2", help="second unfiltered half map")
    parser.add_argument("--mask", help="soft mask in [0, 1] (strongly recommended)")
    parser.add_argument("-o", "--out", required=True, help="output map (.mrc or .zarr)")
    g = parser.add_argument_group("post-processing")
    g.add_argument("--bfactor", type=float, metavar="Å²", default=None,
                   help="force this B (RELION sign: negative sharpens) instead of the Guinier fit")
    g.add_argument("--lowpass", type=float, metavar="Å", default=None,
                   help="low-pass resolution (default: the FSC 0.143 resolution; 0 = none)")
    g.add_argument("--autob-lowres", type=float, metavar="Å", default=10.0,
                   help="low-resolution end of the Guinier fit (default 10 Å)")
    g.add_argument("--autob-highres", type=_highres, default="relion",
                   help="high-resolution end: relion (no limit, default), to_resolution, or Å")
    g.add_argument("--skip-fsc-weighting", action="store_true", help="do not FSC-weight")
    g.add_argument("--randomize-at-fsc", type=float, default=0.8)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--force-mask", action="store_true")
    g.add_argument("--voxel-size", type=float, metavar="Å", default=None, help="override the header voxel size")
    g.add_argument("--fft-strategy", choices=["auto", "gather", "slab"], default="auto")
    add_compute_args(parser)


def main(args: argparse.Namespace) -> int:
    from ..io import open_map, save
    from ..ops.postprocess import postprocess

    out = check_output(args.out, args.half1, args.half2, args.mask)
    t0 = time.perf_counter()
    h1 = open_map(args.half1, chunks=args.chunks, voxel_size=args.voxel_size)
    h2 = open_map(args.half2, chunks=args.chunks, voxel_size=args.voxel_size)
    mask = open_map(args.mask, chunks=args.chunks, voxel_size=args.voxel_size) if args.mask else None
    masked_out = sidecar(out, "_masked" + (".zarr" if str(out).endswith(".zarr") else ".mrc"))
    with compute_session(args, nbytes_hint=int(h1.size) * 4) as session:
        print(f"chunkem postprocess: {args.half1} {tuple(h1.shape)} on {session.describe()}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pp = postprocess(h1, h2, mask=mask, bfactor=args.bfactor, lowpass=args.lowpass,
                             autob_lowres=args.autob_lowres, autob_highres=args.autob_highres,
                             skip_fsc_weighting=args.skip_fsc_weighting, randomize_at_fsc=args.randomize_at_fsc,
                             seed=args.seed, force_mask=args.force_mask, strategy=args.fft_strategy)
        save(pp.map, out, progress=not args.no_progress)
        if pp.masked_map is not None:
            save(pp.masked_map, masked_out, progress=not args.no_progress)
        info = session.to_dict()
    for msg in [str(w.message) for w in caught] + list(pp.warnings):
        print(f"warning: {msg}")
    elapsed = time.perf_counter() - t0
    report = {"verb": "postprocess", "half1": args.half1, "half2": args.half2, "mask": args.mask,
              "output": str(out), "masked_output": str(masked_out) if pp.masked_map is not None else None,
              **pp.to_dict(), "compute": info, "elapsed_s": round(elapsed, 3)}
    jp = write_json(sidecar(out, ".json"), report)
    pp.fsc.to_csv(sidecar(out, "_fsc.csv"))
    pp.fsc.plot(sidecar(out, "_fsc.png"))
    pp.plot_guinier(sidecar(out, "_guinier.png"))
    fit = "" if args.bfactor is not None else f" (Guinier fit, r² {pp.guinier.r2:.3f})"
    print(f"resolution {pp.resolution:.3f} Å; B = {pp.bfactor:.2f} Å² (RELION sign){fit}; "
          f"low-pass {pp.lowpass if pp.lowpass else 'none'}")
    print(f"wrote {out}, {jp} and plots in {elapsed:.1f} s")
    return 0
