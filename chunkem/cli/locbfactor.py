"""LocBFactor: local B-factor and intercept maps from per-voxel Guinier fits of spiral-phase bands.

For N bands between LOW and HIGH Å, the local amplitude of each band (Riesz
transform envelope, weighted by m/(m + q) against the background noise
quantile q) gives a point (s², ln amplitude) of each voxel's local Guinier
plot; a line is fitted per voxel. The local B is written in RELION sign,
B = 4 × slope (negative for decaying amplitudes; −80 means the local
amplitudes fall like a decay B of 80 Å²). Writes OUT (local B, Å²),
OUT_intercept (ln amplitude at s = 0), OUT_r2 (fit quality), OUT.json
(summary in the mask, global Guinier B of shells and of the same bands, the
bands, the probes' Guinier points),
OUT_guinier.png (local Guinier plots at a core, a periphery and a background
voxel, or --probe voxels) and OUT_slices.png.

Examples
--------
  chunkem locbfactor map.mrc --mask mask.mrc --resolution-range 15 3.2 -o localB.mrc
  chunkem locbfactor half1.mrc half2.mrc --mask mask.mrc --resolution-range 15 4.25 --n-bands 10 \\
      --drop-below-noise --band-width-voxels 8 -o localB.mrc
  chunkem locbfactor map.mrc --mask mask.mrc -o localB.mrc --probe site 40 52 61
"""

from __future__ import annotations

import argparse
import time
import warnings

from .common import add_compute_args, check_output, compute_session, sidecar, write_json
from .locspiral import add_band_args, add_input_args, band_kwargs, open_inputs, save_all


def add_args(parser: argparse.ArgumentParser) -> None:
    add_input_args(parser)
    add_band_args(parser, default_range=(15.0, 4.0), threshold=0.9,
                  n_bands_help="points on each local Guinier plot (default 10)")
    g = parser.add_argument_group("LocBFactor")
    g.add_argument("--no-snr-weighting", action="store_true", help="fit ln(m) rather than ln(m·m/(m + q))")
    g.add_argument("--drop-below-noise", action="store_true",
                   help="fit only the points above the band's noise level (voxels left with < 2: NaN)")
    g.add_argument("--probe", nargs=4, action="append", metavar=("NAME", "Z", "Y", "X"), default=None,
                   help="a voxel (z y x indices) to show on the Guinier plot; repeatable "
                        "(default: automatic core, periphery, background)")
    add_compute_args(parser)


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from ..errors import ParameterError
    from ..ops.spiral import choose_probes, guinier_b, locbfactor, plot_guinier, plot_slices

    out = check_output(args.out, *args.maps, args.mask)
    ext = ".zarr" if str(out).endswith(".zarr") else ".mrc"
    paths = {"b_factor": out, "intercept": sidecar(out, "_intercept" + ext), "quality": sidecar(out, "_r2" + ext)}
    t0 = time.perf_counter()
    with compute_session(args) as session:
        vol, mask, mask_report = open_inputs(args)
        print(f"chunkem locbfactor: {args.maps[0]} {tuple(vol.shape)} on {session.describe()}")
        mask_mem = mask.copy(data=np.asarray(mask.values))
        if args.probe:
            try:
                probes = {p[0]: tuple(int(v) for v in p[1:]) for p in args.probe}
            except ValueError:
                raise ParameterError(f"--probe NAME Z Y X needs integer voxel indices, got {args.probe}") from None
        else:
            probes = choose_probes(mask_mem, map_vol=vol if vol.size <= 256**3 else None)
        n_bands = 10 if args.n_bands is None else args.n_bands
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = locbfactor(vol, mask=mask, n_bands=n_bands, snr_weighting=not args.no_snr_weighting,
                             drop_below_noise=args.drop_below_noise, probes=probes, **band_kwargs(args))
            vols = {"b_factor": res.b_factor, "intercept": res.intercept, "quality": res.quality}
            got = save_all(vols, paths, extra={"noise": res.noise, "probes": res.probe_amplitudes,
                                               "n_points": res.n_points.data if args.drop_below_noise else None},
                           progress=not args.no_progress)
            glob = guinier_b(vol, resolution_range=tuple(args.resolution_range), mask=mask,
                             fft_strategy=args.fft_strategy, bank=res.bank)
        info = session.to_dict()
    from ..io import open_map

    res.noise = got["noise"]
    res.probe_amplitudes = got.get("probes")
    saved = {k: open_map(p) for k, p in paths.items()}
    res.b_factor, res.intercept, res.quality = saved["b_factor"], saved["intercept"], saved["quality"]
    summary = res.summary(mask_mem)
    if "n_points" in got:
        summary["voxels_without_fit_in_mask"] = int(np.count_nonzero((got["n_points"] < 2)
                                                                     & (np.asarray(mask_mem.values) > 0.5)))
    plot_guinier(res, sidecar(out, "_guinier.png"))
    plot_slices({"local B (RELION sign, Å²)": saved["b_factor"], "r²": saved["quality"]},
                sidecar(out, "_slices.png"), mask=mask_mem,
                cmaps={"local B (RELION sign, Å²)": "viridis", "r²": "magma"}, title=str(args.maps[0]))
    for msg in {str(w.message) for w in caught}:
        print(f"warning: {msg}")
    elapsed = time.perf_counter() - t0
    report = {"verb": "locbfactor", "maps": args.maps, "mask": mask_report,
              "outputs": {k: str(p) for k, p in paths.items()}, "summary_in_mask": summary,
              "global_guinier_masked": glob.to_dict(), **res.to_dict(), "compute": info,
              "elapsed_s": round(elapsed, 3)}
    jp = write_json(sidecar(out, ".json"), report)
    print(f"local B in the mask (RELION sign): mean {summary.get('mean_b_A2', float('nan')):.1f} Å², "
          f"median {summary.get('median_b_A2', float('nan')):.1f} Å²; global Guinier B {glob.b_relion:.1f} Å² "
          f"(shells), {glob.b_relion_bands:.1f} Å² (same bands) "
          f"({res.bank.n_bands} bands, {args.resolution_range[0]:g} → {args.resolution_range[1]:g} Å)")
    print(f"wrote {out}, {paths['intercept']}, {paths['quality']}, {jp} and plots in {elapsed:.1f} s")
    return 0
