"""Real-space refinement of atomic B-factors and occupancies against a map.

:func:`refine_adp` fits per-atom (or per-residue) isotropic B and, on request,
per-group occupancies so that the model's finite-resolution image matches the
map, by L-BFGS-B (:func:`scipy.optimize.minimize`) with analytic gradients.
Everything happens in real space — no structure factors, no FFT in the loop:

* the model is imaged with finite-resolution atomic images at ``d``
  (:mod:`chunkem.kernels.finite_resolution`, truncated at ``radius_factor·d``);
* the map region around the model is cut into tiles
  (:mod:`chunkem.engine.atoms`); each tile renders only its own voxels and
  returns, as the adjoint of rendering, per-atom partial gradients, summed
  per atom and then per group. Atom positions do not move, so each tile's
  grid points are enumerated once (:class:`~chunkem.kernels.render.PreparedBlock`).

Targets (over the voxels within ``mask_radius`` of an atom):

``"cc"`` (default when only B is refined)
    ``−CC(ρ_calc, ρ_obs)``: insensitive to the map's scale and offset.
``"ls"`` (default when occupancies are refined)
    ``½ Σ (ρ_calc − k ρ_obs − c)² / Σ (k ρ_obs + c − mean)²``, with the
    scale ``k`` and offset ``c`` either given (``scale=``, ``offset=``; a map
    on the model's absolute scale has ``k = 1, c = 0``) or fitted once by
    linear regression at the start (``scale="auto"``). Occupancies are only
    meaningful on an absolute scale: with a correlation target they are
    determined up to a common factor.

Restraints: ``restraint_weight · mean over bonded pairs ((B_i − B_j)/10 Å²)²``
over atom pairs closer than 2.0 Å that belong to different B groups
(neighbouring atoms / residues have similar B). Bounds: B in ``bounds["b"]``
(default 1–300 Å²), occupancy in ``bounds["occupancy"]`` (default 0–1).

B convention: atomic ADP ("decay") B in Å², ``B = 8π² U``. Anisotropic
atoms are refined as isotropic (their U is replaced by ``B_eq``).
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.optimize
import xarray as xr

from ..engine.atoms import bin_atoms
from ..errors import GeometryError, ParameterError
from ..kernels.finite_resolution import DEFAULT_RADIUS_FACTOR
from ..kernels.render import AtomSet, Imaging, PreparedBlock, cc_field, cc_from_sums, cc_sums, mark_block
from ..volume import validate_volume
from ..volume import origin as vol_origin
from ..volume import voxel_size as vol_voxel_size
from .modelmap import atom_set, check_resolution

__all__ = ["RefineResult", "refine_adp", "adp_problem"]

BOND_CUTOFF = 2.0  # Å: atom pairs restrained to similar B


@dataclass
class RefineResult:
    """Outcome of :func:`refine_adp`.

    Attributes
    ----------
    model
        The refined model (B in Å², decay convention; occupancies).
    cc_before, cc_after
        Correlation of the model's finite-resolution image with the map over
        the refinement selection, before and after.
    target
        ``"cc"`` or ``"ls"``; ``target_before`` / ``target_after`` its value
        (restraints included).
    group, occupancy_group
        Parameter grouping (``"atom"`` or ``"residue"``); ``n_b_groups`` and
        ``n_occupancy_groups`` parameters (0 when not refined).
    n_iterations, n_evaluations, converged, message
        From L-BFGS-B.
    b_stats_before, b_stats_after
        Min / mean / max B (Å²).
    scale, offset
        ``k`` and ``c`` of the ``"ls"`` target.
    time_s
        Wall time.
    history
        Target value after each iteration.
    extra
        Optional metrics (e.g. CC_mask before / after).
    """

    model: Any
    cc_before: float
    cc_after: float
    target: str
    target_before: float
    target_after: float
    group: str
    occupancy_group: str | None
    n_b_groups: int
    n_occupancy_groups: int
    n_iterations: int
    n_evaluations: int
    converged: bool
    message: str
    b_stats_before: dict[str, float]
    b_stats_after: dict[str, float]
    scale: float | None = None
    offset: float | None = None
    time_s: float = 0.0
    history: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the model itself is left out)."""
        return {
            "cc_before": self.cc_before,
            "cc_after": self.cc_after,
            "target": self.target,
            "target_before": self.target_before,
            "target_after": self.target_after,
            "group": self.group,
            "occupancy_group": self.occupancy_group,
            "n_b_groups": self.n_b_groups,
            "n_occupancy_groups": self.n_occupancy_groups,
            "n_iterations": self.n_iterations,
            "n_evaluations": self.n_evaluations,
            "converged": self.converged,
            "message": self.message,
            "b_before_A2": self.b_stats_before,
            "b_after_A2": self.b_stats_after,
            "scale": self.scale,
            "offset": self.offset,
            "time_s": self.time_s,
            "history": list(self.history),
            "b_convention": "decay (B = 8 pi^2 U)",
            **self.extra,
        }


def _groups(model: Any, kind: str, what: str) -> np.ndarray:
    if kind == "atom":
        return np.arange(len(model.xyz))
    if kind == "residue":
        return np.unique(np.asarray(model.residue_index), return_inverse=True)[1].ravel()
    raise ParameterError(f"{what}={kind!r}: use 'atom' or 'residue'")


class _Tile:
    __slots__ = ("ids", "prep", "obs", "mask", "sl")

    def __init__(self, ids, prep, obs, mask, sl):
        self.ids = ids
        self.prep = prep
        self.obs = obs
        self.mask = mask
        self.sl = sl


class ADPProblem:
    """Target and gradient of B / occupancy refinement, tile by tile (see :func:`adp_problem`)."""

    def __init__(self, atoms: AtomSet, obs: np.ndarray, *, offset, voxel_size, imaging: Imaging,
                 mask_radius: float, tile: int, threads: int | None):
        self.atoms = atoms
        self.imaging = imaging
        self.shape = obs.shape
        vs = tuple(float(v) for v in voxel_size)
        rad = np.full(len(atoms), float(imaging.radius_factor) * float(imaging.resolution))
        mask = mark_block(obs.shape, offset=offset, voxel_size=vs, xyz=atoms.xyz, radius=mask_radius)
        tiles = bin_atoms(atoms.xyz, rad, shape=obs.shape, chunks=tile, voxel_size=vs, origin=offset)
        self.tiles: list[_Tile] = []
        for idx in tiles.tiles():
            sl = tiles.tile_slices(idx)
            m = mask[sl]
            if not m.any():
                continue
            ids = tiles.atoms_in(idx)
            prep = PreparedBlock(tiles.tile_shape(idx), offset=tiles.tile_offset(idx), voxel_size=vs,
                                 xyz=atoms.xyz[ids], radius=rad[ids], imaging=imaging)
            self.tiles.append(_Tile(ids, prep, np.asarray(obs[sl], np.float64), m, sl))
        self.n_mask = int(mask.sum())
        if self.n_mask == 0:
            raise GeometryError("no map voxel lies within the selection radius of an atom (model outside the map?)")
        self.threads = max(1, int(threads)) if threads else 1

    def _map(self, fn, items):
        if self.threads > 1 and len(items) > 1:
            with ThreadPoolExecutor(self.threads) as ex:
                return list(ex.map(fn, items))
        return [fn(t) for t in items]

    def render(self, atoms: AtomSet) -> list[np.ndarray]:
        """ρ_calc on every tile (same order as ``self.tiles``)."""
        return self._map(lambda t: t.prep.render(atoms.take(t.ids)), self.tiles)

    def sums(self, calcs: list[np.ndarray]) -> np.ndarray:
        """CC sums ``(n, Σc, Σo, Σc², Σo², Σco)`` over the selection."""
        return sum(cc_sums(c, t.obs, t.mask) for c, t in zip(calcs, self.tiles))

    def cc(self, atoms: AtomSet) -> float:
        return cc_from_sums(self.sums(self.render(atoms)))

    def curvature(self, atoms: AtomSet) -> tuple[np.ndarray, np.ndarray]:
        """Per-atom Gauss–Newton diagonals (Σ (∂ρ/∂B)², Σ (∂ρ/∂occ)²) over the selection."""
        hb = np.zeros(len(atoms))
        ho = np.zeros(len(atoms))
        for t in self.tiles:
            b, o = t.prep.curvature(atoms.take(t.ids), t.mask)
            np.add.at(hb, t.ids, b)
            np.add.at(ho, t.ids, o)
        return hb, ho

    def value_and_grad(self, atoms: AtomSet, target: str, k: float = 1.0, c: float = 0.0,
                       norm: float = 1.0) -> tuple[float, float, np.ndarray, np.ndarray]:
        """(target value, CC, dT/dB per atom, dT/docc per atom)."""
        calcs = self.render(atoms)
        s = self.sums(calcs)
        cc = cc_from_sums(s)
        if target == "cc":
            value = -cc
            fields = [-cc_field(cv, t.obs, s, t.mask) for cv, t in zip(calcs, self.tiles)]
        else:
            res = [np.where(t.mask, cv - k * t.obs - c, 0.0) for cv, t in zip(calcs, self.tiles)]
            value = 0.5 * sum(float(np.sum(r * r)) for r in res) / norm
            fields = [r / norm for r in res]
        gb = np.zeros(len(atoms))
        go = np.zeros(len(atoms))
        parts = self._map(lambda it: it[0].prep.adjoint(it[1], atoms.take(it[0].ids)), list(zip(self.tiles, fields)))
        for t, (b, o) in zip(self.tiles, parts):
            np.add.at(gb, t.ids, b)
            np.add.at(go, t.ids, o)
        return value, cc, gb, go


def _region(atoms: AtomSet, vol: xr.DataArray, margin: float) -> tuple[tuple[slice, ...], tuple[float, ...]]:
    vs = np.asarray(vol_voxel_size(vol))
    org = np.asarray(vol_origin(vol))
    zyx = atoms.xyz[:, ::-1]
    lo = np.floor((zyx.min(axis=0) - margin - org) / vs).astype(int)
    hi = np.ceil((zyx.max(axis=0) + margin - org) / vs).astype(int)
    n = np.asarray(vol.shape)
    lo = np.clip(lo, 0, n)
    hi = np.clip(hi + 1, 0, n)
    if np.any(hi <= lo):
        raise GeometryError(
            f"model outside the map: atoms span x {zyx[:, 2].min():.1f}..{zyx[:, 2].max():.1f}, "
            f"y {zyx[:, 1].min():.1f}..{zyx[:, 1].max():.1f}, z {zyx[:, 0].min():.1f}..{zyx[:, 0].max():.1f} Å, "
            f"outside {vol.name or 'the map'} (check origin / nstart and the model frame)"
        )
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    return sl, tuple(float(o + a * h) for o, a, h in zip(org, lo, vs))


def adp_problem(model: Any, vol: xr.DataArray, *, resolution: float, mask_radius: float | None = None,
                soft_edge: float = 0.0, radius_factor: float = DEFAULT_RADIUS_FACTOR, tile: int = 48,
                threads: int | None = None) -> ADPProblem:
    """The tiled real-space B/occupancy problem of :func:`refine_adp` (for custom optimisers / ML).

    ``problem.value_and_grad(atoms, "cc")`` returns ``(−CC, CC, ∂/∂B, ∂/∂occ)``
    per atom for an :class:`~chunkem.kernels.render.AtomSet` with the
    model's atoms in the same order.
    """
    validate_volume(vol)
    d = check_resolution(resolution, vol_voxel_size(vol))
    atoms = atom_set(model)
    imaging = Imaging("finite", resolution=d, soft_edge=soft_edge, radius_factor=radius_factor)
    if mask_radius is None:
        from .metrics import selection_radius

        mask_radius = selection_radius(d, float(np.mean(atoms.b_equivalent)))
    reach = float(radius_factor) * d
    sl, org = _region(atoms, vol, reach + float(mask_radius))
    obs = np.asarray(vol.data[sl], dtype=np.float64) if not hasattr(vol.data, "compute") else np.asarray(
        vol.data[sl].compute(), dtype=np.float64)
    return ADPProblem(atoms, obs, offset=org, voxel_size=vol_voxel_size(vol), imaging=imaging,
                      mask_radius=float(mask_radius), tile=tile, threads=threads)


def _bond_pairs(xyz: np.ndarray, groups: np.ndarray) -> np.ndarray:
    from scipy.spatial import cKDTree

    pairs = cKDTree(xyz).query_pairs(BOND_CUTOFF, output_type="ndarray")
    if pairs.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    gp = groups[pairs]
    gp = gp[gp[:, 0] != gp[:, 1]]
    if gp.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    return np.unique(np.sort(gp, axis=1), axis=0)


def _stats(b: np.ndarray) -> dict[str, float]:
    return {"min": float(np.min(b)), "mean": float(np.mean(b)), "max": float(np.max(b))}


def refine_adp(
    model: Any,
    vol: xr.DataArray,
    *,
    resolution: float,
    group: str = "atom",
    refine_b: bool = True,
    refine_occupancy: bool = False,
    occupancy_group: str = "residue",
    target: str | None = None,
    scale: float | str = "auto",
    offset: float = 0.0,
    restraint_weight: float = 0.01,
    bounds: dict[str, tuple[float, float]] | None = None,
    max_iter: int = 50,
    mask_radius: float | None = None,
    soft_edge: float = 0.0,
    radius_factor: float = DEFAULT_RADIUS_FACTOR,
    tile: int = 48,
    threads: int | None = None,
) -> RefineResult:
    """Refine isotropic B (and optionally occupancies) against a map in real space.

    Parameters
    ----------
    model
        :class:`~chunkem.io.model.Model` in the map's frame.
    vol
        The map (numpy- or dask-backed; only the region around the model is read).
    resolution
        ``d`` (Å) of the finite-resolution atomic images.
    group
        ``"atom"`` (one B per atom) or ``"residue"`` (one B per residue).
    refine_b, refine_occupancy
        Which parameters to refine.
    occupancy_group
        ``"residue"`` (default) or ``"atom"``: occupancy groups.
    target
        ``"cc"`` or ``"ls"`` (default: ``"ls"`` when refining occupancies, else ``"cc"``).
    scale, offset
        ``k`` and ``c`` of the ``"ls"`` target; ``scale="auto"`` fits both
        once at the start by linear regression.
    restraint_weight
        Weight of the B similarity restraint between bonded atoms of
        different groups (0 = none).
    bounds
        ``{"b": (lo, hi), "occupancy": (lo, hi)}`` (Å²; fractions).
    max_iter
        L-BFGS-B iterations.
    mask_radius
        Voxels within this radius (Å) of an atom enter the target (default:
        :func:`chunkem.ops.metrics.selection_radius`).
    soft_edge, radius_factor
        Finite-resolution image: raised-cosine edge (1/Å) and truncation
        radius ``radius_factor · d``.
    tile
        Tile edge (voxels) of the region.
    threads
        Tiles evaluated in parallel threads (default 1: the kernels are
        dominated by numpy gathers that hold the GIL, threads rarely help).

    Returns
    -------
    RefineResult

    Raises
    ------
    GeometryError
        Model outside the map.
    ParameterError
        Bad groups, target, bounds, or a model with zero occupancy everywhere.
    """
    t0 = time.perf_counter()
    if not (refine_b or refine_occupancy):
        raise ParameterError("nothing to refine: set refine_b and/or refine_occupancy")
    target = target or ("ls" if refine_occupancy else "cc")
    if target not in ("cc", "ls"):
        raise ParameterError(f"target={target!r}: use 'cc' or 'ls'")
    if refine_occupancy and target == "cc":
        warnings.warn("occupancies refined against a correlation are only defined up to a common factor; "
                      "use target='ls' with a known scale", UserWarning, stacklevel=2)
    bnd = {"b": (1.0, 300.0), "occupancy": (0.0, 1.0)}
    if bounds:
        unknown = set(bounds) - set(bnd)
        if unknown:
            raise ParameterError(f"bounds: unknown keys {sorted(unknown)}; use 'b' and 'occupancy'")
        bnd.update({k: (float(v[0]), float(v[1])) for k, v in bounds.items()})
    for k, (lo, hi) in bnd.items():
        if not lo < hi:
            raise ParameterError(f"bounds[{k!r}] = {(lo, hi)}: lower must be below upper")
    if restraint_weight < 0:
        raise ParameterError(f"restraint_weight={restraint_weight}: must be ≥ 0")
    occ0 = np.asarray(model.occupancy, np.float64)
    if not np.any(occ0 > 0):
        raise ParameterError("every atom has zero occupancy: the model has no density to refine against")

    prob = adp_problem(model, vol, resolution=resolution, mask_radius=mask_radius, soft_edge=soft_edge,
                       radius_factor=radius_factor, tile=tile, threads=threads)
    atoms = prob.atoms
    n = len(atoms)
    gb_idx = _groups(model, group, "group")
    go_idx = _groups(model, occupancy_group, "occupancy_group") if refine_occupancy else np.zeros(n, np.int64)
    nb = int(gb_idx.max()) + 1 if refine_b else 0
    no = int(go_idx.max()) + 1 if refine_occupancy else 0
    b_start = atoms.b_equivalent
    cnt_b = np.bincount(gb_idx, minlength=max(nb, 1))
    bg0 = np.bincount(gb_idx, weights=b_start, minlength=max(nb, 1)) / np.maximum(cnt_b, 1)
    cnt_o = np.bincount(go_idx, minlength=max(no, 1))
    og0 = np.bincount(go_idx, weights=atoms.occ, minlength=max(no, 1)) / np.maximum(cnt_o, 1)
    pairs = _bond_pairs(atoms.xyz, gb_idx) if (refine_b and restraint_weight > 0) else np.zeros((0, 2), np.int64)

    # optimiser variables x = p * sx: p = (B groups, occupancy groups), sx from the Gauss-Newton
    # diagonal at the start (a diagonal preconditioner: a high-B atom changes the map much less
    # per Å² than a sharp one)
    sx = np.ones(nb + no)

    def unpack(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = x / sx
        bg = p[:nb] if refine_b else bg0
        og = p[nb:] if refine_occupancy else og0
        return bg, og

    def atoms_at(bg: np.ndarray, og: np.ndarray) -> AtomSet:
        b = bg[gb_idx] if refine_b else b_start
        occ = og[go_idx] if refine_occupancy else atoms.occ
        return AtomSet(atoms.xyz, b, occ, atoms.ff, None)

    start_atoms = atoms_at(np.clip(bg0, *bnd["b"]), np.clip(og0, *bnd["occupancy"]))
    hb, ho = prob.curvature(start_atoms)
    h = np.concatenate(([np.bincount(gb_idx, weights=hb, minlength=nb)] if refine_b else [])
                       + ([np.bincount(go_idx, weights=ho, minlength=no)] if refine_occupancy else []))
    pos = h[h > 0]
    if pos.size:
        h = np.where(h > 0, h, pos.min())
        sx = np.sqrt(h / np.median(h))
    k, c, norm = 1.0, 0.0, 1.0
    if target == "ls":
        s = prob.sums(prob.render(start_atoms))
        nn, sc, so, scc, soo, sco = s
        if scale == "auto":
            vo = soo - so * so / nn
            if vo <= 0:
                raise ParameterError("the map is constant over the model region: cannot fit a scale")
            k = (sco - sc * so / nn) / vo
            c = (sc - k * so) / nn
        else:
            k, c = float(scale), float(offset)
        norm = float(k * k * (soo - so * so / nn))
        if not norm > 0:
            raise ParameterError("the scaled map has no variance over the model region")

    history: list[float] = []
    state: dict[str, Any] = {"cc": float("nan"), "evals": 0}

    def fun(x: np.ndarray) -> tuple[float, np.ndarray]:
        if state.get("x") is not None and np.array_equal(x, state["x"]):
            return state["last"]
        bg, og = unpack(x)
        value, cc, gba, goa = prob.value_and_grad(atoms_at(bg, og), target, k, c, norm)
        state["cc"] = cc
        state["evals"] += 1
        grad = []
        if refine_b:
            gbg = np.bincount(gb_idx, weights=gba, minlength=nb)
            if pairs.size:
                diff = (bg[pairs[:, 0]] - bg[pairs[:, 1]]) / 10.0
                w = restraint_weight / len(pairs)
                value += w * float(np.sum(diff * diff))
                gd = 2.0 * w * diff / 10.0
                gbg = gbg + np.bincount(pairs[:, 0], weights=gd, minlength=nb) - np.bincount(
                    pairs[:, 1], weights=gd, minlength=nb)
            grad.append(gbg)
        if refine_occupancy:
            grad.append(np.bincount(go_idx, weights=goa, minlength=no))
        state["x"] = np.array(x, copy=True)
        state["last"] = (float(value), np.concatenate(grad) / sx)
        state["last_cc"] = cc
        return state["last"]

    p0 = np.concatenate(([np.clip(bg0, *bnd["b"])] if refine_b else [])
                        + ([np.clip(og0, *bnd["occupancy"])] if refine_occupancy else []))
    x0 = p0 * sx
    lo = np.array([bnd["b"][0]] * nb + [bnd["occupancy"][0]] * no) * sx
    hi = np.array([bnd["b"][1]] * nb + [bnd["occupancy"][1]] * no) * sx
    xb = list(zip(lo, hi))
    f0, _ = fun(x0)
    cc0 = state["cc"]
    opt = scipy.optimize.minimize(
        fun, x0, jac=True, method="L-BFGS-B", bounds=xb,
        options={"maxiter": int(max_iter), "maxcor": 20, "ftol": 1e-10, "gtol": 1e-7},
        callback=lambda xk: history.append(float(fun(xk)[0])),
    )
    bg, og = unpack(opt.x)
    f1, _ = fun(opt.x)
    cc1 = state["last_cc"]
    new_b = bg[gb_idx] if refine_b else np.asarray(model.b_iso, np.float64)
    new_occ = og[go_idx] if refine_occupancy else np.asarray(model.occupancy, np.float64)
    new_model = model.with_values(b_iso=new_b, occupancy=new_occ)
    return RefineResult(
        model=new_model,
        cc_before=float(cc0),
        cc_after=float(cc1),
        target=target,
        target_before=float(f0),
        target_after=float(f1),
        group=group,
        occupancy_group=occupancy_group if refine_occupancy else None,
        n_b_groups=nb,
        n_occupancy_groups=no,
        n_iterations=int(opt.nit),
        n_evaluations=int(state["evals"]),
        converged=bool(opt.success),
        message=str(opt.message),
        b_stats_before=_stats(b_start),
        b_stats_after=_stats(new_b),
        scale=float(k) if target == "ls" else None,
        offset=float(c) if target == "ls" else None,
        time_s=round(time.perf_counter() - t0, 3),
        history=history,
    )
