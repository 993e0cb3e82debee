"""Bin a map by an integer factor (Fourier crop or real-space mean); write pyramids.

The binned voxel size is factor × the input's and each new voxel sits at the
centre of the input voxels it replaces (origin + (factor-1)/2 × voxel size);
trailing voxels that do not fill a bin are dropped. --levels N writes an
OME-Zarr multiscale store (output must end in .zarr) holding the binned map
and N-1 further levels, each halved again by real-space mean (for
napari-style viewing). A JSON report is written beside the output.

Examples
--------
  chunkem bin tomo.mrc tomo_bin2.mrc --factor 2
  chunkem bin tomo.mrc tomo_bin4.mrc --factor 4 --method fourier
  chunkem bin tomo.mrc tomo.zarr --factor 1 --levels 4
"""

from __future__ import annotations

import argparse
import time

from .common import add_compute_args, check_output, compute_session, reopen_in_fft_slabs, sidecar, write_json


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map", help="input map (MRC/CCP4 or .zarr)")
    parser.add_argument("output", help="output map (.mrc, or .zarr for --levels > 1)")
    parser.add_argument("--factor", type=int, default=2, help="integer bin factor (default 2; 1 = no binning)")
    parser.add_argument("--method", choices=["fourier", "mean"], default="fourier",
                        help="fourier (Fourier crop, no aliasing; default) or mean (real-space mean of factor³ cubes)")
    parser.add_argument("--levels", type=int, default=1,
                        help="number of pyramid levels (1, 2, 4, … × the binned voxel size) in an OME-Zarr output")
    parser.add_argument("--fft-strategy", choices=["auto", "gather", "slab"], default="auto")
    add_compute_args(parser)


def main(args: argparse.Namespace) -> int:
    from ..errors import ParameterError
    from ..io import open_map, save
    from ..ops.bin import bin_volume, pyramid

    if args.levels < 1:
        raise ParameterError(f"--levels must be at least 1, got {args.levels}")
    if args.levels > 1 and not str(args.output).rstrip("/").endswith(".zarr"):
        raise ParameterError(f"{args.output}: --levels {args.levels} needs an OME-Zarr output (name ending in .zarr)")
    out = check_output(args.output, args.map)
    t0 = time.perf_counter()
    vol = open_map(args.map, chunks=args.chunks)
    with compute_session(args, nbytes_hint=int(vol.size) * 4) as session:
        # the graph is built inside the session: the FFT strategy depends on the workers' memory
        if args.chunks is None and args.method == "fourier" and args.factor > 1:
            vol = reopen_in_fft_slabs(vol, args.map, strategy=args.fft_strategy)
        binned = bin_volume(vol, factor=args.factor, method=args.method, strategy=args.fft_strategy)
        levels = pyramid(binned, levels=args.levels, method="mean")
        print(f"chunkem bin: {args.map} {tuple(vol.shape)} -> {tuple(binned.shape)} on {session.describe()}")
        save(levels[0], out, levels=levels[1:] or None, progress=not args.no_progress)
        session_info = session.to_dict()
    elapsed = time.perf_counter() - t0
    report = {
        "verb": "bin",
        "input": str(args.map),
        "output": str(out),
        "factor": args.factor,
        "method": args.method,
        "input_shape": list(vol.shape),
        "input_voxel_size_A": list(vol.attrs["voxel_size"]),
        "input_origin_A": list(vol.attrs["origin"]),
        "levels": [
            {"level": i, "shape": list(lv.shape), "voxel_size_A": list(lv.attrs["voxel_size"]),
             "origin_A": list(lv.attrs["origin"])}
            for i, lv in enumerate(levels)
        ],
        "geometry_note": "binned voxel j is centred on the input voxels it replaces: "
                         "origin + (j*factor + (factor-1)/2) * voxel_size",
        "compute": session_info,
        "elapsed_s": round(elapsed, 3),
    }
    rp = write_json(sidecar(out, ".json"), report)
    print(f"wrote {out} and {rp} in {elapsed:.1f} s")
    return 0
