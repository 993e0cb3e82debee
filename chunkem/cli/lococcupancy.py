"""LocOccupancy: local occupancy map (fraction of spiral-phase bands with significant amplitude).

For each band between LOW and HIGH Å, a voxel counts when its local
amplitude reaches the --threshold quantile (default 0.25) of the amplitudes
inside the molecule mask; the occupancy is the fraction of bands counted
(in [0, 1]; a uniformly occupied molecule averages about 1 − threshold).
With --reference-mask (the mask of a mature/reference map) the maturity
index is reported: the fraction of the reference mask covered by voxels of
occupancy > --occupancy-level. Writes OUT, OUT.json and OUT_slices.png.

Examples
--------
  chunkem lococcupancy map.mrc --mask mask.mrc --resolution-range 25 10 -o occupancy.mrc
  chunkem lococcupancy half1.mrc half2.mrc --mask mask.mrc -o occ.mrc --reference-mask mature_mask.mrc
"""

from __future__ import annotations

import argparse
import time
import warnings

from .common import add_compute_args, check_output, compute_session, sidecar, write_json
from .locspiral import add_band_args, add_input_args, band_kwargs, open_inputs, save_all


def add_args(parser: argparse.ArgumentParser) -> None:
    add_input_args(parser)
    add_band_args(parser, default_range=(25.0, 10.0), threshold=0.25,
                  n_bands_help="number of bands (default: one per band width σ across the range)")
    g = parser.add_argument_group("maturity index")
    g.add_argument("--reference-mask", default=None, help="mask of the reference (mature) map")
    g.add_argument("--occupancy-level", type=float, default=0.5,
                   help="occupancy above which a voxel counts as present (default 0.5)")
    add_compute_args(parser)


def main(args: argparse.Namespace) -> int:
    import numpy as np

    from ..io import open_map
    from ..ops.spiral import lococcupancy, maturity_index, plot_slices
    from ..volume import check_aligned

    out = check_output(args.out, *args.maps, args.mask, args.reference_mask)
    t0 = time.perf_counter()
    with compute_session(args) as session:
        vol, mask, mask_report = open_inputs(args)
        ref = None
        if args.reference_mask:
            ref = open_map(args.reference_mask, chunks=args.chunks, voxel_size=args.voxel_size)
            check_aligned(vol, ref, names=[args.maps[0], args.reference_mask])
        print(f"chunkem lococcupancy: {args.maps[0]} {tuple(vol.shape)} on {session.describe()}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = lococcupancy(vol, mask=mask, n_bands=args.n_bands, **band_kwargs(args))
            got = save_all({"occupancy": res.occupancy}, {"occupancy": out}, extra={"quantiles": res.quantiles},
                           progress=not args.no_progress)
        res.quantiles = got["quantiles"]
        saved = open_map(out)
        maturity = maturity_index(saved, ref, occupancy_threshold=args.occupancy_level) if ref is not None else None
        mask_mem = mask.copy(data=np.asarray(mask.values))
        info = session.to_dict()
    occ = np.asarray(saved.values)
    inside = np.asarray(mask_mem.values) > 0.5
    summary = {"mean_in_mask": float(occ[inside].mean()), "median_in_mask": float(np.median(occ[inside])),
               "fraction_above_level_in_mask": float(np.mean(occ[inside] > args.occupancy_level))}
    png = plot_slices({"occupancy": saved}, sidecar(out, "_slices.png"), mask=mask_mem,
                      cmaps={"occupancy": "viridis"}, title=str(args.maps[0]))
    for msg in {str(w.message) for w in caught}:
        print(f"warning: {msg}")
    elapsed = time.perf_counter() - t0
    report = {"verb": "lococcupancy", "maps": args.maps, "mask": mask_report, "output": str(out),
              "summary_in_mask": summary, "maturity": maturity.to_dict() if maturity else None,
              **res.to_dict(), "compute": info, "elapsed_s": round(elapsed, 3)}
    jp = write_json(sidecar(out, ".json"), report)
    mi = f"; maturity index {maturity.index:.3f}" if maturity else ""
    print(f"occupancy in the mask: mean {summary['mean_in_mask']:.3f}{mi} ({res.bank.n_bands} bands)")
    print(f"wrote {out}, {jp}, {png} in {elapsed:.1f} s")
    return 0
