"""Map–model fit: CC_mask, CC_box, CC_volume, CC_peaks, per-residue CC, map–model FSC.

The model map is rendered on the map's grid at --resolution (electron form
factors, the model's B and occupancy, sharp cut at 1/d) and compared with the
map over the selections of phenix.map_model_cc (molecular mask, whole box,
top voxels of the model map, union of the top voxels of both); per-residue CC
over voxels within the atom radius of each residue; map–model FSC of the
map and the model map inside an atom mask. Writes OUT.json (all numbers and
the FSC curve), OUT_residues.csv and OUT.png (per-residue CC, FSC).

Examples
--------
  chunkem map-model emd_3488.mrc 5me2.pdb --resolution 3.2
  chunkem map-model map.mrc model.cif --resolution 3.5 -o results/fit
"""

from __future__ import annotations

import argparse
import time
import warnings

from .common import add_compute_args, compute_session, write_json


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map", help="map (MRC / CCP4 / .zarr)")
    parser.add_argument("model", help="atomic model (PDB / mmCIF) in the map's frame")
    parser.add_argument("--resolution", "-d", type=float, metavar="Å", required=True, help="map resolution d (Å)")
    parser.add_argument("-o", "--out", default="map_model",
                        help="output prefix: PREFIX.json, PREFIX_residues.csv, PREFIX.png (default ./map_model)")
    parser.add_argument("--atom-radius", type=float, metavar="Å", default=None,
                        help="radius of per-residue / FSC selections (default: mtriage rule)")
    parser.add_argument("--no-fsc", action="store_true", help="skip the map–model FSC")
    add_compute_args(parser)


def main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..io import open_map
    from ..io.model import open_model
    from ..ops.metrics import map_model_metrics

    t0 = time.perf_counter()
    vol = open_map(args.map, chunks=args.chunks)
    model = open_model(args.model)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        with compute_session(args, nbytes_hint=int(vol.size) * 4) as session:
            print(f"chunkem map-model: {args.map} {tuple(vol.shape)} vs {args.model} ({len(model)} atoms) "
                  f"on {session.describe()}")
            r = map_model_metrics(vol, model, resolution=args.resolution, atom_radius=args.atom_radius,
                                  fsc=not args.no_fsc)
            info = session.to_dict()
    msgs = [str(w.message) for w in caught]
    for m in msgs:
        print(f"warning: {m}")
    elapsed = time.perf_counter() - t0
    report = {"verb": "map-model", "map": args.map, "model": args.model, **r.to_dict(per_residue=False),
              "warnings": msgs, "compute": info, "elapsed_s": round(elapsed, 3)}
    jp = write_json(f"{args.out}.json", report)
    r.residue_csv(f"{args.out}_residues.csv")
    r.plot(f"{args.out}.png", title=f"{Path(args.map).name} vs {Path(args.model).name}")
    print(f"CC_mask {r.cc_mask:.4f}  CC_box {r.cc_box:.4f}  CC_volume {r.cc_volume:.4f}  CC_peaks {r.cc_peaks:.4f}"
          + (f"  FSC=0.5 at {r.fsc['d_fsc_05']:.2f} Å" if r.fsc else ""))
    print(f"wrote {jp}, {args.out}_residues.csv, {args.out}.png in {elapsed:.1f} s")
    return 0
