"""Show a map's header facts and its statistics, computed chunk by chunk.

Prints shape (z, y, x), voxel size and origin (Å) and, for MRC files, the
mode, NX/NY/NZSTART, axis order (MAPC/MAPR/MAPS), sampling (MX/MY/MZ),
cell, space group and labels; then min, max, mean and standard deviation
over the finite voxels and the number of NaN and Inf voxels (maps open
lazily, so this is where non-finite values are found). --json prints the
same facts as JSON on stdout; --report FILE writes them to a file.

Examples
--------
  chunkem info emd_3488.mrc
  chunkem info emd_3001.map.gz --json
  chunkem info tomo.zarr --level 1 --no-stats
  chunkem info zero_cell.mrc --voxel-size 1.1
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .common import _jsonable, add_compute_args, compute_session, write_json


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("map", help="map file (.mrc, .map, .ccp4, .mrc.gz, .map.bz2) or OME-Zarr store (.zarr)")
    parser.add_argument("--json", action="store_true", help="print the facts as JSON on stdout")
    parser.add_argument("--report", metavar="FILE", default=None, help="also write the facts as JSON to FILE")
    parser.add_argument("--no-stats", action="store_true", help="header facts only (read nothing but the header)")
    parser.add_argument("--level", type=int, default=0, help="pyramid level of a zarr store (default 0)")
    parser.add_argument("--voxel-size", type=float, nargs="+", metavar="Å", default=None,
                        help="override the header voxel size (one value, or z y x)")
    add_compute_args(parser)


def _fmt(values: Any, fmt: str = "{:.6g}") -> str:
    if values is None:
        return "-"
    return " ".join(fmt.format(v) for v in values)


def _text(facts: dict[str, Any]) -> str:
    rows = [("file", f"{facts['source']} ({facts['format']})")]
    rows.append(("shape", f"{_fmt(facts['shape'], '{}')} (z, y, x)"))
    rows.append(("voxel size", f"{_fmt(facts['voxel_size'])} Å (z, y, x)"))
    org = f"{_fmt(facts['origin'])} Å (z, y, x)"
    if facts.get("origin_from"):
        org += f", from {'ORIGIN' if facts['origin_from'] == 'origin' else facts['origin_from'].upper()}"
    rows.append(("origin", org))
    if facts.get("mode") is not None:
        comp = f", {facts['compression']}" if facts.get("compression") else ""
        rows.append(("mode", f"{facts['mode']} ({facts['dtype']}{comp})"))
        rows.append(("nstart", f"{_fmt(facts['nstart'], '{}')} (NX/NY/NZSTART)"))
        axes = "".join("XYZ"[a - 1] for a in facts["axis_order"])
        rows.append(("axis order", f"{_fmt(facts['axis_order'], '{}')} (MAPC/MAPR/MAPS: columns, rows, sections "
                                   f"along {axes[0]}, {axes[1]}, {axes[2]})"))
        rows.append(("sampling", f"{_fmt(facts['sampling'], '{}')} (MX/MY/MZ)"))
        rows.append(("cell", f"{_fmt(facts['cell'])} Å, {_fmt(facts['cell_angles'])}°"))
        rows.append(("space group", str(facts["space_group"])))
        if facts.get("extended_header_bytes"):
            rows.append(("ext. header", f"{facts['extended_header_bytes']} bytes {facts.get('exttyp') or ''}".rstrip()))
        for i, lab in enumerate(facts.get("labels") or []):
            rows.append(("labels" if i == 0 else "", lab))
    if facts.get("chunks"):
        rows.append(("chunks", f"{_fmt(facts['chunks'], '{}')} (z, y, x)"))
    st = facts.get("stats")
    if st:
        rows.append(("min / max", f"{st['min']:.6g} / {st['max']:.6g}"))
        rows.append(("mean / std", f"{st['mean']:.6g} / {st['std']:.6g}"))
        rows.append(("non-finite", f"NaN {st['nan_count']}, Inf {st['inf_count']}"))
    return "\n".join(f"{k:<12} {v}" for k, v in rows)


def main(args: argparse.Namespace) -> int:
    from ..errors import ParameterError
    from ..io import map_facts, map_stats, open_map

    vs = args.voxel_size
    if vs is not None and len(vs) not in (1, 3):
        raise ParameterError(f"--voxel-size takes 1 or 3 values (z y x), got {len(vs)}")
    vol = open_map(args.map, chunks=args.chunks, voxel_size=(vs[0] if vs and len(vs) == 1 else vs), level=args.level)
    facts = map_facts(vol)
    if not args.no_stats:
        with compute_session(args, nbytes_hint=int(vol.size) * 4):
            facts["stats"] = map_stats(vol, progress=not args.no_progress).to_dict()
    if args.json:
        print(json.dumps(_jsonable(facts), indent=2))
    else:
        print(_text(facts))
    if args.report:
        write_json(args.report, facts)
    sys.stdout.flush()
    return 0
