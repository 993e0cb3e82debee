"""Map–model fit: CC_mask, CC_box, CC_volume, CC_peaks, per-residue CC, map–model FSC.

Definitions follow spec 07 (phenix.map_model_cc / mtriage):

* ``map_calc``: the model map on the map's grid at resolution ``d``
  (:func:`chunkem.ops.modelmap.model_map`, spectral route: electron form
  factors, the model's B and occupancy, sharp cut at ``1/d``).
* **CC_box**: Pearson correlation over every voxel of the box (dominated by
  the empty background of a cropped or masked map).
* **CC_mask**: over the molecular mask — voxels within ``r_vdW + 1.1 Å`` of an
  atom (van der Waals radii from gemmi), then voxels within 0.9 Å of solvent
  given back to solvent; ``n_mask`` voxels.
* **CC_volume**: over the ``n_mask`` voxels with the highest ``map_calc``.
* **CC_peaks**: over the union of the ``n_mask`` highest voxels of the map
  and the ``n_mask`` highest of ``map_calc`` (ties at a threshold included).
* **per-residue CC**: over voxels within ``atom_radius`` of the residue's
  atoms, ``atom_radius = clamp(max(d, 2·r_inflection), 3, 10)`` Å where
  ``r_inflection`` is the first inflection point of a carbon image at ``d``
  and the model's mean B (mtriage's rule; all atoms of a residue, hydrogens
  included).
* **map–model FSC**: FSC between the map and the model map (to Nyquist),
  both multiplied by a binary mask of voxels within ``atom_radius`` of an
  atom; resolutions where it falls below 0, 0.143 and 0.5.

Every statistic is a chunk-additive reduction (sums ``n, Σx, Σy, Σx², Σy²,
Σxy``; the top-n thresholds by ``dask.array.topk``); per-residue sums are
accumulated tile by tile with :mod:`chunkem.engine.atoms`.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from ..engine import spectral
from ..engine.atoms import bin_atoms, map_tiles, normalize_chunks
from ..engine.chunks import auto_chunks
from ..engine.local import run_local
from ..errors import ParameterError
from ..kernels.finite_resolution import image_radius
from ..kernels.render import cc_from_sums, mark_block, selection_sums_block
from ..volume import make_volume, validate_volume
from ..volume import origin as vol_origin
from ..volume import voxel_size as vol_voxel_size
from .modelmap import atom_set, check_resolution, model_map, nyquist

__all__ = [
    "MapModelMetrics",
    "map_model_metrics",
    "molecular_mask",
    "atom_mask",
    "selection_radius",
    "residue_labels",
]


def selection_radius(resolution: float, b_mean: float) -> float:
    """Atom radius (Å) for per-residue CC and the FSC mask (mtriage ``get_atom_radius``).

    ``clamp(max(d, 2·r_inflection), 3, 10)`` with ``r_inflection`` the first
    inflection point of a carbon image at resolution ``d`` and B ``b_mean``
    (Å², decay convention), sampled every 0.1 Å.
    """
    r_img = image_radius(float(resolution), b_iso=float(b_mean), step=0.1)
    return float(min(max(max(float(resolution), r_img), 3.0), 10.0))


def residue_labels(model: Any) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Residue group of every atom (0..n_res-1, file order) and per-residue labels."""
    ridx = np.asarray(model.residue_index)
    uniq, first, group = np.unique(ridx, return_index=True, return_inverse=True)
    labels = {}
    for key in ("chain", "resseq", "icode", "resname"):
        arr = getattr(model, key, None)
        if arr is not None:
            labels[key] = np.asarray(arr)[first]
    return group.ravel(), labels


def _grid_chunks(vol: xr.DataArray):
    if isinstance(vol.data, da.Array):
        return vol.data.chunks
    return normalize_chunks(auto_chunks(vol.shape), vol.shape)


def _mark_tile(payload, *, shape, offset, voxel_size):
    xyz, rad = payload
    return mark_block(shape, offset=offset, voxel_size=voxel_size, xyz=xyz, radius=rad).astype(np.float32)


def _marked(model: Any, like: xr.DataArray, radius: np.ndarray, name: str) -> xr.DataArray:
    xyz = np.asarray(model.xyz, np.float64)
    vs, org = vol_voxel_size(like), vol_origin(like)
    tiles = bin_atoms(xyz, radius, shape=like.shape, chunks=_grid_chunks(like), voxel_size=vs, origin=org)
    token = dask.base.tokenize(xyz, radius, vs, org, name)
    data = map_tiles(_mark_tile, tiles, take=lambda ids: (xyz[ids], radius[ids]), name=name, token=token)
    if not isinstance(like.data, da.Array):
        data = data.compute()
    return make_volume(data, voxel_size=vs, origin=org, name=name)


def atom_mask(model: Any, like: xr.DataArray, *, radius: float) -> xr.DataArray:
    """Binary mask (float32 0/1): voxels strictly within ``radius`` Å of any atom, on ``like``'s grid."""
    if not radius > 0:
        raise ParameterError(f"radius={radius}: must be positive (Å)")
    return _marked(model, like, np.full(len(model.xyz), float(radius)), "atom-mask")


def _erode(block: np.ndarray, *, structure: np.ndarray) -> np.ndarray:
    import scipy.ndimage as ndi

    return ndi.binary_erosion(block > 0.5, structure=structure, border_value=1).astype(np.float32)


def molecular_mask(
    model: Any,
    like: xr.DataArray,
    *,
    solvent_radius: float = 1.1,
    shrink_truncation_radius: float = 0.9,
) -> xr.DataArray:
    """Bulk-solvent style molecular mask (float32 0/1) on ``like``'s grid (spec 07 §1).

    Voxels within ``r_vdW(element) + solvent_radius`` (Å) of any atom are
    protein; then every protein voxel within ``shrink_truncation_radius`` Å
    of a solvent voxel is given back to solvent (an erosion). van der Waals
    radii come from gemmi. Outside the box counts as protein for the erosion
    (no artificial shrinking at the box edge). Lazy when ``like`` is.
    """
    import gemmi

    els = np.asarray(model.element).astype(str)
    uniq, inv = np.unique(els, return_inverse=True)
    vdw = np.array([gemmi.Element(e).vdw_r for e in uniq], dtype=np.float64)[inv.ravel()]
    m = _marked(model, like, vdw + float(solvent_radius), "molecular-mask")
    if shrink_truncation_radius > 0:
        vs = np.asarray(vol_voxel_size(like))
        k = np.floor(float(shrink_truncation_radius) / vs + 1e-9).astype(int)
        if np.any(k > 0):
            grids = np.meshgrid(*[np.arange(-n, n + 1) * h for n, h in zip(k, vs)], indexing="ij")
            structure = (grids[0] ** 2 + grids[1] ** 2 + grids[2] ** 2) <= float(shrink_truncation_radius) ** 2 + 1e-9
            m = run_local(_erode, m, reach=float(shrink_truncation_radius), structure=structure, name="molecular-mask")
    return m


@dataclass
class MapModelMetrics:
    """Map–model correlation coefficients, per-residue CC and the map–model FSC.

    Attributes
    ----------
    resolution : float
        ``d`` (Å) of the model map.
    atom_radius : float
        Radius (Å) of the per-residue and FSC selections.
    cc_mask, cc_box, cc_volume, cc_peaks : float
        See the module notes.
    n_mask, n_volume, n_peaks, n_box : int
        Voxels in each selection.
    residues : dict
        Per residue: ``chain``, ``resseq``, ``icode``, ``resname``, ``cc``,
        ``n_voxels`` (arrays, model order).
    fsc : dict
        ``frequency`` (1/Å), ``resolution`` (Å), ``fsc`` (per shell) and
        ``d_fsc_0``, ``d_fsc_0143``, ``d_fsc_05`` (Å).
    warnings : list of str
    """

    resolution: float
    atom_radius: float
    cc_mask: float
    cc_box: float
    cc_volume: float
    cc_peaks: float
    n_mask: int
    n_volume: int
    n_peaks: int
    n_box: int
    residues: dict[str, np.ndarray] = field(default_factory=dict)
    fsc: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self, *, per_residue: bool = False) -> dict[str, Any]:
        """JSON-ready summary (per-residue values only if ``per_residue``)."""
        out: dict[str, Any] = {
            "resolution_A": self.resolution,
            "atom_radius_A": self.atom_radius,
            "cc_mask": self.cc_mask,
            "cc_box": self.cc_box,
            "cc_volume": self.cc_volume,
            "cc_peaks": self.cc_peaks,
            "n_mask": self.n_mask,
            "n_volume": self.n_volume,
            "n_peaks": self.n_peaks,
            "n_box": self.n_box,
            "warnings": list(self.warnings),
        }
        if self.residues:
            cc = np.asarray(self.residues["cc"], float)
            ok = np.isfinite(cc)
            out["residue_cc_mean"] = float(cc[ok].mean()) if ok.any() else None
            out["residue_cc_min"] = float(cc[ok].min()) if ok.any() else None
            out["n_residues"] = int(cc.size)
            if per_residue:
                out["residues"] = [dict(zip(self.residues, vals)) for vals in zip(*self.residues.values())]
        if self.fsc is not None:
            out["fsc"] = {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.fsc.items()
            }
        return out

    def residue_csv(self, path: str | os.PathLike | None = None) -> str:
        """Per-residue table as CSV text (written atomically to ``path`` if given)."""
        buf = io.StringIO()
        w = csv.writer(buf)
        keys = list(self.residues)
        w.writerow(keys)
        for vals in zip(*(self.residues[k] for k in keys)):
            w.writerow([f"{v:.5f}" if isinstance(v, (float, np.floating)) else v for v in vals])
        text = buf.getvalue()
        if path is not None:
            from ..cli.common import atomic_write_bytes

            atomic_write_bytes(Path(path), text.encode())
        return text

    def plot(self, path: str | os.PathLike, *, title: str | None = None) -> Path:
        """PNG: per-residue CC along the chain(s) and the map–model FSC (written atomically)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ..cli.common import atomic_write_bytes

        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        ax = axes[0]
        if self.residues:
            cc = np.asarray(self.residues["cc"], float)
            chains = np.asarray(self.residues.get("chain", np.array([""] * cc.size)))
            for ch in dict.fromkeys(chains.tolist()):
                sel = chains == ch
                x = np.asarray(self.residues.get("resseq", np.arange(cc.size)))[sel].astype(float)
                yv = cc[sel].copy()
                gaps = np.nonzero(np.diff(x) > 1)[0] + 1  # break the line at gaps in numbering
                ax.plot(np.insert(x, gaps, np.nan), np.insert(yv, gaps, np.nan), lw=0.9, marker=".", ms=2,
                        label=f"chain {ch}")
            ax.axhline(self.cc_mask, color="k", ls="--", lw=0.8, label=f"CC_mask {self.cc_mask:.3f}")
            ax.set_xlabel("residue number")
            ax.set_ylabel("CC")
            ax.set_ylim(min(0.0, np.nanmin(cc) if np.isfinite(cc).any() else 0.0), 1.0)
            ax.legend(fontsize=7)
        ax.set_title("per-residue CC")
        ax = axes[1]
        if self.fsc is not None:
            f = np.asarray(self.fsc["frequency"], float)
            ax.plot(f, np.asarray(self.fsc["fsc"], float), color="C0")
            for t in (0.5, 0.143, 0.0):
                ax.axhline(t, color="grey", lw=0.6, ls=":")
            ax.set_xlabel("spatial frequency (1/Å)")
            ax.set_ylabel("FSC map vs model")
            ax.set_ylim(-0.2, 1.02)
        ax.set_title("map–model FSC")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(Path(path), buf.getvalue())
        return Path(path)


def _sums(x, y, sel) -> list:
    """Lazy (or eager) sums (n, Σx, Σy, Σx², Σy², Σxy) over the boolean selection."""
    w = sel.astype(np.float64)
    xw = x * w
    yw = y * w
    return [w.sum(), xw.sum(), yw.sum(), (xw * x).sum(), (yw * y).sum(), (xw * y).sum()]


def _kth_largest(a, k: int):
    k = int(max(1, min(k, a.size)))
    if isinstance(a, da.Array):
        return da.topk(a.ravel(), k).min()
    flat = np.asarray(a).ravel()
    return np.partition(flat, flat.size - k)[flat.size - k]


def _residue_sums_tile(payload, *, shape, offset, voxel_size, n_groups, obs, calc):
    xyz, rad, grp = payload
    return selection_sums_block(obs, calc, offset=offset, voxel_size=voxel_size, xyz=xyz, radius=rad, group=grp,
                                n_groups=n_groups)


def _residue_sums(obs: xr.DataArray, calc: xr.DataArray, xyz, radius: float, group, n_groups: int):
    vs, org = vol_voxel_size(obs), vol_origin(obs)
    chunks = _grid_chunks(obs)
    tiles = bin_atoms(xyz, radius, shape=obs.shape, chunks=chunks, voxel_size=vs, origin=org)
    od = obs.data if isinstance(obs.data, da.Array) else da.from_array(np.asarray(obs.data), chunks=chunks)
    cd = calc.data if isinstance(calc.data, da.Array) else da.from_array(np.asarray(calc.data), chunks=chunks)
    if cd.chunks != od.chunks:
        cd = cd.rechunk(od.chunks)
    parts = []
    for idx, ids in tiles.members.items():
        parts.append(
            dask.delayed(_residue_sums_tile)(
                (xyz[ids], radius, group[ids]),
                shape=tiles.tile_shape(idx),
                offset=tiles.tile_offset(idx),
                voxel_size=vs,
                n_groups=n_groups,
                obs=od.blocks[idx],
                calc=cd.blocks[idx],
            )
        )
    return dask.delayed(sum)(parts, np.zeros((n_groups, 6))) if parts else np.zeros((n_groups, 6))


def map_model_metrics(
    vol: xr.DataArray,
    model: Any,
    *,
    resolution: float,
    atom_radius: float | None = None,
    per_residue: bool = True,
    fsc: bool = True,
    map_calc: xr.DataArray | None = None,
) -> MapModelMetrics:
    """Map–model correlations (spec 07): CC_mask, CC_box, CC_volume, CC_peaks, per-residue CC, FSC.

    Parameters
    ----------
    vol
        The map (numpy- or dask-backed Volume).
    model
        :class:`~chunkem.io.model.Model` in the map's frame (Å).
    resolution
        ``d`` (Å) of the model map; finer than Nyquist is clamped with a warning.
    atom_radius
        Radius (Å) of the per-residue / FSC selections (default mtriage's
        rule, see :func:`selection_radius`).
    per_residue, fsc
        Compute the per-residue CCs / the map–model FSC.
    map_calc
        A precomputed model map on ``vol``'s grid (default: rendered here).

    Returns
    -------
    MapModelMetrics
        Computed numbers (this is a reduction: it computes).

    Raises
    ------
    GeometryError
        The model lies outside the map.
    """
    validate_volume(vol)
    vs = vol_voxel_size(vol)
    d = check_resolution(resolution, vs)
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        calc = map_calc if map_calc is not None else model_map(model, like=vol, resolution=d)
    notes.extend(str(w.message) for w in caught)
    for n in notes:
        warnings.warn(n, UserWarning, stacklevel=2)
    at = atom_set(model)
    b_mean = float(np.mean(at.b_equivalent))
    radius = float(atom_radius) if atom_radius is not None else selection_radius(d, b_mean)
    if not radius > 0:
        raise ParameterError(f"atom_radius={atom_radius}: must be positive (Å)")

    mask = molecular_mask(model, vol)
    x = vol.data.astype(np.float64) if isinstance(vol.data, da.Array) else np.asarray(vol.data, np.float64)
    y = calc.data.astype(np.float64) if isinstance(calc.data, da.Array) else np.asarray(calc.data, np.float64)
    if isinstance(x, da.Array) and isinstance(y, da.Array) and y.chunks != x.chunks:
        y = y.rechunk(x.chunks)
    m = mask.data > 0.5
    (n_mask,) = dask.compute(m.sum())
    n_mask = int(n_mask)
    if n_mask == 0:
        raise ParameterError("the molecular mask is empty: no atom lies inside the map")
    t_calc, t_obs = dask.compute(_kth_largest(y, n_mask), _kth_largest(x, n_mask))
    sel_vol = y >= t_calc
    sel_peaks = sel_vol | (x >= t_obs)
    ones = da.ones_like(x, dtype=bool) if isinstance(x, da.Array) else np.ones(x.shape, bool)
    todo = {
        "box": _sums(x, y, ones),
        "mask": _sums(x, y, m),
        "volume": _sums(x, y, sel_vol),
        "peaks": _sums(x, y, sel_peaks),
    }
    group = None
    if per_residue:
        group, labels = residue_labels(model)
        n_res = int(group.max()) + 1
        todo["residues"] = _residue_sums(vol, calc, at.xyz, radius, group, n_res)
    (res,) = dask.compute(todo)
    cc = {k: cc_from_sums(np.asarray(v, float)) for k, v in res.items() if k != "residues"}
    n = {k: int(round(float(v[0]))) for k, v in res.items() if k != "residues"}
    residues: dict[str, np.ndarray] = {}
    if per_residue:
        rs = np.asarray(res["residues"], float)
        residues = dict(labels)
        residues["cc"] = np.array([cc_from_sums(r) for r in rs])
        residues["n_voxels"] = rs[:, 0].astype(int)
    fsc_out = _map_model_fsc(vol, model, radius) if fsc else None
    return MapModelMetrics(
        resolution=d,
        atom_radius=radius,
        cc_mask=cc["mask"],
        cc_box=cc["box"],
        cc_volume=cc["volume"],
        cc_peaks=cc["peaks"],
        n_mask=n["mask"],
        n_volume=n["volume"],
        n_peaks=n["peaks"],
        n_box=n["box"],
        residues=residues,
        fsc=fsc_out,
        warnings=notes,
    )


def _map_model_fsc(vol: xr.DataArray, model: Any, radius: float) -> dict[str, Any]:
    """FSC of (map × atom mask) vs (model map to Nyquist × atom mask)."""
    from ..kernels.fsc import resolution_crossing

    vs = vol_voxel_size(vol)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        calc = model_map(model, like=vol, resolution=nyquist(vs))
    mask = atom_mask(model, vol, radius=radius)
    org = vol_origin(vol)
    a = make_volume(vol.data * mask.data, voxel_size=vs, origin=org)
    b = make_volume(calc.data * mask.data, voxel_size=vs, origin=org)
    sums = spectral.shell_sums(spectral.rfft(a), spectral.rfft(b))
    curve = np.asarray(sums.fsc(), float)
    L = min(n * h for n, h in zip(vol.shape, vs))  # shortest box edge (Å), 00_conventions §2
    out: dict[str, Any] = {
        "frequency": np.asarray(sums.frequency, float).tolist(),
        "resolution": [float(r) if np.isfinite(r) else None for r in np.asarray(sums.resolution, float)],
        "fsc": [float(v) if np.isfinite(v) else None for v in curve],
    }
    for key, t in (("d_fsc_0", 0.0), ("d_fsc_0143", 0.143), ("d_fsc_05", 0.5)):
        out[key] = float(resolution_crossing(np.nan_to_num(curve, nan=0.0), box_edge=L, threshold=t).resolution_interp)
    return out
