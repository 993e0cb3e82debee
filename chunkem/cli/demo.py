"""Build a phantom and run every chunkem capability on it (start here).

The phantom is a procedurally generated protein-like model (helices and
strands with real backbone geometry) rendered to two noisy half maps with a
spatially varying blur. It is stored as OME-Zarr, reopened lazily, and every
stage (filters, FSC and postprocess, model maps, local B...) runs on it. A
summary is printed and ``demo_report.json`` is written in the output folder.

Examples
--------
  chunkem demo
  chunkem demo --out /tmp/demo --box 64
  chunkem demo --stages fsc spiral
"""

from __future__ import annotations

import argparse

from .common import add_compute_args, compute_session


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="chunkem-demo", help="output folder (default ./chunkem-demo)")
    parser.add_argument("--box", type=int, default=None, help="phantom box edge in voxels")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the phantom")
    parser.add_argument("--stages", nargs="+", default=None, help="run only these stages")
    add_compute_args(parser)


def main(args: argparse.Namespace) -> int:
    from ..ops.demo import run_demo

    with compute_session(args) as session:
        print(f"chunkem demo on {session.describe()}")
        run_demo(args.out, box=args.box, seed=args.seed, stages=args.stages)
    return 0
