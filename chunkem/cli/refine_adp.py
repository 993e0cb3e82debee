"""Refine atomic B-factors (and occupancies) against a map in real space.

L-BFGS-B on per-atom (or per-residue) isotropic B, optionally per-group
occupancies, with analytic gradients of finite-resolution atomic images
rendered tile by tile (no Fourier transforms in the loop). Target: the
real-space correlation over voxels near the atoms (default), or a least-squares
target on a fixed scale (default when refining occupancies). Restraints keep
bonded atoms in different groups at similar B. Writes the refined model
(PDB or mmCIF, from the output name) and OUT.json with CC before/after
(the refinement's own CC and CC_mask from map-model metrics).

Examples
--------
  chunkem refine-adp 5me2.pdb emd_3488.mrc --resolution 3.2 -o 5me2_refined.pdb
  chunkem refine-adp model.cif map.mrc --resolution 3.5 --group residue -o refined.cif
  chunkem refine-adp model.pdb map.mrc --resolution 2.8 --occupancy --scale 1.0 -o refined.pdb
"""

from __future__ import annotations

import argparse
import time
import warnings

from .common import add_compute_args, check_output, compute_session, sidecar, write_json


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="atomic model (PDB / mmCIF) in the map's frame")
    parser.add_argument("map", help="map (MRC / CCP4 / .zarr)")
    parser.add_argument("--resolution", "-d", type=float, metavar="Å", required=True, help="map resolution d (Å)")
    parser.add_argument("-o", "--output", default="refined.pdb",
                        help="refined model (.pdb / .cif; default refined.pdb); OUT.json beside it")
    g = parser.add_argument_group("refinement")
    g.add_argument("--group", choices=["atom", "residue"], default="atom", help="B groups (default atom)")
    g.add_argument("--occupancy", action="store_true", help="also refine occupancies")
    g.add_argument("--occupancy-group", choices=["atom", "residue"], default="residue")
    g.add_argument("--no-b", action="store_true", help="do not refine B (occupancies only)")
    g.add_argument("--target", choices=["cc", "ls"], default=None,
                   help="cc (default for B) or ls (default with --occupancy)")
    g.add_argument("--scale", default="auto",
                   help="ls target: map scale k (map * k ~ model), or 'auto' to fit it once at the start")
    g.add_argument("--offset", type=float, default=0.0, help="ls target: map offset c (with a numeric --scale)")
    g.add_argument("--restraint-weight", type=float, default=0.01,
                   help="weight of the similar-B restraint between bonded atoms (default 0.01; 0 = none)")
    g.add_argument("--b-min", type=float, default=1.0, metavar="Å²")
    g.add_argument("--b-max", type=float, default=300.0, metavar="Å²")
    g.add_argument("--max-iter", type=int, default=50, help="L-BFGS-B iterations (default 50)")
    g.add_argument("--mask-radius", type=float, default=None, metavar="Å",
                   help="voxels within this distance of an atom enter the target (default: mtriage atom radius)")
    g.add_argument("--soft-edge", type=float, default=0.0, metavar="1/Å")
    g.add_argument("--no-metrics", action="store_true", help="skip CC_mask before/after")
    add_compute_args(parser)


def _model_sidecar(path, suffix: str):
    from pathlib import Path

    from ..io.model import MODEL_SUFFIXES

    p = Path(path)
    for ext in sorted(MODEL_SUFFIXES, key=len, reverse=True):
        if p.name.lower().endswith(ext):
            return p.with_name(p.name[: -len(ext)] + suffix)
    return sidecar(p, suffix)


def main(args: argparse.Namespace) -> int:
    from ..errors import ParameterError
    from ..io import open_map
    from ..io.model import open_model, save_model
    from ..ops.metrics import map_model_metrics
    from ..ops.refine import refine_adp

    t0 = time.perf_counter()
    out = check_output(args.output, args.model, args.map)
    model = open_model(args.model)
    vol = open_map(args.map, chunks=args.chunks)
    try:
        scale = "auto" if str(args.scale) == "auto" else float(args.scale)
    except ValueError:
        raise ParameterError(f"--scale {args.scale!r}: give a number or 'auto'") from None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        with compute_session(args, nbytes_hint=int(vol.size) * 4) as session:
            print(f"chunkem refine-adp: {args.model} ({len(model)} atoms) against {args.map} "
                  f"{tuple(vol.shape)} at {args.resolution} Å on {session.describe()}")
            r = refine_adp(model, vol, resolution=args.resolution, group=args.group, refine_b=not args.no_b,
                           refine_occupancy=args.occupancy, occupancy_group=args.occupancy_group,
                           target=args.target, scale=scale, offset=args.offset,
                           restraint_weight=args.restraint_weight,
                           bounds={"b": (args.b_min, args.b_max)}, max_iter=args.max_iter,
                           mask_radius=args.mask_radius, soft_edge=args.soft_edge)
            metrics = {}
            if not args.no_metrics:
                before = map_model_metrics(vol, model, resolution=args.resolution, per_residue=False, fsc=False)
                after = map_model_metrics(vol, r.model, resolution=args.resolution, per_residue=False, fsc=False)
                metrics = {"cc_mask_before": before.cc_mask, "cc_mask_after": after.cc_mask,
                           "cc_box_before": before.cc_box, "cc_box_after": after.cc_box}
            info = session.to_dict()
    save_model(r.model, out)
    msgs = [str(w.message) for w in caught]
    for m in msgs:
        print(f"warning: {m}")
    elapsed = time.perf_counter() - t0
    report = {"verb": "refine-adp", "model": args.model, "map": args.map, "output": str(out),
              "resolution_A": args.resolution, **r.to_dict(), **metrics, "warnings": msgs,
              "compute": info, "elapsed_s": round(elapsed, 3)}
    rp = write_json(_model_sidecar(out, ".json"), report)
    line = f"CC {r.cc_before:.4f} -> {r.cc_after:.4f}"
    if metrics:
        line += f"; CC_mask {metrics['cc_mask_before']:.4f} -> {metrics['cc_mask_after']:.4f}"
    print(f"{line} ({r.n_iterations} iterations, {r.message})")
    print(f"wrote {out} and {rp} in {elapsed:.1f} s")
    return 0
