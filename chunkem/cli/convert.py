"""Convert a map between MRC and OME-Zarr, losslessly and chunk by chunk.

MRC (.mrc, .map, .ccp4, also .gz / .bz2 input) ↔ OME-Zarr (.zarr, zarr v3,
NGFF 0.5, axes z, y, x in Å). Data, voxel size, origin, axis order and the
MRC header facts survive MRC → zarr → MRC exactly; an MRC is written back in
its original mode when its values still fit. --chunks sets the zarr chunk
edge (default 128). --levels K writes K pyramid levels to a zarr output
(levels 2..K halve the previous one by real-space mean binning,
chunkem.ops.bin.pyramid). A JSON report is written beside the output.

Examples
--------
  chunkem convert emd_3488.mrc emd_3488.zarr
  chunkem convert tomo.mrc tomo.zarr --chunks 256 --levels 3
  chunkem convert emd_3488.zarr emd_3488_back.mrc
  chunkem convert emd_3001.map.gz emd_3001.mrc --axis-order zyx
"""

from __future__ import annotations

import argparse
import time

from .common import add_compute_args, check_output, compute_session, sidecar, write_json


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="input map (.mrc, .map, .ccp4, .mrc.gz, .map.bz2 or .zarr)")
    parser.add_argument("output", help="output map (.mrc, .map or .zarr)")
    parser.add_argument("--levels", type=int, default=1,
                        help="number of pyramid levels in a zarr output (default 1: full resolution only)")
    parser.add_argument("--level", type=int, default=0, help="level to read from a zarr input (default 0)")
    parser.add_argument("--mode", type=int, choices=[0, 1, 2, 6, 12], default=None,
                        help="MRC output mode (default: the input's mode when values fit, else 2 = float32)")
    parser.add_argument("--axis-order", choices=["keep", "zyx"], default="keep",
                        help="MRC output axis order: keep the input's MAPC/MAPR/MAPS (default) or write 1 2 3")
    parser.add_argument("--voxel-size", type=float, nargs="+", metavar="Å", default=None,
                        help="override the input voxel size (one value, or z y x)")
    parser.add_argument("--no-overwrite", action="store_true", help="fail if the output exists")
    add_compute_args(parser)


def main(args: argparse.Namespace) -> int:
    from ..errors import ParameterError
    from ..io import map_facts, open_map, save
    from ..io.maps import map_format

    vs = args.voxel_size
    if vs is not None and len(vs) not in (1, 3):
        raise ParameterError(f"--voxel-size takes 1 or 3 values (z y x), got {len(vs)}")
    if args.levels < 1:
        raise ParameterError(f"--levels must be at least 1, got {args.levels}")
    out_kind = map_format(args.output, for_writing=True)
    if args.levels > 1 and out_kind != "zarr":
        raise ParameterError(f"{args.output}: --levels {args.levels} needs a zarr output (name ending in .zarr)")
    if out_kind == "zarr" and (args.mode is not None or args.axis_order != "keep"):
        raise ParameterError(f"{args.output}: --mode and --axis-order apply to MRC output only")
    out = check_output(args.output, args.input)
    t0 = time.perf_counter()
    vol = open_map(args.input, chunks=args.chunks, voxel_size=(vs[0] if vs and len(vs) == 1 else vs), level=args.level)
    levels = []
    if args.levels > 1:
        from ..ops.bin import pyramid

        levels = pyramid(vol, levels=args.levels, method="mean")[1:]
    with compute_session(args, nbytes_hint=int(vol.size) * 4) as session:
        print(f"chunkem convert: {args.input} {tuple(vol.shape)} -> {out} on {session.describe()}")
        if out_kind == "zarr":
            save(vol, out, chunks=args.chunks, levels=levels or None, overwrite=not args.no_overwrite,
                 progress=not args.no_progress)
        else:
            save(vol, out, mode=args.mode, axis_order=args.axis_order, overwrite=not args.no_overwrite,
                 progress=not args.no_progress)
        session_info = session.to_dict()
    elapsed = time.perf_counter() - t0
    written = open_map(out)
    report = {
        "verb": "convert",
        "input": map_facts(vol),
        "output": map_facts(written),
        "levels": [{"level": 0, "shape": list(vol.shape), "voxel_size_A": list(vol.attrs["voxel_size"]),
                    "origin_A": list(vol.attrs["origin"])}]
        + [{"level": i + 1, "shape": list(lv.shape), "voxel_size_A": list(lv.attrs["voxel_size"]),
            "origin_A": list(lv.attrs["origin"])} for i, lv in enumerate(levels)],
        "compute": session_info,
        "elapsed_s": round(elapsed, 3),
    }
    rp = write_json(sidecar(out, ".json"), report)
    print(f"wrote {out} and {rp} in {elapsed:.1f} s")
    return 0
