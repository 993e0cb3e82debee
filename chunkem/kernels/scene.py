"""Copies of one model placed by rigid transforms, rendered into one in-memory block.

A *scene* is many copies of the same atomic model, copy ``k`` placed by a
rotation ``R_k`` about the model point ``c`` and a position ``t_k`` (Å)::

    x_scene = R_k · (x_model − c) + t_k          (x, y, z column vectors)

:func:`render_copies_block` transforms the copies that reach a block,
keeps the atoms whose image can touch it and renders them with
:func:`chunkem.kernels.render.render_block`, so a block equals the sum of
the copies rendered one by one. Anisotropic U rotates with the copy
(``U' = R U Rᵀ``).

Euler angles: :func:`relion_matrix` builds RELION's matrix from
``(rot, tilt, psi)`` (degrees, ZYZ). In RELION the particle (what the
tomogram shows) is the reference *rotated by* that matrix: a point
``x_ref`` of the reference box (relative to its centre) lies at
``A · x_ref + position`` in the tomogram (``ParticleSet::getMatrix4x4``,
"maps coordinates from particle space to tomogram space", in RELION's
``src/jaz/tomography/particle_set.cpp``; the matrix itself is
``Euler_angles2matrix`` of ``src/euler.cpp``, the Heymann et al. 2005
standard ZYZ convention). So ``R_k = A(rot, tilt, psi)`` above. In active
right-handed rotations, ``A = (R_z(rot) R_y(tilt) R_z(psi))ᵀ =
R_z(−psi) R_y(−tilt) R_z(−rot)``; with scipy this is
``Rotation.from_euler("ZYZ", [rot, tilt, psi], degrees=True).inv()``.

Pure numpy; no dask.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ParameterError
from .render import AtomSet, Imaging, atom_radii, render_block

__all__ = ["relion_matrix", "rotate_u", "rotation_safe_radii", "SceneModel", "render_copies_block"]


def relion_matrix(rot: float | np.ndarray, tilt: float | np.ndarray, psi: float | np.ndarray) -> np.ndarray:
    """RELION's rotation matrix ``A`` for Euler angles (degrees, ZYZ).

    Row-major as RELION's ``Euler_angles2matrix``: for ``tilt = psi = 0``,
    ``A = [[cos rot, sin rot, 0], [−sin rot, cos rot, 0], [0, 0, 1]]``.
    The particle is the reference rotated by ``A`` (``x_particle = A · x_ref``).

    Parameters
    ----------
    rot, tilt, psi
        Angles in degrees (scalars or arrays of one length).

    Returns
    -------
    ndarray
        (n, 3, 3) float64 (n = 1 for scalars).

    Examples
    --------
    >>> relion_matrix(90.0, 0.0, 0.0)[0].round(6) + 0.0  # rot = 90°: x_particle = (y_ref, -x_ref, z_ref)
    array([[ 0.,  1.,  0.],
           [-1.,  0.,  0.],
           [ 0.,  0.,  1.]])
    """
    a, b, g = (np.deg2rad(np.atleast_1d(np.asarray(v, dtype=np.float64))) for v in (rot, tilt, psi))
    a, b, g = np.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    m = np.empty(a.shape + (3, 3))
    m[:, 0, 0] = cg * cb * ca - sg * sa
    m[:, 0, 1] = cg * cb * sa + sg * ca
    m[:, 0, 2] = -cg * sb
    m[:, 1, 0] = -sg * cb * ca - cg * sa
    m[:, 1, 1] = -sg * cb * sa + cg * ca
    m[:, 1, 2] = sg * sb
    m[:, 2, 0] = sb * ca
    m[:, 2, 1] = sb * sa
    m[:, 2, 2] = cb
    return m


def rotate_u(u: np.ndarray, rot: np.ndarray) -> np.ndarray:
    """Anisotropic U (n, 6: U11 U22 U33 U12 U13 U23, Å²) of atoms rotated by ``rot`` (3, 3): ``R U Rᵀ``."""
    full = _u_matrix(u)
    r = np.asarray(rot, dtype=np.float64)
    out = r @ full @ r.T
    return np.stack([out[:, 0, 0], out[:, 1, 1], out[:, 2, 2], out[:, 0, 1], out[:, 0, 2], out[:, 1, 2]], axis=1)


def rotation_safe_radii(atoms: AtomSet, imaging: Imaging) -> np.ndarray:
    """Atom radii (Å) that hold for any rotation of the model.

    :func:`~chunkem.kernels.render.atom_radii` sizes an anisotropic atom by
    the largest *diagonal* element of its B tensor, which changes when the
    atom rotates; here it is sized by the largest eigenvalue instead (an
    upper bound for every orientation). Isotropic atoms: unchanged.
    """
    if atoms.aniso_u is None or imaging.method != "gaussian" or not atoms.is_aniso.any():
        return atom_radii(atoms, imaging)
    an = atoms.is_aniso
    lam = np.linalg.eigvalsh(_u_matrix(atoms.aniso_u[an]))[:, -1]
    u = atoms.aniso_u.copy()
    u[an] = np.column_stack([lam, lam, lam, np.zeros((lam.size, 3))])
    return atom_radii(AtomSet(atoms.xyz, atoms.b_iso, atoms.occ, atoms.ff, u), imaging)


def _u_matrix(u: np.ndarray) -> np.ndarray:
    u = np.asarray(u, dtype=np.float64).reshape(-1, 6)
    full = np.empty((u.shape[0], 3, 3))
    full[:, 0, 0], full[:, 1, 1], full[:, 2, 2] = u[:, 0], u[:, 1], u[:, 2]
    full[:, 0, 1] = full[:, 1, 0] = u[:, 3]
    full[:, 0, 2] = full[:, 2, 0] = u[:, 4]
    full[:, 1, 2] = full[:, 2, 1] = u[:, 5]
    return full


@dataclass
class SceneModel:
    """The model every copy is made of.

    Attributes
    ----------
    atoms : AtomSet
        The model's atoms; ``atoms.xyz`` relative to the rotation centre
        (``x_model − c``, Å).
    radius : ndarray (n,)
        Each atom's image radius (Å) under the scene's imaging, valid for
        every orientation (:func:`rotation_safe_radii`).
    imaging : Imaging
        How atoms are imaged.
    """

    atoms: AtomSet
    radius: np.ndarray
    imaging: Imaging

    @property
    def extent(self) -> float:
        """Radius (Å) of a sphere about the rotation centre that holds every atom's image."""
        if len(self.atoms) == 0:
            return 0.0
        return float(np.max(np.linalg.norm(self.atoms.xyz, axis=1) + self.radius))


def render_copies_block(
    shape: Sequence[int],
    *,
    offset: Sequence[float],
    voxel_size: float | Sequence[float],
    model: SceneModel,
    rotations: np.ndarray,
    positions: np.ndarray,
    dtype: np.dtype | type = np.float32,
) -> np.ndarray:
    """Density of copies of ``model`` on one block.

    Parameters
    ----------
    shape
        Block shape (nz, ny, nx).
    offset
        Position (z, y, x, Å) of the block's voxel (0, 0, 0).
    voxel_size
        Å, one number or (vz, vy, vx).
    model
        The model (atoms relative to the rotation centre, radii, imaging).
    rotations
        (k, 3, 3): ``x_scene = R · x_model + t`` for copy k.
    positions
        (k, 3): ``t`` (x, y, z, Å).
    dtype
        Output dtype (accumulation in float64).

    Returns
    -------
    ndarray
        The block: the sum over copies of each copy rendered alone.
    """
    shp = tuple(int(n) for n in shape)
    rots = np.asarray(rotations, dtype=np.float64).reshape(-1, 3, 3)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if rots.shape[0] != pos.shape[0]:
        raise ParameterError(f"{rots.shape[0]} rotations but {pos.shape[0]} positions")
    vs = np.broadcast_to(np.asarray(voxel_size, dtype=np.float64), (3,))[::-1]  # x, y, z
    lo = np.asarray(offset, dtype=np.float64)[::-1]
    hi = lo + (np.asarray(shp)[::-1] - 1) * vs
    at = model.atoms
    rad = model.radius
    ids, xyz, us = [], [], []
    for r, t in zip(rots, pos):
        p = at.xyz @ r.T + t
        keep = np.all((p + rad[:, None] >= lo - vs) & (p - rad[:, None] <= hi + vs), axis=1)
        if not keep.any():
            continue
        k = np.nonzero(keep)[0]
        ids.append(k)
        xyz.append(p[k])
        if at.aniso_u is not None:
            us.append(rotate_u(at.aniso_u[k], r))
    if not ids:
        return np.zeros(shp, dtype=dtype)
    idx = np.concatenate(ids)
    placed = AtomSet(
        np.concatenate(xyz),
        at.b_iso[idx],
        at.occ[idx],
        at.ff.take(idx),
        np.concatenate(us) if us else None,
    )
    # anisotropic atoms: radius from the rotated tensor (gemmi's rule, as rendering the rotated model)
    radius = None if us else rad[idx]
    return render_block(shp, offset=offset, voxel_size=voxel_size, atoms=placed, imaging=model.imaging,
                        radius=radius, dtype=dtype)
