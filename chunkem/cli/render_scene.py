"""Render many copies of a model into a large volume (a synthetic tomogram), tile by tile.

Copies of MODEL are placed at the positions and orientations of a particle
list: a CSV (columns x, y, z in Å, optional rot, tilt, psi RELION Euler
angles in degrees or r11..r33 matrix columns) or a RELION STAR file
(rlnCoordinateX/Y/Z in pixels x --pixel-size or the optics pixel size, or
RELION 5 rlnCenteredCoordinateX/Y/ZAngst; rlnAngleRot/Tilt/Psi, ZYZ: the
particle is the model rotated by RELION's matrix A(rot, tilt, psi) about
--center). The scene is rendered one dask task per output tile, each tile
rendering only the copies that reach it, and streamed to the output (use
.zarr for volumes larger than memory). Images: finite-resolution atomic
images at --resolution (default when given), else Gaussian atoms with a
sampling blur. Writes OUT.json (parameters, copies rendered, timing).

Examples
--------
  chunkem render-scene 5me2.pdb particles.star --pixel-size 10 --shape 200 1024 1024 --voxel-size 10 -d 20 -o tomo.zarr
  chunkem render-scene model.cif picks.csv --like tomogram.mrc --resolution 12 -o synthetic.zarr
  chunkem render-scene model.pdb picks.csv --shape 256 --voxel-size 2 --method gaussian --center mean -o scene.mrc
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np

from ..errors import ParameterError

from .common import add_compute_args, check_output, compute_session, sidecar, write_json


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="atomic model (PDB / mmCIF, optionally .gz)")
    parser.add_argument("particles", help="particle list: .csv (x, y, z Å [, rot, tilt, psi]) or RELION .star")
    parser.add_argument("-o", "--output", default="scene.zarr",
                        help="output volume (.zarr for large scenes, or .mrc); OUT.json beside it")
    g = parser.add_argument_group("grid")
    g.add_argument("--like", metavar="MAP", default=None, help="render on this map's grid (shape, voxel size, origin)")
    g.add_argument("--shape", type=int, nargs="+", metavar="N", default=None,
                   help="grid shape in voxels: NZ NY NX, or one number for a cube")
    g.add_argument("--voxel-size", type=float, metavar="Å", default=None, help="voxel size of a new grid")
    g.add_argument("--origin", type=float, nargs=3, metavar=("Z", "Y", "X"), default=(0.0, 0.0, 0.0),
                   help="position (Å) of voxel (0, 0, 0) of a new grid (default 0 0 0)")
    g = parser.add_argument_group("particles")
    g.add_argument("--pixel-size", type=float, metavar="Å", default=None,
                   help="Å per pixel of STAR rlnCoordinateX/Y/Z (default: from data_optics)")
    g.add_argument("--tomo-name", default=None, help="STAR: keep the particles of this rlnTomoName")
    g.add_argument("--center", default="bounds", metavar="bounds|mean|X,Y,Z",
                   help="model point placed at each particle position (rotation centre); default the middle of "
                        "the model's bounding box")
    g.add_argument("--outside", choices=["error", "warn", "ignore"], default="error",
                   help="copies entirely outside the box: fail (default), skip with a warning, or skip")
    g = parser.add_argument_group("rendering")
    g.add_argument("--resolution", "-d", type=float, metavar="Å", default=None,
                   help="resolution of the finite-resolution atomic images (Å)")
    g.add_argument("--method", choices=["analytic", "gaussian"], default=None,
                   help="analytic finite-resolution images (default with --resolution) or Gaussian atoms")
    g.add_argument("--blur", type=float, metavar="Å²", default=None,
                   help="gaussian: extra B on every atom (default: Refmac-compatible sampling blur)")
    g.add_argument("--cutoff", type=float, default=1e-5, help="gaussian: density level where an atom is cut")
    g.add_argument("--soft-edge", type=float, metavar="1/Å", default=0.0,
                   help="analytic: raised-cosine resolution edge width, ending at 1/d (default 0 = sharp)")
    g.add_argument("--radius-factor", type=float, default=2.5,
                   help="analytic images are truncated at this many d (default 2.5)")
    g.add_argument("--table", choices=["electron", "xray"], default="electron", help="scattering table")
    add_compute_args(parser)


def _center(text: str):
    if text in ("bounds", "mean"):
        return text
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != 3:
        raise ParameterError(f"--center {text!r}: use bounds, mean or X,Y,Z in Å")
    return vals


def main(args: argparse.Namespace) -> int:
    from ..io import open_map, save
    from ..io.model import open_model
    from ..ops.scene import read_particles, render_scene

    t0 = time.perf_counter()
    out = check_output(args.output, args.model, args.particles, args.like)
    center = _center(args.center)
    like = open_map(args.like, chunks=args.chunks) if args.like else None
    if like is not None:
        if args.shape is not None or args.voxel_size is not None:
            raise ParameterError("give either --like MAP or --shape/--voxel-size, not both")
        grid = dict(shape=like.shape, voxel_size=like.attrs["voxel_size"], origin=like.attrs["origin"])
    else:
        if args.shape is None or args.voxel_size is None:
            raise ParameterError("give --like MAP, or --shape and --voxel-size for a new grid")
        if len(args.shape) not in (1, 3):
            raise ParameterError(f"--shape {args.shape}: give NZ NY NX or one number")
        shape = tuple(args.shape) * 3 if len(args.shape) == 1 else tuple(args.shape)
        grid = dict(shape=shape, voxel_size=args.voxel_size, origin=tuple(args.origin))
    model = open_model(args.model)
    particles = read_particles(args.particles, pixel_size=args.pixel_size, tomo_name=args.tomo_name, **grid)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        n_vox = int(like.size) if like is not None else int(np.prod(grid["shape"]))
        with compute_session(args, nbytes_hint=n_vox * 4) as session:
            # built inside the session: large atom tables are scattered to the workers
            if like is not None:
                vol = render_scene(model, particles, like=like, chunks=args.chunks, **_render_kw(args, center))
            else:
                vol = render_scene(model, particles, chunks=args.chunks, **grid, **_render_kw(args, center))
            info_scene = vol.attrs["scene"]
            print(f"chunkem render-scene: {info_scene['n_copies_rendered']} of {len(particles)} copies of "
                  f"{args.model} ({len(model)} atoms) -> {tuple(vol.shape)} voxels of "
                  f"{vol.attrs['voxel_size'][0]:.4g} Å on {session.describe()}")
            save(vol, out, progress=not args.no_progress)
            info = session.to_dict()
    msgs = [str(w.message) for w in caught]
    for m in msgs:
        print(f"warning: {m}")
    elapsed = time.perf_counter() - t0
    report = {
        "verb": "render-scene",
        "model": args.model,
        "particles": args.particles,
        "like": args.like,
        "output": str(out),
        "shape": list(vol.shape),
        "voxel_size_A": list(vol.attrs["voxel_size"]),
        "origin_A": list(vol.attrs["origin"]),
        **info_scene,
        "warnings": msgs,
        "compute": info,
        "elapsed_s": round(elapsed, 3),
    }
    rp = write_json(sidecar(out, ".json"), report)
    print(f"wrote {out} and {rp} in {elapsed:.1f} s")
    return 0


def _render_kw(args: argparse.Namespace, center) -> dict:
    return dict(resolution=args.resolution, method=args.method, blur=args.blur, cutoff=args.cutoff,
                soft_edge=args.soft_edge, radius_factor=args.radius_factor, table=args.table,
                model_center=center, outside=args.outside)
