"""Model maps: density of an atomic model on a grid, tile by tile.

:func:`model_map` renders a :class:`~chunkem.io.model.Model` on the grid of a
given map (``like=``, origin honoured) or on a new box around the model
(``voxel_size=``, ``padding=``). Three routes (``method=``):

``"spectral"`` (default; spec 06 §4)
    Render every atom as a sum of Gaussians (electron form factors from
    gemmi, its own B and occupancy, anisotropic U where present) with an
    extra ``blur`` (Refmac-compatible by default) so the grid samples it,
    tile by tile (:mod:`chunkem.engine.atoms`: one task per output tile, each
    rendering only its own voxels); then, through
    :mod:`chunkem.engine.spectral`, FFT, de-blur (× ``exp(+blur s²/4)``),
    cut at ``1/d`` (sharp, or a raised-cosine ``soft_edge``), inverse FFT.
    This is gemmi's ``DensityCalculator`` + Fourier resolution limit.
``"analytic"``
    Finite-resolution atomic images rendered directly in real space
    (:mod:`chunkem.kernels.finite_resolution`), truncated at
    ``radius_factor · d`` (2.5 d by default): no FFT at all, so any box size
    tiles; differs from the spectral route by the neglected ripple tails
    (≲ 1 % of the peak per atom for a sharp cut, less with ``soft_edge``).
``"gaussian"``
    The Gaussian-sum density itself (unlimited resolution, ``blur`` kept,
    no FFT) — what ``gemmi.DensityCalculatorE.put_model_density_on_grid``
    gives on a non-periodic box.

The box is not periodic: atoms are not wrapped around it. For the spectral
route the FFT box is implicitly periodic, so by default (``fft_padding=None``)
the rendering box is padded on every axis where atom images come closer to
the edge than their reach plus ``3 d``, and the result cropped back.

Units: Å, Å² (B, blur; decay convention ``B = 8π² U``, ``B > 0`` blurs),
density in the electron-table units of gemmi (Å⁻² per atom form factor in Å).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from ..engine import spectral
from ..engine.atoms import PackedAtoms, TileGrid, bin_atoms, grid_like, map_tiles, normalize_chunks
from ..engine.chunks import auto_chunks
from ..errors import GeometryError, ParameterError
from ..kernels.finite_resolution import DEFAULT_RADIUS_FACTOR, ResolutionLimit
from ..kernels.render import AtomSet, Imaging, atom_radii, render_block
from ..kernels.scattering import form_factors, refmac_blur
from ..volume import as_triple, make_volume
from ..volume import origin as vol_origin
from ..volume import voxel_size as vol_voxel_size

__all__ = ["model_map", "atom_set", "model_grid", "phantom_renderer", "nyquist", "check_resolution", "demo_stage"]

METHODS = ("spectral", "analytic", "gaussian")


def atom_set(model: Any, *, table: str = "electron") -> AtomSet:
    """The per-atom arrays a renderer needs, from a :class:`~chunkem.io.model.Model`.

    Hydrogens are kept if present; anisotropic U (``model.aniso_u``, NaN
    where absent) is used where given. Unknown elements raise
    :class:`~chunkem.errors.ParameterError`.
    """
    xyz = np.asarray(model.xyz, dtype=np.float64)
    if xyz.ndim != 2 or xyz.shape[0] == 0:
        raise ParameterError("the model holds no atoms")
    try:
        ff = form_factors(np.asarray(model.element).astype(str), table=table)
    except ParameterError as exc:
        src = getattr(model, "source", None)
        raise ParameterError(f"{src or 'model'}: {exc}") from None
    aniso = getattr(model, "aniso_u", None)
    if aniso is not None:
        aniso = np.nan_to_num(np.asarray(aniso, dtype=np.float64), nan=0.0)
    return AtomSet(xyz, np.asarray(model.b_iso, np.float64), np.asarray(model.occupancy, np.float64), ff, aniso)


def nyquist(vs: Sequence[float]) -> float:
    """Finest resolution (Å) a grid holds isotropically: ``2 × max(voxel size)``."""
    return 2.0 * float(max(vs))


def check_resolution(resolution: float, vs: Sequence[float], *, what: str = "resolution") -> float:
    """Validate ``d`` (Å); below Nyquist it is clamped to ``2 × voxel size`` with a warning."""
    try:
        d = float(resolution)
    except (TypeError, ValueError):
        raise ParameterError(f"{what}={resolution!r}: must be a number of Å") from None
    if not (math.isfinite(d) and d > 0):
        raise ParameterError(f"{what}={resolution!r}: must be a positive number of Å")
    nq = nyquist(vs)
    if d < nq * (1 - 1e-6):
        warnings.warn(
            f"{what}={d} Å is finer than Nyquist for voxel size {tuple(vs)} Å; using {nq:.4g} Å",
            UserWarning,
            stacklevel=3,
        )
        d = nq
    return d


def model_grid(model: Any, *, voxel_size: float | Sequence[float], padding: float = 5.0
               ) -> tuple[tuple[int, int, int], tuple[float, float, float], tuple[float, float, float]]:
    """A box around the model: (shape, voxel_size, origin), z, y, x, Å.

    The origin is ``min(xyz) − padding`` rounded down to a multiple of the
    voxel size; the box ends at or beyond ``max(xyz) + padding``.
    """
    vs = as_triple(voxel_size, "voxel_size")
    if any(v <= 0 for v in vs):
        raise ParameterError(f"voxel_size={voxel_size}: must be positive (Å)")
    if padding < 0:
        raise ParameterError(f"padding={padding} Å: must be ≥ 0")
    zyx = np.asarray(model.xyz, dtype=np.float64)[:, ::-1]
    lo = zyx.min(axis=0) - padding
    hi = zyx.max(axis=0) + padding
    h = np.asarray(vs)
    org = np.floor(lo / h) * h
    shape = np.floor((hi - org) / h + 1e-9).astype(int) + 1
    return tuple(int(n) for n in shape), vs, tuple(float(o) for o in org)  # type: ignore[return-value]


def _render_tile(payload: tuple[AtomSet, np.ndarray], *, shape, offset, voxel_size, imaging: Imaging) -> np.ndarray:
    atoms, radius = payload
    return render_block(shape, offset=offset, voxel_size=voxel_size, atoms=atoms, imaging=imaging, radius=radius)


def _deblur_cut(F: np.ndarray, *, kz, ky, kx, blur: float, resolution: float | None, soft_edge: float) -> np.ndarray:
    s2 = kz * kz + ky * ky + kx * kx
    factor = np.exp(0.25 * blur * s2) if blur else np.ones_like(s2)
    if resolution is not None:
        factor = factor * ResolutionLimit(resolution, soft_edge).window(np.sqrt(s2))
    return F * factor.astype(np.float32 if F.dtype == np.complex64 else np.float64)


def _fft_pad(atoms_zyx: np.ndarray, radii: np.ndarray, shape, vs, org, extra: float) -> tuple[int, int, int]:
    """Voxels to pad per side on axes where atom images come within reach + extra Å of an edge."""
    h = np.asarray(vs)
    lo = np.asarray(org)
    hi = lo + (np.asarray(shape) - 1) * h
    near_lo = np.any(atoms_zyx - radii[:, None] - extra < lo, axis=0)
    near_hi = np.any(atoms_zyx + radii[:, None] + extra > hi, axis=0)
    margin = float(radii.max()) + extra
    return tuple(int(math.ceil(margin / h[ax])) if (near_lo[ax] or near_hi[ax]) else 0 for ax in range(3))  # type: ignore[return-value]


def model_map(
    model: Any,
    *,
    resolution: float | None = None,
    like: xr.DataArray | None = None,
    voxel_size: float | Sequence[float] | None = None,
    padding: float = 5.0,
    method: str = "spectral",
    blur: float | None = None,
    cutoff: float = 1e-5,
    soft_edge: float = 0.0,
    radius_factor: float = DEFAULT_RADIUS_FACTOR,
    table: str = "electron",
    chunks: Any = None,
    fft_padding: int | Sequence[int] | None = None,
    name: str | None = "modelmap",
) -> xr.DataArray:
    """Density map of an atomic model, rendered tile by tile.

    Parameters
    ----------
    model
        :class:`~chunkem.io.model.Model` (xyz Å, B Å² decay convention,
        occupancy, element, optional anisotropic U).
    resolution
        ``d`` (Å) of the resolution limit; required except for
        ``method="gaussian"``. Finer than Nyquist (2 × voxel size) is clamped
        to Nyquist with a warning.
    like
        A Volume whose grid (shape, voxel size, origin, chunks, header) the
        map is rendered on. The result is lazy when ``like`` is dask-backed,
        in memory when it is numpy-backed.
    voxel_size
        Å, for a new box around the model (when ``like`` is not given);
        default ``d / 3`` (gemmi's rate 1.5). The result is lazy.
    padding
        Å of empty space around the model in a new box.
    method
        ``"spectral"`` (default), ``"analytic"`` or ``"gaussian"`` (see the
        module notes).
    blur
        Extra B (Å²) for the Gaussian rendering. Default: Refmac-compatible
        ``max(8π²/1.1 · h² − B_min, 0)`` for the spectral route (removed
        again in Fourier space), 0 for ``"gaussian"``.
    cutoff
        Density level where each Gaussian atom is cut (gemmi: 1e-5).
    soft_edge
        Width (1/Å) of a raised-cosine resolution edge ending at ``1/d``
        (0 = sharp cut).
    radius_factor
        Analytic images are truncated at ``radius_factor · d`` Å.
    table
        ``"electron"`` (C4322, default) or ``"xray"`` (IT92).
    chunks
        Output tiles (default: ``like``'s chunks, else automatic).
    fft_padding
        Voxels of padding per side for the spectral route; ``None`` = only
        where atom images come near an edge (see the module notes); 0 = use
        the box as the periodic FFT box (gemmi's convention).
    name
        Name of the result.

    Returns
    -------
    xarray.DataArray
        The model map (float32).

    Raises
    ------
    GeometryError
        No atom comes near the grid (model outside the map).
    ParameterError
        Unknown element, bad method or resolution.

    Examples
    --------
    >>> import numpy as np
    >>> from chunkem.phantoms import build_model
    >>> m = build_model(12, seed=1)
    >>> v = model_map(m, resolution=3.0, voxel_size=1.0, padding=4.0)
    >>> v.attrs["voxel_size"], bool(float(v.max()) > 0)
    ((1.0, 1.0, 1.0), True)
    """
    if method not in METHODS:
        raise ParameterError(f"method={method!r}: use one of {METHODS}")
    if like is not None:
        grid = grid_like(like, chunks)
    else:
        if voxel_size is None:
            if resolution is None:
                raise ParameterError("give like= (a map) or voxel_size= (Å) for the model map grid")
            voxel_size = float(resolution) / 3.0
        shape, vs, org = model_grid(model, voxel_size=voxel_size, padding=padding)
        grid = TileGrid(shape, vs, org, normalize_chunks(chunks if chunks is not None else auto_chunks(shape), shape))
    shape, vs, org, out_chunks, lazy = grid.shape, grid.voxel_size, grid.origin, grid.chunks, grid.lazy
    if method != "gaussian":
        if resolution is None:
            raise ParameterError(f"method={method!r} needs resolution= (Å)")
        resolution = check_resolution(resolution, vs)
    elif resolution is not None:
        raise ParameterError("method='gaussian' has no resolution limit; leave resolution=None")

    atoms = atom_set(model, table=table)
    if not np.any(atoms.occ):
        warnings.warn("every atom has zero occupancy: the model map is zero", UserWarning, stacklevel=2)
    if method == "analytic":
        imaging = Imaging("finite", resolution=resolution, soft_edge=soft_edge, radius_factor=radius_factor,
                          cutoff=cutoff)
        blur_used = 0.0
    else:
        if blur is None:
            blur_used = refmac_blur(vs, float(atoms.b_equivalent.min())) if method == "spectral" else 0.0
        else:
            blur_used = float(blur)
        imaging = Imaging("gaussian", blur=blur_used, cutoff=cutoff)
    radii = atom_radii(atoms, imaging)

    pad = (0, 0, 0)
    if method == "spectral":
        if fft_padding is None:
            pad = _fft_pad(atoms.xyz[:, ::-1], radii, shape, vs, org, 3.0 * float(resolution))  # type: ignore[arg-type]
        else:
            pad = tuple(int(p) for p in np.broadcast_to(np.asarray(fft_padding), (3,)))  # type: ignore[assignment]
            if any(p < 0 for p in pad):
                raise ParameterError(f"fft_padding={fft_padding}: must be ≥ 0 voxels")
    rshape = tuple(n + 2 * p for n, p in zip(shape, pad))
    rorg = tuple(o - p * h for o, p, h in zip(org, pad, vs))
    rchunks = out_chunks if pad == (0, 0, 0) else normalize_chunks(auto_chunks(rshape), rshape)

    tiles = bin_atoms(atoms.xyz, radii, shape=rshape, chunks=rchunks, voxel_size=vs, origin=rorg)
    _check_inside(model, atoms, radii, shape, vs, org, tiles)
    from dask.base import tokenize

    token = tokenize(atoms.xyz, atoms.b_iso, atoms.occ, atoms.ff.a, atoms.ff.b, atoms.aniso_u, imaging, radii)
    data = map_tiles(_render_tile, tiles, table=PackedAtoms(atoms, radii), dtype=np.float32, name="render-atoms",
                     token=token, imaging=imaging)
    vol = make_volume(data, voxel_size=vs, origin=rorg, name=name)
    if method == "spectral":
        vol = spectral.fourier_filter(vol, _deblur_cut, blur=blur_used, resolution=resolution, soft_edge=soft_edge)
        if pad != (0, 0, 0):
            sl = tuple(slice(p, p + n) for p, n in zip(pad, shape))
            vol = make_volume(vol.data[sl].rechunk(out_chunks), voxel_size=vs, origin=org, name=name)
    out = make_volume(vol.data, voxel_size=vs, origin=org, name=name, header=grid.header)
    out.attrs["model_map"] = {
        "method": method,
        "resolution": resolution,
        "blur": blur_used,
        "cutoff": cutoff,
        "soft_edge": soft_edge,
        "radius_factor": radius_factor if method == "analytic" else None,
        "table": table,
        "fft_padding": list(pad),
        "b_convention": "decay (B = 8 pi^2 U)",
    }
    if not lazy:
        out = out.copy(data=out.data.compute())
    return out


def _check_inside(model, atoms: AtomSet, radii, shape, vs, org, tiles) -> None:
    if not tiles.members:
        zyx = atoms.xyz[:, ::-1]
        lo = np.asarray(org)
        hi = lo + (np.asarray(shape) - 1) * np.asarray(vs)
        mlo, mhi = zyx.min(axis=0), zyx.max(axis=0)
        raise GeometryError(
            f"model outside the map: no atom of {getattr(model, 'source', None) or 'the model'} comes within its "
            f"reach of the grid (grid x {lo[2]:.2f}..{hi[2]:.2f}, y {lo[1]:.2f}..{hi[1]:.2f}, "
            f"z {lo[0]:.2f}..{hi[0]:.2f} Å; model x {mlo[2]:.2f}..{mhi[2]:.2f}, y {mlo[1]:.2f}..{mhi[1]:.2f}, "
            f"z {mlo[0]:.2f}..{mhi[0]:.2f} Å). Check the map origin / nstart and the model frame."
        )
    zyx = atoms.xyz[:, ::-1]
    lo = np.asarray(org)
    hi = lo + (np.asarray(shape) - 1) * np.asarray(vs)
    out = np.any((zyx < lo) | (zyx > hi), axis=1)
    if out.any():
        warnings.warn(
            f"{int(out.sum())} of {len(atoms)} atoms lie outside the map box; their density is cut at the edge",
            UserWarning,
            stacklevel=3,
        )


def phantom_renderer(model: Any, *, shape: Sequence[int], voxel_size: Sequence[float],
                     origin: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """Renderer for :func:`chunkem.phantoms.make_phantom`: model map limited to the Nyquist sphere.

    The spectral route on a periodic box (``fft_padding=0``), as the
    phantom's gemmi renderer. Returns a float64 array (z, y, x).
    """
    vs = as_triple(voxel_size, "voxel_size")
    grid = make_volume(np.zeros(tuple(int(n) for n in shape), np.float32), voxel_size=vs, origin=origin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        vol = model_map(model, like=grid, resolution=nyquist(vs), fft_padding=0)
    return np.asarray(vol.values, dtype=np.float64)


def demo_stage(ctx: dict[str, Any]) -> dict[str, Any]:
    """Demo: render the phantom model, CC with the phantom maps, a short B refinement.

    ``ctx["phantom"]`` has ``.model``, ``.truth``, ``.half1``, ``.half2``;
    ``ctx["outdir"]`` is where the model map is written.
    """
    from pathlib import Path

    from ..kernels.render import cc_from_sums, cc_sums
    from .refine import refine_adp

    ph = ctx["phantom"]
    outdir = Path(ctx.get("outdir", "."))
    truth = ph.truth
    full = make_volume((np.asarray(ph.half1.values, np.float64) + np.asarray(ph.half2.values, np.float64)) / 2,
                       voxel_size=vol_voxel_size(truth), origin=vol_origin(truth), name="full")
    res = float(ph.params.get("resolution", nyquist(vol_voxel_size(truth)))) if hasattr(ph, "params") else None
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mm_nyq = model_map(ph.model, like=truth, resolution=nyquist(vol_voxel_size(truth)), fft_padding=0)
        mm = model_map(ph.model, like=truth, resolution=res)
    t_render = time.perf_counter() - t0
    # independent reference: gemmi's DensityCalculatorE on the same grid
    from ..phantoms import render_gemmi

    gem = render_gemmi(ph.model, shape=truth.shape, voxel_size=vol_voxel_size(truth), origin=vol_origin(truth))
    cc_gemmi = cc_from_sums(cc_sums(mm_nyq.values, gem))
    cc_full = cc_from_sums(cc_sums(mm.values, full.values))
    peak = float(np.abs(gem).max())
    summary: dict[str, Any] = {
        "render_s": round(t_render, 3),
        "cc_modelmap_vs_gemmi": round(float(cc_gemmi), 8),
        "max_abs_diff_vs_gemmi_rel": float(np.abs(mm_nyq.values - gem).max() / peak) if peak else None,
        "cc_modelmap_vs_fullmap": round(float(cc_full), 5),
        "resolution": res,
    }
    from ..io import save

    path = outdir / "modelmap.mrc"
    save(mm, path)
    summary["modelmap"] = str(path)
    start = ph.model.with_values(b_iso=float(np.median(ph.model.b_iso)))
    t0 = time.perf_counter()
    rr = refine_adp(start, full, resolution=res, max_iter=15, group="residue")
    summary.update(
        {
            "refine_s": round(time.perf_counter() - t0, 3),
            "refine_cc_before": round(rr.cc_before, 5),
            "refine_cc_after": round(rr.cc_after, 5),
            "refine_b_corr_with_truth": round(float(np.corrcoef(rr.model.b_iso, ph.model.b_iso)[0, 1]), 4),
        }
    )
    return summary
