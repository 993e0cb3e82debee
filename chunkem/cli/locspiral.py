"""LocSpiral / LocBSharpen: local, model-free enhancement of a map by spiral-phase band analysis.

Sweeps Gaussian frequency bands from LOW to HIGH Å; in each band the local
amplitude and phase come from the Riesz (spiral-phase) transform, and the
voxels whose amplitude beats the background noise quantile add their phase
(LocSpiral) or their amplitude frozen at 15 Å (--bsharpen, LocBSharpen).
Give the average of the unfiltered, unmasked, unsharpened half maps, or both
half maps. Without --mask an automatic mask (threshold + small-component
removal) is made and reported. Writes OUT (the enhanced map, standardised,
≥ 0), OUT_quality (the quality map W), OUT.json and OUT_slices.png.

Examples
--------
  chunkem locspiral map.mrc --mask mask.mrc --resolution-range 25 3.2 -o spiral.mrc
  chunkem locspiral half1.mrc half2.mrc --mask mask.mrc --resolution-range 30 4.25 -o spiral.mrc
  chunkem locspiral map.mrc --mask mask.mrc --resolution-range 25 3.2 --bsharpen -o bsharp.mrc
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Any

from .common import add_compute_args, check_output, compute_session, sidecar, write_json


def add_input_args(parser: argparse.ArgumentParser) -> None:
    """Map(s), mask, output and the automatic-mask options shared by the spiral verbs."""
    parser.add_argument("maps", nargs="+", metavar="MAP",
                        help="the map, or two half maps (averaged)")
    parser.add_argument("--mask", help="molecule mask (1 = molecule); default: an automatic mask")
    parser.add_argument("-o", "--out", required=True, help="output map (.mrc or .zarr)")
    parser.add_argument("--voxel-size", type=float, metavar="Å", default=None,
                        help="override the header voxel size")
    g = parser.add_argument_group("automatic mask (when no --mask)")
    g.add_argument("--auto-mask-sigma", type=float, default=4.0,
                   help="threshold in noise standard deviations (default 4)")
    g.add_argument("--auto-mask-min-voxels", type=int, default=25,
                   help="remove components smaller than this (default 25)")


def add_band_args(parser: argparse.ArgumentParser, *, default_range: tuple[float, float], threshold: float,
                  n_bands_help: str) -> None:
    """The band-bank options shared by the spiral verbs."""
    g = parser.add_argument_group("bands")
    g.add_argument("--resolution-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                   default=list(default_range),
                   help=f"resolution range in Å (default {default_range[0]:g} {default_range[1]:g})")
    g.add_argument("--n-bands", type=int, default=None, help=n_bands_help)
    g.add_argument("--band-sigma", type=float, metavar="1/Å", default=None,
                   help="Gaussian band width σ in 1/Å (default 0.02)")
    g.add_argument("--band-width-voxels", type=float, default=None,
                   help="band width as the reference's bw, in Fourier voxels of the box")
    g.add_argument("--threshold", type=float, default=threshold, help=f"quantile level (default {threshold:g})")
    g.add_argument("--normalization", choices=["power", "mean"], default="power",
                   help="band normalisation: power (default) or mean (the MATLAB reference)")
    g.add_argument("--quadrature", choices=["riesz", "eco"], default="riesz",
                   help="riesz (exact, default) or eco (the reference's approximation, fewer FFTs)")
    g.add_argument("--compat-matlab-floor", action="store_true",
                   help="band centres at the reference's integer Fourier voxels")
    g.add_argument("--fft-strategy", choices=["auto", "gather", "slab"], default="auto")


def band_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(resolution_range=tuple(args.resolution_range), band_sigma=args.band_sigma,
                band_width_voxels=args.band_width_voxels, threshold=args.threshold,
                normalization=args.normalization, quadrature=args.quadrature,
                compat_matlab_floor=args.compat_matlab_floor, fft_strategy=args.fft_strategy)


def open_inputs(args: argparse.Namespace, *, need_mask_message: str = "") -> tuple[Any, Any, dict]:
    """Open the map (or average two half maps) and the mask (or make an automatic one)."""
    from ..errors import ParameterError
    from ..io import open_map
    from ..ops.spiral import auto_mask
    from ..volume import check_aligned, like

    if len(args.maps) > 2:
        raise ParameterError(f"give one map or two half maps, got {len(args.maps)} files")
    vols = [open_map(p, chunks=args.chunks, voxel_size=args.voxel_size) for p in args.maps]
    if len(vols) == 2:
        check_aligned(*vols, names=list(args.maps))
        vol = like(vols[0], (vols[0].data + vols[1].data) / 2, name="average")
    else:
        vol = vols[0]
    if args.mask:
        mask = open_map(args.mask, chunks=args.chunks, voxel_size=args.voxel_size)
        check_aligned(vol, mask, names=[args.maps[0], args.mask])
        report = {"source": args.mask}
    else:
        am = auto_mask(vol, n_sigma=args.auto_mask_sigma, min_voxels=args.auto_mask_min_voxels)
        mask = am.mask
        report = {"source": "automatic", **am.to_dict()}
        print(f"warning: no --mask given: automatic mask at {am.choice.threshold:.4g} "
              f"({am.choice.n_sigma:g} σ above the corner noise), {am.choice.components_kept} component(s) kept, "
              f"{am.choice.components_removed} removed, {100 * am.choice.fraction:.1f}% of the box"
              + (f"; {need_mask_message}" if need_mask_message else ""))
    return vol, mask, report


def save_all(vols: dict[str, Any], paths: dict[str, Any], *, extra: dict[str, Any] | None = None,
             progress: bool) -> dict[str, Any]:
    """Persist the Volumes and ``extra`` arrays together (one pass through the band graph), write
    each Volume, and return ``extra`` as numpy arrays."""
    import dask.array as da
    import numpy as np

    from ..engine.cluster import persist
    from ..io import save

    names = list(vols)
    extra = {k: v for k, v in (extra or {}).items() if v is not None}
    lazy = [vols[n].data for n in names] + [extra[k] for k in extra]
    done = persist(*lazy, progress=progress, label="spiral bands")
    for n, d in zip(names, done[: len(names)]):
        save(vols[n].copy(data=d), paths[n], progress=False)
    out = {}
    for k, d in zip(extra, done[len(names):]):
        out[k] = np.asarray(d.compute() if isinstance(d, da.Array) else d)
    return out


def add_args(parser: argparse.ArgumentParser) -> None:
    add_input_args(parser)
    add_band_args(parser, default_range=(25.0, 3.0), threshold=0.9,
                  n_bands_help="number of bands (default: one per band width σ across the range)")
    g = parser.add_argument_group("LocSpiral")
    g.add_argument("--no-snr-weighting", action="store_true", help="do not weight bands by m/(m + q)")
    g.add_argument("--bsharpen", action="store_true",
                   help="LocBSharpen: amplitudes above --reference-resolution held at their value there")
    g.add_argument("--reference-resolution", type=float, metavar="Å", default=15.0,
                   help="LocBSharpen reference resolution (default 15 Å)")
    add_compute_args(parser)


def main(args: argparse.Namespace) -> int:
    from ..ops.spiral import locbsharpen, locspiral, plot_slices

    out = check_output(args.out, *args.maps, args.mask)
    ext = ".zarr" if str(out).endswith(".zarr") else ".mrc"
    quality_out = sidecar(out, "_quality" + ext)
    t0 = time.perf_counter()
    with compute_session(args) as session:
        vol, mask, mask_report = open_inputs(args)
        print(f"chunkem locspiral: {args.maps[0]} {tuple(vol.shape)} on {session.describe()}")
        kw = dict(mask=mask, n_bands=args.n_bands, snr_weighting=not args.no_snr_weighting, **band_kwargs(args))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if args.bsharpen:
                res = locbsharpen(vol, reference_resolution=args.reference_resolution, **kw)
            else:
                res = locspiral(vol, **kw)
            got = save_all({"map": res.map, "quality": res.quality}, {"map": out, "quality": quality_out},
                           extra={"noise": res.noise}, progress=not args.no_progress)
        res.noise = got["noise"]
        info = session.to_dict()
    from ..io import open_map

    saved = open_map(out)
    png = plot_slices({"input": vol, "LocBSharpen" if args.bsharpen else "LocSpiral": saved},
                      sidecar(out, "_slices.png"), title=f"{args.maps[0]}")
    for msg in {str(w.message) for w in caught}:
        print(f"warning: {msg}")
    elapsed = time.perf_counter() - t0
    report = {"verb": "locspiral", "maps": args.maps, "mask": mask_report, "output": str(out),
              "quality_output": str(quality_out), **res.to_dict(),
              "compute": info, "elapsed_s": round(elapsed, 3)}
    jp = write_json(sidecar(out, ".json"), report)
    print(f"{res.bank.n_bands} bands {args.resolution_range[0]:g} → {args.resolution_range[1]:g} Å; "
          f"wrote {out}, {quality_out}, {jp}, {png} in {elapsed:.1f} s")
    return 0
