"""Sharpen or blur a map with a fixed B, or choose the sharpening automatically.

Fixed B (--bfactor B, RELION sign): amplitudes × exp(-B s²/4), so B < 0
sharpens and B > 0 blurs. --auto searches the sharpening as
phenix.auto_sharpen does (b_iso_to_d_cut: the target decay b_iso of the
result is scanned from -100 to 300 Å² and the map with the largest adjusted
surface area, or kurtosis with --method kurtosis, wins; needs --resolution).
Writes OUT and OUT.json beside it (with --auto also OUT_scores.png, the score
curve). In the report b_sharpen is cctbx's sign (positive sharpens).

Examples
--------
  chunkem sharpen map.mrc sharp.mrc --bfactor -80 --lowpass 3.5
  chunkem sharpen map.mrc blurred.mrc --bfactor 100
  chunkem sharpen map.mrc auto.mrc --auto --resolution 3.2
  chunkem sharpen big.mrc auto.mrc --auto --resolution 3.2 --method kurtosis --box 128
"""

from __future__ import annotations

import argparse
import time
import warnings

from .common import add_compute_args, check_output, compute_session, sidecar, write_json


def _box(text: str):
    if text == "whole":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'whole' or an edge in voxels, got {text!r}")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map", help="input map (MRC/CCP4 or .zarr)")
    parser.add_argument("output", help="output map (.mrc or .zarr)")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--bfactor", type=float, metavar="Å²",
                     help="apply B: exp(-B s²/4); B < 0 sharpens, B > 0 blurs (RELION sign)")
    how.add_argument("--auto", action="store_true", help="choose the sharpening automatically (phenix-style)")
    parser.add_argument("--lowpass", type=float, metavar="Å", default=None, help="with --bfactor: also low-pass")
    a = parser.add_argument_group("--auto options")
    a.add_argument("--resolution", type=float, metavar="Å", help="nominal resolution (required with --auto)")
    a.add_argument("--method", choices=["adjusted_sa", "kurtosis"], default="adjusted_sa")
    a.add_argument("--box", type=_box, default=None,
                   help="analyse a cube of this edge (voxels) around the density, or 'whole' "
                        "(default: whole map up to 160³, else 128)")
    a.add_argument("--solvent-fraction", type=float, default=None, help="solvent fraction (default: estimated)")
    a.add_argument("--search-b", type=float, nargs=3, metavar=("MIN", "MAX", "N"), default=(-100.0, 300.0, 21),
                   help="target b_iso grid (Å², decay sign), default -100 300 21")
    parser.add_argument("--voxel-size", type=float, metavar="Å", default=None, help="override the header voxel size")
    parser.add_argument("--fft-strategy", choices=["auto", "gather", "slab"], default="auto")
    add_compute_args(parser)


def main(args: argparse.Namespace) -> int:
    from ..errors import ParameterError
    from ..io import open_map, save
    from ..ops.sharpen import auto_sharpen, sharpen

    out = check_output(args.output, args.map)
    t0 = time.perf_counter()
    vol = open_map(args.map, chunks=args.chunks, voxel_size=args.voxel_size)
    report = {"verb": "sharpen", "input": args.map, "output": str(out)}
    caught = []
    with compute_session(args, nbytes_hint=int(vol.size) * 4) as session:
        print(f"chunkem sharpen: {args.map} {tuple(vol.shape)} on {session.describe()}")
        if args.auto:
            if args.resolution is None:
                raise ParameterError("--auto needs --resolution (Å)")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                r = auto_sharpen(vol, resolution=args.resolution, method=args.method, box=args.box,
                                 solvent_fraction=args.solvent_fraction, search_b_min=args.search_b[0],
                                 search_b_max=args.search_b[1], search_b_n=int(args.search_b[2]),
                                 strategy=args.fft_strategy)
            result = r.map
            report.update(r.to_dict())
        else:
            result = sharpen(vol, bfactor=args.bfactor, lowpass=args.lowpass, strategy=args.fft_strategy)
            report.update({"bfactor_relion_A2": args.bfactor, "lowpass_A": args.lowpass,
                           "bfactor_sign": "RELION: amplitudes × exp(-B s²/4), B < 0 sharpens"})
        save(result, out, progress=not args.no_progress)
        report["compute"] = session.to_dict()
    for w in caught:
        print(f"warning: {w.message}")
    elapsed = time.perf_counter() - t0
    report["elapsed_s"] = round(elapsed, 3)
    jp = write_json(sidecar(out, ".json"), report)
    if args.auto:
        r.plot(sidecar(out, "_scores.png"))
        print(f"chosen b_iso {r.b_iso:.1f} Å² (decay); b_sharpen {r.b_sharpen:.1f} Å² (cctbx, > 0 sharpens) "
              f"from original b_iso {r.original_b_iso:.1f} Å²")
    print(f"wrote {out} and {jp} in {elapsed:.1f} s")
    return 0
