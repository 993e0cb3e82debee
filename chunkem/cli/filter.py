"""Filter a map: low-/high-/band-pass at a resolution, B-factor, Gaussian smoothing.

Fourier filters (--lowpass, --highpass, --bandpass, --bfactor) are combined
into one FFT pass; --gaussian smooths in real space (σ in Å) afterwards. The
multiplier of a pass filter is 1/2 at the given resolution; --edge and
--width (1/Å, default 0.2 × the cut-off frequency) shape its edge.

B-factor sign (--bfactor B, RELION / decay convention): amplitudes are
multiplied by exp(-B s²/4), so B > 0 blurs and B < 0 sharpens.
--bfactor-convention sharpen flips it (cctbx b_sharpen).

A JSON report is written beside the output (OUT without extension + .json).

Examples
--------
  chunkem filter tomo.mrc tomo_lp20.mrc --lowpass 20
  chunkem filter map.mrc sharp.mrc --bfactor -80 --lowpass 3.5
  chunkem filter tomo.zarr tomo_bp.zarr --bandpass 300 20 --edge gaussian
  chunkem filter tomo.mrc smooth.mrc --gaussian 15 --scheduler tcp://host:8786
"""

from __future__ import annotations

import argparse
import time

from .common import add_compute_args, check_output, compute_session, reopen_in_fft_slabs, sidecar, write_json


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map", help="input map (MRC/CCP4 or .zarr)")
    parser.add_argument("output", help="output map (.mrc or .zarr)")
    f = parser.add_argument_group("filters")
    f.add_argument("--lowpass", type=float, metavar="Å", help="low-pass to this resolution (Å)")
    f.add_argument("--highpass", type=float, metavar="Å", help="high-pass: remove features coarser than this (Å)")
    f.add_argument("--bandpass", type=float, nargs=2, metavar=("LOW_Å", "HIGH_Å"),
                   help="band-pass between a coarse and a fine resolution, e.g. --bandpass 50 8")
    f.add_argument("--bfactor", type=float, metavar="Å²",
                   help="apply B (Å²): exp(-B s²/4), B < 0 sharpens, B > 0 blurs (RELION/decay sign)")
    f.add_argument("--bfactor-convention", choices=["relion", "decay", "sharpen"], default="relion",
                   help="sign of --bfactor: relion/decay (default, B < 0 sharpens) or sharpen (cctbx, B > 0 sharpens)")
    f.add_argument("--gaussian", type=float, metavar="SIGMA_Å", help="Gaussian smoothing, standard deviation in Å")
    f.add_argument("--edge", choices=["cosine", "gaussian"], default="cosine", help="edge of pass filters")
    f.add_argument("--width", type=float, metavar="1/Å", default=None,
                   help="edge width in 1/Å (default 0.2 × cut-off frequency)")
    f.add_argument("--fft-strategy", choices=["auto", "gather", "slab"], default="auto",
                   help="whole-map FFT strategy (default auto: gather when it fits a worker)")
    add_compute_args(parser)


def _fourier_params(args: argparse.Namespace) -> dict:
    from ..errors import ParameterError

    lowpass, highpass = args.lowpass, args.highpass
    if args.bandpass is not None:
        if lowpass is not None or highpass is not None:
            raise ParameterError("--bandpass cannot be combined with --lowpass/--highpass")
        coarse, fine = args.bandpass
        if not coarse > fine:
            raise ParameterError(f"--bandpass LOW HIGH: LOW ({coarse} Å) must be coarser (larger) than HIGH ({fine} Å)")
        highpass, lowpass = coarse, fine
    return {"lowpass": lowpass, "highpass": highpass, "bfactor": args.bfactor}


def main(args: argparse.Namespace) -> int:
    from ..errors import ParameterError
    from ..io import open_map, save
    from ..ops.filter import filter_volume, gaussian_smooth

    fp = _fourier_params(args)
    if all(v is None for v in fp.values()) and args.gaussian is None:
        raise ParameterError("give at least one of --lowpass, --highpass, --bandpass, --bfactor, --gaussian")
    out = check_output(args.output, args.map)
    t0 = time.perf_counter()
    vol = open_map(args.map, chunks=args.chunks)
    with compute_session(args, nbytes_hint=int(vol.size) * 4) as session:
        # the graph is built inside the session: the FFT strategy depends on the workers' memory
        if args.chunks is None and args.gaussian is None and any(v is not None for v in fp.values()):
            vol = reopen_in_fft_slabs(vol, args.map, strategy=args.fft_strategy)
        result = vol
        steps = []
        if any(v is not None for v in fp.values()):
            result = filter_volume(result, **fp, bfactor_convention=args.bfactor_convention, edge=args.edge,
                                   width=args.width, strategy=args.fft_strategy)
            steps.append({"fourier": {k: v for k, v in fp.items() if v is not None}, "edge": args.edge,
                          "width_per_A": args.width, "bfactor_convention": args.bfactor_convention})
        if args.gaussian is not None:
            result = gaussian_smooth(result, sigma=args.gaussian)
            steps.append({"gaussian_sigma_A": args.gaussian})
        print(f"chunkem filter: {args.map} {tuple(vol.shape)} on {session.describe()}")
        save(result, out, progress=not args.no_progress)
        session_info = session.to_dict()
    elapsed = time.perf_counter() - t0
    report = {
        "verb": "filter",
        "input": str(args.map),
        "output": str(out),
        "shape": list(vol.shape),
        "voxel_size_A": list(vol.attrs["voxel_size"]),
        "origin_A": list(vol.attrs["origin"]),
        "steps": steps,
        "bfactor_sign": "amplitudes × exp(-B s²/4): B < 0 sharpens (RELION/decay)"
        if args.bfactor_convention != "sharpen" else "amplitudes × exp(+B s²/4): B > 0 sharpens (cctbx b_sharpen)",
        "compute": session_info,
        "elapsed_s": round(elapsed, 3),
    }
    rp = write_json(sidecar(out, ".json"), report)
    print(f"wrote {out} and {rp} in {elapsed:.1f} s")
    return 0
