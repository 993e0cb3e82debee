"""Scenes: many copies of one atomic model rendered into a large volume, tile by tile.

:func:`render_scene` places copies of a model at given positions and
orientations (a :class:`Particles` list, e.g. read by :func:`read_particles`
from a CSV or RELION STAR file) and renders them into a volume — a synthetic
tomogram — one dask task per output tile. Copies are binned into tiles by a
bounding sphere (:func:`chunkem.engine.atoms.bin_atoms` on the copy
positions, reach = the model's extent about its rotation centre plus the
largest atom radius); each tile transforms only its own copies, keeps the
atoms whose image reaches it and renders them
(:func:`chunkem.kernels.scene.render_copies_block`). No task holds more than
one tile, so a scene far larger than memory streams to zarr with
:func:`chunkem.io.save`.

Placement
---------
Copy ``k`` is ``x_scene = R_k · (x_model − c) + t_k`` (x, y, z, Å), with
``c`` the model's rotation centre (``model_center``: the middle of its
bounding box by default, its mean position, or given coordinates — e.g. the
centre of the reference box the model was fitted into) and ``R_k``, ``t_k``
from the particle list. RELION Euler angles ``(rot, tilt, psi)`` (degrees,
ZYZ) give ``R_k = A(rot, tilt, psi)``, RELION's ``Euler_angles2matrix``: the
particle in the tomogram is the reference *rotated by A* (RELION's
``ParticleSet::getMatrix4x4`` maps particle (reference) coordinates to
tomogram coordinates with A). See :mod:`chunkem.kernels.scene`.

Images
------
``method="analytic"`` (default when ``resolution`` is given): finite-
resolution atomic images truncated at ``radius_factor · d`` (spec 06 §5) —
band-limited, purely local, no FFT. ``method="gaussian"`` (default
otherwise): sums of Gaussians with each atom's B plus ``blur`` (default the
Refmac-compatible blur, so the grid samples the narrowest atom; it is *not*
removed again — there is no global FFT in a scene). Both equal the sum of
the copies rendered one by one with :func:`chunkem.ops.modelmap.model_map`
(``method="analytic"`` / ``"gaussian"`` and the same blur) on the same grid.

Units: Å, Å² (B and blur, decay convention ``B = 8π² U``, ``B > 0`` blurs),
degrees for angles; density in the units of gemmi's electron tables.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import numpy as np
import xarray as xr

from ..engine.atoms import bin_atoms, grid_like, map_tiles, normalize_chunks
from ..engine.chunks import auto_chunks
from ..errors import GeometryError, InputFileError, ParameterError
from ..kernels.finite_resolution import DEFAULT_RADIUS_FACTOR, DEFAULT_TABLE_STEP
from ..kernels.render import AtomSet, Imaging
from ..kernels.scattering import refmac_blur
from ..kernels.scene import SceneModel, relion_matrix, render_copies_block, rotation_safe_radii
from ..volume import as_triple, make_volume
from .modelmap import atom_set, check_resolution

__all__ = ["Particles", "read_particles", "render_scene", "relion_matrix"]

METHODS = ("analytic", "gaussian")
_MATRIX_COLUMNS = tuple(f"r{i}{j}" for i in (1, 2, 3) for j in (1, 2, 3))


@dataclass
class Particles:
    """Positions and orientations of the copies of a model in a scene.

    Attributes
    ----------
    xyz : ndarray (n, 3)
        Where the model's rotation centre goes: x, y, z in Å, in the frame of
        the scene volume's coordinates (``origin + index · voxel_size``).
    rotation : ndarray (n, 3, 3)
        ``x_scene = rotation[k] · (x_model − c) + xyz[k]`` (proper rotations).
    source : str or None
        File the list was read from.
    """

    xyz: np.ndarray
    rotation: np.ndarray
    source: str | None = None

    def __post_init__(self) -> None:
        where = f"{self.source}: " if self.source else ""
        self.xyz = np.asarray(self.xyz, dtype=np.float64).reshape(-1, 3)
        n = self.xyz.shape[0]
        rot = np.asarray(self.rotation, dtype=np.float64)
        if rot.shape == (3, 3):
            rot = np.broadcast_to(rot, (n, 3, 3))
        if rot.shape != (n, 3, 3):
            raise ParameterError(f"{where}rotation must be (n, 3, 3) for {n} particles, got {rot.shape}")
        self.rotation = np.ascontiguousarray(rot)
        if n == 0:
            raise ParameterError(f"{where}the particle list is empty")
        if not (np.all(np.isfinite(self.xyz)) and np.all(np.isfinite(rot))):
            raise ParameterError(f"{where}particle positions or orientations hold NaN or Inf values")
        err = np.abs(rot @ rot.transpose(0, 2, 1) - np.eye(3)).max(axis=(1, 2))
        det = np.linalg.det(rot)
        bad = np.nonzero((err > 1e-4) | (det < 0))[0]
        if bad.size:
            raise ParameterError(
                f"{where}particle {int(bad[0])} (row {int(bad[0]) + 1}): its rotation matrix is not a proper "
                f"rotation (|R Rᵀ − I| = {err[bad[0]]:.2g}, det = {det[bad[0]]:.4g})"
            )

    def __len__(self) -> int:
        return int(self.xyz.shape[0])

    @classmethod
    def from_euler(cls, xyz: Any, rot: Any = 0.0, tilt: Any = 0.0, psi: Any = 0.0, *,
                   source: str | None = None) -> Particles:
        """Particles from positions (x, y, z, Å) and RELION Euler angles (degrees, ZYZ)."""
        xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
        n = xyz.shape[0]
        angles = [np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)) for v in (rot, tilt, psi)]
        return cls(xyz, relion_matrix(*angles) if n else np.zeros((0, 3, 3)), source=source)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": len(self),
            "source": self.source,
            "xyz_min_A": self.xyz.min(axis=0).tolist(),
            "xyz_max_A": self.xyz.max(axis=0).tolist(),
        }


# ----------------------------------------------------------------------------------------------
# particle lists


def _floats(values: Sequence[Any], what: str, path: Path) -> np.ndarray:
    try:
        out = np.asarray([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        bad = next(i for i, v in enumerate(values) if not _is_float(v))
        raise ParameterError(f"{path}: row {bad + 1}: column {what!r} = {values[bad]!r} is not a number") from None
    if not np.all(np.isfinite(out)):
        raise ParameterError(f"{path}: column {what!r} holds NaN or Inf values")
    return out


def _is_float(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def _read_csv(path: Path) -> Particles:
    try:
        with open(path, newline="") as f:
            lines = [ln for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read ({exc.strerror})") from None
    rows = list(csv.reader(lines))
    if not rows:
        raise ParameterError(f"{path}: empty particle list (expected a header line x,y,z[,rot,tilt,psi])")
    header = [h.strip().lower() for h in rows[0]]
    body = [r for r in rows[1:] if any(c.strip() for c in r)]
    if not body:
        raise ParameterError(f"{path}: the particle list has a header but no particles")
    missing = [c for c in ("x", "y", "z") if c not in header]
    if missing:
        raise ParameterError(
            f"{path}: particle CSV lacks column(s) {', '.join(missing)} (positions x, y, z in Å); "
            f"found columns {header}"
        )
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise ParameterError(f"{path}: row {i + 1} has {len(r)} fields, the header {len(header)}")
    col = {h: [r[j].strip() for r in body] for j, h in enumerate(header)}
    xyz = np.stack([_floats(col[c], c, path) for c in ("x", "y", "z")], axis=1)
    has_euler = [c in header for c in ("rot", "tilt", "psi")]
    has_matrix = [c in header for c in _MATRIX_COLUMNS]
    if any(has_euler) and any(has_matrix):
        raise ParameterError(f"{path}: give either Euler angles (rot, tilt, psi) or a matrix (r11..r33), not both")
    if any(has_euler):
        if not all(has_euler):
            lack = [c for c, h in zip(("rot", "tilt", "psi"), has_euler) if not h]
            raise ParameterError(f"{path}: Euler angles need rot, tilt and psi (degrees); missing {', '.join(lack)}")
        ang = [_floats(col[c], c, path) for c in ("rot", "tilt", "psi")]
        return Particles.from_euler(xyz, *ang, source=str(path))
    if any(has_matrix):
        if not all(has_matrix):
            lack = [c for c, h in zip(_MATRIX_COLUMNS, has_matrix) if not h]
            raise ParameterError(f"{path}: a rotation matrix needs r11..r33; missing {', '.join(lack)}")
        m = np.stack([_floats(col[c], c, path) for c in _MATRIX_COLUMNS], axis=1).reshape(-1, 3, 3)
        return Particles(xyz, m, source=str(path))
    return Particles(xyz, np.eye(3), source=str(path))


def _star_column(df: Any, name: str, path: Path) -> np.ndarray:
    return _floats(list(df[name]), name, path)


def _star_pixel_size(blocks: dict, df: Any, pixel_size: float | None, path: Path) -> np.ndarray:
    n = len(df)
    if pixel_size is not None:
        px = float(pixel_size)
        if not (math.isfinite(px) and px > 0):
            raise ParameterError(f"pixel_size={pixel_size}: must be a positive number of Å")
        return np.full(n, px)
    optics = blocks.get("optics")
    if optics is not None:
        for label in ("rlnTomoTiltSeriesPixelSize", "rlnMicrographPixelSize", "rlnMicrographOriginalPixelSize"):
            if label in optics.columns:
                vals = _floats(list(optics[label]), label, path)
                if "rlnOpticsGroup" in optics.columns and "rlnOpticsGroup" in df.columns:
                    groups = dict(zip((int(g) for g in optics["rlnOpticsGroup"]), vals))
                    try:
                        return np.asarray([groups[int(g)] for g in df["rlnOpticsGroup"]], dtype=np.float64)
                    except KeyError as exc:
                        raise ParameterError(f"{path}: particles refer to optics group {exc} that is not in "
                                             "data_optics") from None
                if np.ptp(vals) > 0:
                    raise ParameterError(f"{path}: several pixel sizes in data_optics ({label}); pass pixel_size=")
                return np.full(n, vals[0])
    raise ParameterError(
        f"{path}: rlnCoordinateX/Y/Z are in pixels but no pixel size is known (no rlnTomoTiltSeriesPixelSize / "
        "rlnMicrographPixelSize in data_optics); pass pixel_size= (Å)"
    )


def _read_star(path: Path, *, pixel_size: float | None, shape: Sequence[int] | None,
               voxel_size: float | Sequence[float] | None, origin: float | Sequence[float],
               tomo_name: str | None) -> Particles:
    try:
        import starfile
    except ImportError:  # pragma: no cover - a declared dependency
        raise ParameterError("reading STAR files needs the 'starfile' package (pip install starfile)") from None
    try:
        blocks = starfile.read(path, always_dict=True)
    except OSError as exc:
        raise InputFileError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # the parser's own errors on malformed files
        raise InputFileError(f"{path}: not a readable STAR file ({exc})") from None
    coords = ("rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ")
    centred = ("rlnCenteredCoordinateXAngst", "rlnCenteredCoordinateYAngst", "rlnCenteredCoordinateZAngst")
    tables = {k: v for k, v in blocks.items() if hasattr(v, "columns")}
    df = tables.get("particles")
    if df is None:
        df = next((v for v in tables.values() if any(c in v.columns for c in coords + centred)), None)
    if df is None:
        found = {k or "data_": list(v.columns) for k, v in tables.items()}
        raise ParameterError(
            f"{path}: no particle table with rlnCoordinateX/Y/Z or rlnCenteredCoordinateX/Y/ZAngst (found {found})"
        )
    if "rlnTomoName" in df.columns:
        names = list(dict.fromkeys(str(v) for v in df["rlnTomoName"]))
        if tomo_name is not None:
            df = df[df["rlnTomoName"].astype(str) == str(tomo_name)]
            if len(df) == 0:
                raise ParameterError(f"{path}: no particle of tomogram {tomo_name!r} (tomograms: {names})")
        elif len(names) > 1:
            raise ParameterError(f"{path}: particles of {len(names)} tomograms ({names[:5]}...); choose one with "
                                 "tomo_name=")
    if len(df) == 0:
        raise ParameterError(f"{path}: the particle table is empty")
    org = np.asarray(as_triple(origin, "origin"))[::-1]  # x, y, z
    if all(c in df.columns for c in centred):
        if shape is None or voxel_size is None:
            raise ParameterError(
                f"{path}: rlnCenteredCoordinate*Angst are relative to the tomogram centre; give the scene's "
                "shape= and voxel_size= (its extent defines the centre)"
            )
        extent = (np.asarray(shape, dtype=np.float64) * np.asarray(as_triple(voxel_size, "voxel_size")))[::-1]
        xyz = np.stack([_star_column(df, c, path) for c in centred], axis=1) + org + extent / 2.0
    elif all(c in df.columns for c in coords):
        px = _star_pixel_size(blocks, df, pixel_size, path)
        xyz = np.stack([_star_column(df, c, path) for c in coords], axis=1) * px[:, None] + org
        if all(c in df.columns for c in ("rlnOriginX", "rlnOriginY", "rlnOriginZ")):  # pre-3.1 shifts, pixels
            xyz_shift = np.stack([_star_column(df, c, path) for c in ("rlnOriginX", "rlnOriginY", "rlnOriginZ")], 1)
            xyz = xyz - xyz_shift * px[:, None]
    else:
        have = [c for c in coords + centred if c in df.columns]
        raise ParameterError(
            f"{path}: particle positions need rlnCoordinateX/Y/Z (pixels) or rlnCenteredCoordinateX/Y/ZAngst; "
            f"found only {have or 'neither'}"
        )
    n = len(df)
    subtomo = ("rlnTomoSubtomogramRot", "rlnTomoSubtomogramTilt", "rlnTomoSubtomogramPsi")
    angles = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
    mats = []
    for labels in (subtomo, angles):
        have = [c in df.columns for c in labels]
        if any(have) and not all(have):
            lack = [c for c, h in zip(labels, have) if not h]
            raise ParameterError(f"{path}: Euler angles need {', '.join(labels)}; missing {', '.join(lack)}")
        mats.append(relion_matrix(*(_star_column(df, c, path) for c in labels)) if all(have)
                    else np.broadcast_to(np.eye(3), (n, 3, 3)))
    a_sub, a_part = mats
    shift = ("rlnOriginXAngst", "rlnOriginYAngst", "rlnOriginZAngst")
    if all(c in df.columns for c in shift):  # RELION: position = coordinate − A_subtomogram · origin shift
        o = np.stack([_star_column(df, c, path) for c in shift], axis=1)
        xyz = xyz - np.einsum("nij,nj->ni", a_sub, o)
    return Particles(xyz, a_sub @ a_part, source=str(path))


def read_particles(
    path: str | os.PathLike,
    *,
    pixel_size: float | None = None,
    shape: Sequence[int] | None = None,
    voxel_size: float | Sequence[float] | None = None,
    origin: float | Sequence[float] = 0.0,
    tomo_name: str | None = None,
) -> Particles:
    """Read a particle list (CSV or RELION STAR) into :class:`Particles`.

    **CSV** (``.csv``; ``#`` comment lines allowed): a header line, then one
    row per copy. Columns ``x, y, z`` (Å, in the scene volume's frame, i.e.
    the same coordinates as the Volume's ``x``/``y``/``z``), and either
    ``rot, tilt, psi`` (RELION Euler angles, degrees) or ``r11 … r33`` (the
    rotation matrix row by row, ``x_scene = R · (x_model − c) + (x, y, z)``),
    or neither (identity). Other columns are ignored.

    **STAR** (``.star``, read with the ``starfile`` package): the
    ``data_particles`` table (or the only table with coordinates).

    * positions: ``rlnCenteredCoordinateX/Y/ZAngst`` (RELION 5: Å from the
      tomogram centre, which is ``origin + shape · voxel_size / 2``, so
      ``shape`` and ``voxel_size`` of the scene are needed), else
      ``rlnCoordinateX/Y/Z`` in pixels (0-based voxel indices of the
      tomogram) × the pixel size (``pixel_size``, else
      ``rlnTomoTiltSeriesPixelSize`` / ``rlnMicrographPixelSize`` of
      ``data_optics``) + ``origin``. Shifts ``rlnOriginX/Y/ZAngst`` are
      subtracted as RELION does (rotated by the subtomogram matrix).
    * orientations: ``rlnAngleRot/Tilt/Psi`` (degrees), composed as RELION
      does with ``rlnTomoSubtomogramRot/Tilt/Psi`` when present:
      ``R = A_subtomogram · A_particle``; missing angles mean identity.
    * several tomograms (``rlnTomoName``): choose one with ``tomo_name``.

    Parameters
    ----------
    path
        ``.csv`` or ``.star`` file.
    pixel_size
        Å per pixel of ``rlnCoordinateX/Y/Z`` (overrides ``data_optics``).
    shape, voxel_size, origin
        The scene grid (z, y, x; voxels, Å, Å): the origin is added to
        pixel and centred STAR coordinates; shape and voxel size locate the
        tomogram centre for centred coordinates.
    tomo_name
        Keep only the particles of this tomogram (STAR ``rlnTomoName``).

    Returns
    -------
    Particles

    Raises
    ------
    ParameterError
        Missing or non-numeric columns, unknown pixel size, several
        tomograms without ``tomo_name``, an improper rotation matrix.
    InputFileError
        Unreadable file.
    """
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{p}: no such particle list")
    suffix = p.suffix.lower()
    if suffix == ".star":
        return _read_star(p, pixel_size=pixel_size, shape=shape, voxel_size=voxel_size, origin=origin,
                          tomo_name=tomo_name)
    if suffix in (".csv", ".txt"):
        return _read_csv(p)
    raise ParameterError(f"{p}: particle lists are .csv or .star files")


# ----------------------------------------------------------------------------------------------
# rendering


def _center(model_center: Any, xyz: np.ndarray) -> np.ndarray:
    if isinstance(model_center, str):
        if model_center == "bounds":
            return 0.5 * (xyz.min(axis=0) + xyz.max(axis=0))
        if model_center == "mean":
            return xyz.mean(axis=0)
        raise ParameterError(f"model_center={model_center!r}: use 'bounds', 'mean' or (x, y, z) in Å")
    c = np.asarray(model_center, dtype=np.float64).ravel()
    if c.shape != (3,) or not np.all(np.isfinite(c)):
        raise ParameterError(f"model_center={model_center!r}: use 'bounds', 'mean' or (x, y, z) in Å")
    return c


def _tile(payload: tuple[np.ndarray, np.ndarray], *, shape, offset, voxel_size, model: SceneModel) -> np.ndarray:
    rotations, positions = payload
    return render_copies_block(shape, offset=offset, voxel_size=voxel_size, model=model, rotations=rotations,
                               positions=positions)


def render_scene(
    model: Any,
    particles: Particles,
    *,
    like: xr.DataArray | None = None,
    shape: Sequence[int] | None = None,
    voxel_size: float | Sequence[float] | None = None,
    origin: float | Sequence[float] = 0.0,
    resolution: float | None = None,
    method: str | None = None,
    blur: float | None = None,
    cutoff: float = 1e-5,
    soft_edge: float = 0.0,
    radius_factor: float = DEFAULT_RADIUS_FACTOR,
    table: str = "electron",
    model_center: str | Sequence[float] = "bounds",
    chunks: Any = None,
    outside: str = "error",
    name: str | None = "scene",
) -> xr.DataArray:
    """Render copies of a model at the particles' positions and orientations, tile by tile.

    Parameters
    ----------
    model
        :class:`~chunkem.io.model.Model` (xyz Å, B Å² decay convention,
        occupancy, element, optional anisotropic U).
    particles
        Positions (Å, the scene's frame) and rotations of the copies.
    like
        A Volume giving the grid (shape, voxel size, origin, chunks); the
        result is lazy for a dask-backed ``like``, in memory for numpy.
    shape, voxel_size, origin
        The grid (z, y, x; voxels, Å, Å) when ``like`` is not given; the
        result is lazy.
    resolution
        ``d`` (Å) of the finite-resolution images (``method="analytic"``);
        finer than Nyquist is clamped to Nyquist with a warning.
    method
        ``"analytic"`` (default when ``resolution`` is given) or
        ``"gaussian"`` (default otherwise); see the module notes.
    blur
        Gaussian images: extra B (Å²) on every atom; default the
        Refmac-compatible ``max(8π²/1.1 · h² − B_min, 0)`` (kept, not removed).
    cutoff
        Gaussian images: density level where an atom is cut (gemmi: 1e-5).
    soft_edge
        Analytic images: raised-cosine edge width (1/Å) ending at ``1/d``.
    radius_factor
        Analytic images are truncated at ``radius_factor · d`` Å.
    table
        ``"electron"`` (default) or ``"xray"``.
    model_center
        The model point placed at each particle position (the rotation
        centre): ``"bounds"`` (middle of the bounding box, default),
        ``"mean"`` or (x, y, z) Å.
    chunks
        Output tiles (default: ``like``'s chunks, else automatic).
    outside
        What to do with copies entirely outside the box: ``"error"``
        (default, :class:`~chunkem.errors.GeometryError`), ``"warn"`` (skip
        them with a warning) or ``"ignore"``. A scene with no copy inside
        always raises.
    name
        Name of the result.

    Returns
    -------
    xarray.DataArray
        The scene (float32); attrs ``"scene"`` hold the parameters.

    Examples
    --------
    >>> from chunkem.phantoms import build_model
    >>> m = build_model(10, seed=1)
    >>> parts = Particles.from_euler([[20.0, 20.0, 20.0], [45.0, 30.0, 20.0]], rot=[0.0, 90.0], tilt=[0.0, 30.0])
    >>> v = render_scene(m, parts, shape=(40, 50, 64), voxel_size=1.0, resolution=4.0)
    >>> v.shape, v.attrs["scene"]["n_copies_rendered"]
    ((40, 50, 64), 2)
    """
    if not isinstance(particles, Particles):
        raise ParameterError("particles must be a Particles list (see read_particles / Particles.from_euler)")
    header = None
    if like is not None:
        grid = grid_like(like, chunks)
        shp, vs, org, out_chunks, lazy = grid.shape, grid.voxel_size, grid.origin, grid.chunks, grid.lazy
        header = grid.header
    else:
        if shape is None or voxel_size is None:
            raise ParameterError("give like= (a map) or shape= and voxel_size= (Å) for the scene grid")
        shp = tuple(int(n) for n in np.broadcast_to(np.asarray(shape), (3,)))
        if any(n <= 0 for n in shp):
            raise ParameterError(f"shape={shape}: must be positive voxel counts")
        vs = as_triple(voxel_size, "voxel_size")
        if any(not (math.isfinite(v) and v > 0) for v in vs):
            raise ParameterError(f"voxel_size={voxel_size}: must be positive (Å)")
        org = as_triple(origin, "origin")
        lazy = True
        out_chunks = chunks if chunks is not None else auto_chunks(shp)
    out_chunks = normalize_chunks(out_chunks, shp)
    if method is None:
        method = "analytic" if resolution is not None else "gaussian"
    if method not in METHODS:
        raise ParameterError(f"method={method!r}: use one of {METHODS}")
    if outside not in ("error", "warn", "ignore"):
        raise ParameterError(f"outside={outside!r}: use 'error', 'warn' or 'ignore'")

    atoms = atom_set(model, table=table)
    if method == "analytic":
        if resolution is None:
            raise ParameterError("method='analytic' needs resolution= (Å)")
        resolution = check_resolution(resolution, vs)
        imaging = Imaging("finite", resolution=resolution, soft_edge=soft_edge, radius_factor=radius_factor,
                          cutoff=cutoff, table_step=max(DEFAULT_TABLE_STEP, resolution / 60.0))
        blur_used = 0.0
    else:
        if resolution is not None:
            raise ParameterError("method='gaussian' has no resolution limit; leave resolution=None")
        blur_used = refmac_blur(vs, float(atoms.b_equivalent.min())) if blur is None else float(blur)
        imaging = Imaging("gaussian", blur=blur_used, cutoff=cutoff)
    radii = rotation_safe_radii(atoms, imaging)
    centre = _center(model_center, atoms.xyz)
    local = AtomSet(atoms.xyz - centre, atoms.b_iso, atoms.occ, atoms.ff, atoms.aniso_u)
    sm = SceneModel(local, radii, imaging)
    extent = sm.extent

    tiles = bin_atoms(particles.xyz, extent, shape=shp, chunks=out_chunks, voxel_size=vs, origin=org)
    reached = np.zeros(len(particles), dtype=bool)
    for ids in tiles.members.values():
        reached[ids] = True
    _check_outside(particles, reached, extent, shp, vs, org, outside)

    token = dask.base.tokenize(particles.xyz, particles.rotation, local.xyz, local.b_iso, local.occ, local.ff.a,
                               local.ff.b, local.aniso_u, radii, imaging, out_chunks, shp, vs, org)
    model_task = dask.delayed(sm, name=f"scene-model-{token}", pure=True, traverse=False)
    rot, pos = particles.rotation, particles.xyz
    data = map_tiles(_tile, tiles, take=lambda ids: (rot[ids], pos[ids]), dtype=np.float32, name="render-scene",
                     token=token, model=model_task)
    out = make_volume(data, voxel_size=vs, origin=org, name=name, header=header)
    out.attrs["scene"] = {
        "method": method,
        "resolution": resolution,
        "blur": blur_used,
        "cutoff": cutoff if method == "gaussian" else None,
        "soft_edge": soft_edge if method == "analytic" else None,
        "radius_factor": radius_factor if method == "analytic" else None,
        "table": table,
        "n_atoms_model": len(atoms),
        "n_copies": len(particles),
        "n_copies_rendered": int(reached.sum()),
        "n_atoms_rendered": int(reached.sum()) * len(atoms),
        "model_center_A": centre.tolist(),
        "copy_reach_A": extent,
        "tiles": tiles.to_dict(),
        "euler_convention": "RELION ZYZ (rot, tilt, psi), x_scene = A(rot, tilt, psi) (x_model - c) + t",
        "b_convention": "decay (B = 8 pi^2 U)",
    }
    if not lazy:
        out = out.copy(data=out.data.compute())
    return out


def _check_outside(particles: Particles, reached: np.ndarray, extent: float, shape, vs, org, outside: str) -> None:
    lo = np.asarray(org)[::-1]
    hi = lo + (np.asarray(shape)[::-1] - 1) * np.asarray(vs)[::-1]
    box = f"x {lo[0]:.1f}..{hi[0]:.1f}, y {lo[1]:.1f}..{hi[1]:.1f}, z {lo[2]:.1f}..{hi[2]:.1f} Å"
    where = f"{particles.source}: " if particles.source else ""
    if not reached.any():
        raise GeometryError(
            f"{where}every one of the {len(particles)} copies lies entirely outside the scene box ({box}; copies "
            f"reach {extent:.1f} Å around their positions, which span {particles.xyz.min(0).round(1).tolist()} to "
            f"{particles.xyz.max(0).round(1).tolist()} Å, x, y, z). Check the units (Å vs pixels), pixel_size "
            "and origin."
        )
    out = np.nonzero(~reached)[0]
    if out.size == 0 or outside == "ignore":
        return
    first = int(out[0])
    msg = (
        f"{where}{out.size} of {len(particles)} copies lie entirely outside the scene box ({box}), e.g. particle "
        f"{first} (row {first + 1}) at {particles.xyz[first].round(2).tolist()} Å (x, y, z)"
    )
    if outside == "error":
        raise GeometryError(msg + "; pass outside='warn' to skip them")
    warnings.warn(msg + "; they are skipped", UserWarning, stacklevel=3)
