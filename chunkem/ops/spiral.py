"""Spiral-phase (monogenic) family: LocSpiral, LocBSharpen, LocBFactor, LocOccupancy.

After Kaur et al., Nat. Commun. 12, 1240 (2021) (MATLAB code
``1aviervargas/LocSpiral-LocBSharpen-LocBFactor-LocOccupancy``); spec
``04_spiral_phase_family.md``. Each op sweeps a bank of Gaussian frequency
bands from a low- to a high-resolution limit. For every band the map is
band-passed and Riesz-transformed (:mod:`chunkem.engine.spectral`: ONE
forward FFT of the map, then per band a pointwise kernel and 3 (Riesz) or 2
("eco") + 1 inverse FFTs), giving a local amplitude ``m`` and phase cosine.
A global reduction per band gives the noise (or molecule) amplitude
quantile ``q``; a pointwise update then adds the band to a few per-voxel
running sums. Bands are never stacked, so memory does not grow with their
number.

Laziness
--------
For dask-backed input every op returns dask-backed results and computes
nothing. The graph is *gated*: band ``j + 1``'s Fourier kernels depend on
band ``j``'s finished amplitude and band ``j - 1``'s finished accumulator
update, so any scheduler runs at most two bands at a time (band ``j``'s
quantile and update overlap band ``j + 1``'s FFTs) instead of starting every
band's FFTs at once or fusing all updates into one final task. Within a
band the inverse FFTs run one after another. numpy-backed input gives
numpy-backed results (computed at the end).

Cost per band
-------------
4 inverse real FFTs of the whole box (Riesz; 3 with ``"eco"``) — exact
Riesz needs them (two complex transforms would cost the same) — plus a few
pointwise passes: the band filter, ``FH/|k|`` shared by the three Riesz
components (each then one multiply by ``-i k_axis``), the running
``c² + Σ r²`` with the square root fused into the last, an exact noise
quantile (per-block value extraction and 16-bit radix histograms in
parallel, then one bucket partitioned: no second pass, no subsample) and
the accumulator update. Per-band real arrays are z-slabs (views of a
gathered inverse FFT); outputs are rechunked to the input's chunks once.

B-factor sign
-------------
LocBFactor fits ``ln(C·m·sqrt(N_vox))`` against ``s²`` per voxel. ``slope``
is the reference's ``BMap``; the local B reported as ``b_factor`` is
``4 × slope`` in **RELION sign** (negative for decaying amplitudes; the
decay B of ``00_conventions`` is ``-b_factor``).

Deviations from the reference (each with a switch back)
-------------------------------------------------------
* Band width in absolute frequency: ``band_sigma`` (1/Å, default 0.02, the
  reference's ``bw = 4.8`` Fourier voxels on its ~250 Å example boxes), so
  results do not depend on the box size; ``band_width_voxels`` gives the
  reference's box-relative ``bw``.
* Band normalisation ``"power"`` (default): each band has unit L2 norm over
  the full grid, so a white spectrum gives equal amplitudes in every band
  and ``4 × slope`` estimates the decay of the local amplitudes. The
  reference divides by the band's sum (``normalization="mean"``), which
  adds about ``-ln s`` to every band's log amplitude; the exact resulting
  shift of ``b_factor`` is ``normalization_offset_b`` in the result
  (``b_mean = b_power + offset`` for fits over all bands).
* Quadrature: exact Riesz vector by default; ``quadrature="eco"`` is the
  reference's cheaper scalar spiral filter.
* Frequency grid: ``fftfreq`` (correct for even N; the reference displaces
  its filters by one Fourier voxel for even boxes, not reproduced).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize
from dask.core import flatten
from dask.highlevelgraph import HighLevelGraph

from ..engine import spectral
from ..engine.local import run_local
from ..errors import GeometryError, ParameterError
from ..kernels import spiral as K
from ..volume import check_aligned, check_independent, like, origin, validate_volume, voxel_size

__all__ = [
    "DEFAULT_BAND_SIGMA",
    "BandBank",
    "band_bank",
    "SpiralResult",
    "LocBFactorResult",
    "OccupancyResult",
    "MaturityResult",
    "AutoMask",
    "GuinierResult",
    "locspiral",
    "locbsharpen",
    "locbfactor",
    "lococcupancy",
    "maturity_index",
    "auto_mask",
    "guinier_b",
    "choose_probes",
    "plot_guinier",
    "plot_slices",
    "demo_stage",
]

#: Default Gaussian band width σ in 1/Å (≈ the reference's bw 4.5–4.8 voxels on ~250 Å boxes).
DEFAULT_BAND_SIGMA = 0.02
#: Fewer background voxels than this make the noise quantile unstable (warning).
MIN_BACKGROUND_VOXELS = 10_000
NORMALIZATIONS = ("power", "mean")


# --- the band bank ---------------------------------------------------------------


@dataclass
class BandBank:
    """The frequency bands of a sweep, resolved for one box.

    Attributes
    ----------
    centres
        Band centres (1/Å), from low to high resolution.
    sigma
        Gaussian band width σ (1/Å).
    dc_sigma
        Width (1/Å) of the factor removing the DC term.
    scales
        Per-band normalisation factor applied to the filter.
    normalization
        ``"power"`` (unit L2 norm) or ``"mean"`` (unit sum, the reference).
    quadrature
        ``"riesz"`` or ``"eco"``.
    l1, l2
        Full-grid ``Σ H`` and ``sqrt(Σ H²)`` of each unnormalised band.
    shape, voxel_size
        The box.
    """

    centres: np.ndarray
    sigma: float
    dc_sigma: float
    scales: np.ndarray
    normalization: str
    quadrature: str
    l1: np.ndarray
    l2: np.ndarray
    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]

    @property
    def n_bands(self) -> int:
        return int(self.centres.size)

    @property
    def resolutions(self) -> np.ndarray:
        """Band centres as resolutions (Å)."""
        return 1.0 / self.centres

    @property
    def s2(self) -> np.ndarray:
        """Band centres squared (1/Å²), the abscissae of the local Guinier fits."""
        return self.centres**2

    @property
    def n_inverse_ffts(self) -> int:
        """Inverse FFTs per band (1 for the band-passed map + the quadrature)."""
        return 1 + len(K.quadrature_components(self.quadrature))

    def normalization_offset_b(self) -> float:
        """Shift of ``4 × slope`` between ``"mean"`` and ``"power"`` normalisation (Å²).

        ``ln`` amplitudes under the reference's ``"mean"`` normalisation equal
        those under ``"power"`` plus ``ln(l2_j / l1_j)`` per band, so a line
        fitted over all bands shifts by 4 × the slope of that term vs ``s²``.
        """
        if self.n_bands < 2:
            return 0.0
        return float(4.0 * np.polyfit(self.s2, np.log(self.l2 / self.l1), 1)[0])

    def to_dict(self) -> dict:
        return {
            "n_bands": self.n_bands,
            "centres_per_A": self.centres.tolist(),
            "resolutions_A": self.resolutions.tolist(),
            "band_sigma_per_A": self.sigma,
            "band_width_voxels": self.sigma * K.box_length(self.shape, self.voxel_size),
            "normalization": self.normalization,
            "quadrature": self.quadrature,
            "inverse_ffts_per_band": self.n_inverse_ffts,
            "normalization_offset_b_A2": self.normalization_offset_b(),
        }


def _resolution_range(resolution_range: Sequence[float], shape, vs) -> tuple[float, float]:
    try:
        low, high = (float(r) for r in resolution_range)
    except (TypeError, ValueError):
        raise ParameterError(
            f"resolution_range must be two resolutions (low, high) in Å, got {resolution_range!r}"
        ) from None
    if not (math.isfinite(low) and math.isfinite(high)) or high <= 0:
        raise ParameterError(f"resolution_range must be positive resolutions in Å, got ({low}, {high})")
    if low <= high:
        raise ParameterError(
            f"resolution_range ({low}, {high}) Å is inverted or empty: give (low, high) with low > high, "
            "e.g. (15, 3.2)"
        )
    nyquist = 2.0 * max(vs)
    if high < nyquist - 1e-9:
        raise ParameterError(
            f"resolution_range high end {high} Å is beyond Nyquist ({nyquist:.3f} Å for voxel size "
            f"{max(vs):.3f} Å)"
        )
    L = K.box_length(shape, vs)
    if low > L:
        raise ParameterError(f"resolution_range low end {low} Å is coarser than the box ({L:.1f} Å)")
    return low, high


def band_bank(
    shape: Sequence[int],
    voxel_size: Sequence[float],
    *,
    resolution_range: Sequence[float],
    n_bands: int | None = None,
    band_sigma: float | None = None,
    band_width_voxels: float | None = None,
    normalization: str = "power",
    quadrature: str = "riesz",
    compat_matlab_floor: bool = False,
) -> BandBank:
    """Resolve the bands of a sweep for a box (no data needed).

    Parameters
    ----------
    shape, voxel_size
        Box shape (voxels) and voxel size (Å).
    resolution_range
        ``(low, high)`` in Å, ``low > high >= 2 × voxel size``.
    n_bands
        Number of bands. Default: one band per σ across the range
        (``ceil((1/high - 1/low)/σ) + 1``, at least 2).
    band_sigma
        Gaussian band width σ in 1/Å (default :data:`DEFAULT_BAND_SIGMA`).
    band_width_voxels
        Alternatively the reference's ``bw`` in Fourier voxels of the box
        (σ = bw / L, L the shortest box edge in Å).
    normalization
        ``"power"`` (default) or ``"mean"`` (reference); see the module notes.
    quadrature
        ``"riesz"`` (default, exact) or ``"eco"`` (reference's approximation).
    compat_matlab_floor
        Band centres at the reference's integer Fourier voxels.

    Returns
    -------
    BandBank

    Examples
    --------
    >>> b = band_bank((100, 100, 100), (1.0, 1.0, 1.0), resolution_range=(20, 5), n_bands=4)
    >>> b.resolutions.round(2).tolist()
    [20.0, 10.0, 6.67, 5.0]
    """
    vs = tuple(float(v) for v in voxel_size)
    shp = tuple(int(n) for n in shape)
    low, high = _resolution_range(resolution_range, shp, vs)
    L = K.box_length(shp, vs)
    if band_sigma is not None and band_width_voxels is not None:
        raise ParameterError("give band_sigma (1/Å) or band_width_voxels, not both")
    if band_width_voxels is not None:
        if not band_width_voxels > 0:
            raise ParameterError(f"band_width_voxels must be > 0, got {band_width_voxels}")
        sigma = float(band_width_voxels) / L
    else:
        sigma = DEFAULT_BAND_SIGMA if band_sigma is None else float(band_sigma)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ParameterError(f"band_sigma must be a positive frequency in 1/Å, got {band_sigma}")
    if normalization not in NORMALIZATIONS:
        raise ParameterError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if quadrature not in K.QUADRATURES:
        raise ParameterError(f"quadrature must be one of {K.QUADRATURES}, got {quadrature!r}")
    if n_bands is None:
        n_bands = max(2, int(math.ceil((1.0 / high - 1.0 / low) / sigma - 1e-9)) + 1)
    if int(n_bands) < 2:
        raise ParameterError(f"n_bands must be at least 2, got {n_bands}")
    centres = K.band_centres(low, high, shape=shp, voxel_size=vs, n_bands=int(n_bands),
                             compat_matlab_floor=compat_matlab_floor)
    if np.any(centres <= 0):
        raise ParameterError(f"resolution_range low end {low} Å gives a band at zero frequency in this box")
    dc = K.DC_SIGMA_VOXELS / L
    radii, counts = K.full_grid_radii(shp, vs)
    norms = np.array([K.band_norms(radii, counts, centre=f, sigma=sigma, dc_sigma=dc) for f in centres])
    l1, l2 = norms[:, 0], norms[:, 1]
    scales = 1.0 / (l2 if normalization == "power" else l1)
    return BandBank(centres, sigma, dc, scales, normalization, quadrature, l1, l2, shp, vs)


# --- shared machinery -------------------------------------------------------------------


def _as_dask(vol: xr.DataArray) -> tuple[xr.DataArray, bool]:
    if isinstance(vol.data, da.Array):
        return vol, True
    return vol.chunk(dict(zip(vol.dims, vol.shape))), False


def _prepare(vol: xr.DataArray, mask: xr.DataArray | None, what: str) -> tuple[xr.DataArray, xr.DataArray, bool]:
    if not isinstance(vol, xr.DataArray):
        raise GeometryError(f"{what}: expected a Volume (xarray.DataArray), got {type(vol).__name__}")
    validate_volume(vol)
    if mask is None:
        raise ParameterError(f"{what}: a molecule mask is required (make one with auto_mask(vol))")
    validate_volume(mask.astype(np.float32) if mask.dtype != np.float32 else mask, source="mask")
    check_aligned(vol, mask, names=["map", "mask"])
    dvol, lazy = _as_dask(vol)
    m = mask.data
    if not isinstance(m, da.Array):
        m = da.from_array(np.asarray(m), chunks=dvol.data.chunks)
    elif m.chunks != dvol.data.chunks:
        m = m.rechunk(dvol.data.chunks)
    dmask = like(dvol, m.astype(np.float32), name="mask")
    return dvol, dmask, lazy


def _check_mask_counts(mask: xr.DataArray, sel: xr.DataArray | None, *, need: str) -> None:
    """Eager check of a numpy-backed mask (a lazy one is checked inside the graph when computed)."""
    if isinstance(mask.data, da.Array):
        return
    inside = int(np.count_nonzero(np.asarray(mask.values) > 0.5))
    if inside == 0:
        raise ParameterError(_EMPTY_MOL)
    if need == "background" and sel is not None:
        if int(np.count_nonzero(np.asarray(sel.values) > 0.5)) == 0:
            raise ParameterError(_EMPTY_BG)


def _background(dmask: xr.DataArray) -> xr.DataArray:
    """Noise-reference set: ¬mask ∩ sphere of radius L/2 about the centre voxel N//2 (LOCAL, no halo)."""
    vs, org, shape = voxel_size(dmask), origin(dmask), dmask.shape
    centre = tuple(o + (n // 2) * v for o, n, v in zip(org, shape, vs))
    radius = K.box_length(shape, vs) / 2.0
    return run_local(K.background_set, dmask, reach=0.0, with_offset=True, dtype=np.float32,
                     centre=centre, radius=radius, name="background")


def _molecule(dmask: xr.DataArray) -> xr.DataArray:
    return like(dmask, (dmask.data > 0.5).astype(np.float32), name="molecule")


def _block_values(m: np.ndarray, sel: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """One block's part of a set quantile: the values of ``m`` in ``sel`` and their radix histogram."""
    v = np.asarray(m)[np.asarray(sel) > 0.5]
    return v, (K.radix_counts(v) if v.dtype == np.float32 else None)


def _gather_quantile(level: float, method: str, what: str, minimum: int, *parts: tuple) -> np.float64:
    vals = [p[0] for p in parts]
    n = sum(v.size for v in vals)
    if n == 0:
        raise ParameterError(what)
    if n < minimum:
        warnings.warn(f"only {n} voxels in the noise-reference set (< {minimum}): the band quantiles are "
                      "unstable (a larger box gives more background)", stacklevel=1)
    counts = None
    if all(p[1] is not None for p in parts):
        counts = sum(p[1] for p in parts)
    return np.float64(K.quantile(vals, level, method=method, counts=counts))


def _set_quantile(m: da.Array, sel: da.Array, *, level: float, method: str, empty_message: str,
                  minimum: int) -> da.Array:
    """REDUCE: exact ``level``-quantile of ``m`` over ``sel`` as a 0-d dask array.

    Each block extracts its values and their radix histogram (in parallel);
    one task merges the histograms and partitions the one bucket that holds
    the quantile (:func:`chunkem.kernels.spiral.order_statistics`).
    """
    if m.chunks != sel.chunks:
        sel = sel.rechunk(m.chunks)
    name = "band-quantile-" + tokenize(m.name, sel.name, level, method, minimum)
    vname = "band-values-" + name[len("band-quantile-"):]
    mk, sk = list(flatten(m.__dask_keys__())), list(flatten(sel.__dask_keys__()))
    dsk: dict = {(vname, i): (_block_values, a, b) for i, (a, b) in enumerate(zip(mk, sk))}
    dsk[(name,)] = (partial(_gather_quantile, float(level), method, empty_message, int(minimum)),
                    *[(vname, i) for i in range(len(mk))])
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[m, sel])
    return da.Array(graph, name, chunks=(), dtype=np.float64, meta=np.empty((), np.float64))


def _inner_chunks(shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Real-space chunks of the per-band arrays: whole (y, x) planes in z-slabs of <= 64 MB, >= 4 slabs.

    A gathered inverse FFT returns one C-ordered block; z-slabs of it are
    views (no copy, unlike cubic chunks), and the slab FFT path makes slabs
    anyway. The ops rechunk their outputs to the input's chunks once.
    """
    from ..engine.chunks import slab_depth

    nz, ny, nx = (int(n) for n in shape)
    depth = min(slab_depth(ny * nx * 4, nz, target_bytes=64 * 2**20), max(1, -(-nz // 4)))
    k = -(-nz // depth)
    base, extra = divmod(nz, k)
    return (tuple(base + (1 if i < extra else 0) for i in range(k)), (ny,), (nx,))


def _band(spec: spectral.Spectrum, bank: BandBank, j: int, dep: da.Array | None, chunks
          ) -> tuple[da.Array, da.Array]:
    """Band ``j``: the band-passed map ``c`` and local amplitude ``m`` (lazy, in ``chunks``).

    One pointwise filter of the shared spectrum (``FH = F·H_j``), then the
    quadrature multipliers (Riesz: ``FH/|k|`` once, then ``-i k_axis`` per
    component, one pass each), one inverse FFT each. The inverse FFTs run
    one after another, each squared into the running ``c² + Σ r²`` before
    the next starts (the square root fused into the last), so one band never
    holds more than two full real maps besides ``c`` (each FFT uses every
    core anyway).
    """
    # the band is zero (< 1e-9 of its peak) beyond its support: work on that window only
    g = spectral.window(spectral.after(spec, dep), K.band_support(centre=float(bank.centres[j]), sigma=bank.sigma))
    fh = spectral.apply(K.band_filter, g, centre=float(bank.centres[j]), sigma=bank.sigma, dc_sigma=bank.dc_sigma,
                        scale=float(bank.scales[j]))
    c = _irfft_slabs(fh, chunks)
    sq = da.map_blocks(_square_block, c, dtype=np.float32)
    comps = K.quadrature_components(bank.quadrature)
    base = spectral.apply(K.riesz_base, fh) if bank.quadrature == "riesz" else fh
    for i, comp in enumerate(comps):
        if bank.quadrature == "riesz":
            qspec = spectral.apply(K.riesz_component, base, component=comp)
        else:
            qspec = spectral.apply(K.quadrature_filter, fh, component=comp)
        r = _irfft_slabs(spectral.after(qspec, spectral.done(sq)), chunks)
        last = i == len(comps) - 1
        sq = da.map_blocks(_add_square_sqrt_block if last else _add_square_block, sq, r, dtype=np.float32)
    return c, sq


def _irfft_slabs(spec: spectral.Spectrum, chunks) -> da.Array:
    """Inverse FFT in the z-slab ``chunks``; a one-chunk (gathered) inverse is split by views, not copied."""
    if isinstance(spec.data, da.Array) and spec.data.npartitions == 1:
        whole = spectral.irfft(spec, chunks=spec.real_shape).data
        (key,) = list(flatten(whole.__dask_keys__()))
        name = "slabs-" + tokenize(whole.name, chunks)
        starts = np.cumsum((0,) + tuple(chunks[0]))
        dsk = {(name, i, 0, 0): (_z_view, key, int(a), int(b)) for i, (a, b) in enumerate(zip(starts[:-1], starts[1:]))}
        graph = HighLevelGraph.from_collections(name, dsk, dependencies=[whole])
        return da.Array(graph, name, chunks=(tuple(chunks[0]),) + tuple((n,) for n in spec.real_shape[1:]),
                        dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))
    return spectral.irfft(spec, chunks=chunks).data


def _z_view(x: np.ndarray, z0: int, z1: int) -> np.ndarray:
    return x[z0:z1]  # a view (dask's own getitem copies small slices)


def _square_block(c: np.ndarray) -> np.ndarray:
    return np.square(c, dtype=np.float32)


def _add_square_block(acc: np.ndarray, r: np.ndarray) -> np.ndarray:
    out = np.square(r, dtype=np.float32)
    out += acc
    return out


def _add_square_sqrt_block(acc: np.ndarray, r: np.ndarray) -> np.ndarray:
    out = _add_square_block(acc, r)
    return np.sqrt(out, out=out)


#: Overlap band j's quantile and update with band j + 1's inverse FFTs (at most two bands in flight).
OVERLAP_BANDS = True


def _next_gate(m: da.Array, prev_done: da.Array | None, acc_done: da.Array) -> tuple[da.Array, da.Array]:
    """Gate of band ``j + 1`` and the new "update done" token, given band ``j``'s amplitude ``m``.

    With :data:`OVERLAP_BANDS`: band ``j``'s amplitude is complete and band
    ``j - 1``'s update (``prev_done``) is done, so band ``j + 1``'s FFTs run
    while band ``j``'s quantile and update finish (those are partly
    single-threaded) and no more than two bands are ever in flight: memory
    still does not grow with the band count. Otherwise band ``j``'s update
    (``acc_done``) must be done first.
    """
    if not OVERLAP_BANDS:
        return acc_done, acc_done
    tok = spectral.done(m) if prev_done is None else spectral.done(m, prev_done)
    return tok, acc_done


def _zeros(k: int, shape: Sequence[int], chunks) -> da.Array:
    return da.zeros((k, *shape), chunks=((k,), *chunks), dtype=np.float32)


def _update(fn: Callable[..., np.ndarray], acc: da.Array, arrays: Sequence[da.Array], q: da.Array,
            **kw: Any) -> da.Array:
    args: list[Any] = [acc, "kzyx"]
    for a in arrays:
        args.extend((a, "zyx"))
    args.extend((q, ""))
    return da.blockwise(_UpdateBlock(fn, kw), "kzyx", *args, dtype=np.float32,
                        meta=np.empty((0, 0, 0, 0), np.float32))


class _UpdateBlock:
    """Picklable ``acc_block, *arrays, q -> fn(acc, *arrays, q=q, **kw)``."""

    def __init__(self, fn: Callable[..., np.ndarray], kw: dict):
        self.fn, self.kw = fn, kw

    def __call__(self, acc: np.ndarray, *rest: Any) -> np.ndarray:
        *arrays, q = rest
        return self.fn(acc, *arrays, q=float(q), **self.kw)


def _masked_mean_std(x: da.Array, sel: da.Array) -> tuple[da.Array, da.Array]:
    """Mean and sample std (ddof 1, as MATLAB) of ``x`` over ``sel`` (REDUCE, lazy, float64)."""
    w = (sel > 0.5).astype(np.float64)
    xd = x.astype(np.float64)
    n = w.sum()
    mean = (xd * w).sum() / n
    var = (((xd - mean) ** 2) * w).sum() / (n - 1)
    return mean, da.sqrt(var)


def _standardise_block(x: np.ndarray, mean: Any, std: Any, *, clip: bool) -> np.ndarray:
    return K.standardise(x, mean=float(mean), std=float(std), clip_negative=clip)


def _standardise(x: da.Array, sel: da.Array, *, clip: bool) -> da.Array:
    mean, std = _masked_mean_std(x, sel)
    return da.blockwise(_standardise_block, "zyx", x, "zyx", mean, "", std, "", clip=clip, dtype=np.float32,
                        meta=np.empty((0, 0, 0), np.float32))


def _finish(vols: dict[str, da.Array], template: xr.DataArray, lazy: bool, extra: dict[str, Any]
            ) -> tuple[dict[str, xr.DataArray], dict[str, Any]]:
    """Wrap arrays as Volumes in the template's chunks; compute everything (one pass) for numpy input."""
    vols = {k: v.rechunk(template.data.chunks) if v.chunks != template.data.chunks else v for k, v in vols.items()}
    if not lazy:
        from ..engine.cluster import compute

        keys = list(vols) + list(extra)
        values = compute(*[vols[k] for k in vols], *[extra[k] for k in extra], label="spiral")
        done = dict(zip(keys, values))
        vols = {k: np.asarray(done[k]) for k in vols}
        extra = {k: done[k] for k in extra}
    out = {k: like(template, v, name=k, keep_header=True) for k, v in vols.items()}
    return out, extra


def _split_average(vol: xr.DataArray | Sequence[xr.DataArray]) -> xr.DataArray:
    """One map, or the average of two half maps."""
    if isinstance(vol, xr.DataArray):
        return vol
    vols = list(vol)
    if len(vols) == 1:
        return vols[0]
    if len(vols) != 2:
        raise ParameterError(f"give one map or two half maps, got {len(vols)}")
    check_aligned(*vols, names=["half map 1", "half map 2"])
    check_independent(*vols, names=["half map 1", "half map 2"])
    return like(vols[0], (vols[0].data + vols[1].data) / 2, name="average")


# --- LocSpiral / LocBSharpen ----------------------------------------------------------


@dataclass
class SpiralResult:
    """Output of :func:`locspiral` / :func:`locbsharpen`.

    Attributes
    ----------
    map
        Enhanced map ``M``: standardised over the background set (mean 0,
        std 1 before clipping) and clipped at 0.
    quality
        Quality map ``W`` (weighted count of significant bands), standardised.
    noise
        Per-band noise amplitude quantile ``q_j`` (background set).
    bank
        The bands.
    params
        Parameters used.
    """

    map: xr.DataArray
    quality: xr.DataArray
    noise: Any
    bank: BandBank
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        noise = np.asarray(self.noise).tolist() if not isinstance(self.noise, da.Array) else None
        return {"bands": self.bank.to_dict(), "noise_quantile_per_band": noise, "params": self.params}


def _spiral_common(vol, mask, *, resolution_range, n_bands, band_sigma, band_width_voxels, threshold,
                   normalization, quadrature, compat_matlab_floor, fft_strategy, what):
    vol = _split_average(vol)
    if not 0.0 < float(threshold) < 1.0:
        raise ParameterError(f"threshold must be a quantile level in (0, 1), got {threshold}")
    validate_volume(vol)
    bank = band_bank(vol.shape, voxel_size(vol), resolution_range=resolution_range, n_bands=n_bands,
                     band_sigma=band_sigma, band_width_voxels=band_width_voxels, normalization=normalization,
                     quadrature=quadrature, compat_matlab_floor=compat_matlab_floor)
    mask_info: dict[str, Any] = {"source": "given"}
    if isinstance(mask, str):
        if mask != "auto":
            raise ParameterError(f"{what}: mask must be a Volume or 'auto', got {mask!r}")
        am = auto_mask(vol)
        c = am.choice
        warnings.warn(f"{what}: automatic mask: threshold {c.threshold:.4g} ({c.n_sigma:g} σ above the corner "
                      f"noise), {c.components_kept} component(s) kept, {c.components_removed} removed, "
                      f"{100 * c.fraction:.1f}% of the box", stacklevel=3)
        mask, mask_info = am.mask, {"source": "automatic", **am.to_dict()}
    dvol, dmask, lazy = _prepare(vol, mask, what)
    spec = spectral.rfft(dvol, strategy=fft_strategy)
    return dvol, dmask, lazy, bank, spec, mask, mask_info


_EMPTY_BG = ("mask covers everything: no background voxel (mask ≤ 0.5 inside the sphere of radius L/2 about "
             "the box centre) is left to measure the noise")
_EMPTY_MOL = "mask is empty: no voxel > 0.5 marks the molecule"


def _molecule_check_block(m: np.ndarray) -> np.ndarray:
    return np.array([[[np.count_nonzero(m > 0.5)]]], dtype=np.int64)


def _require_molecule(dmask: xr.DataArray) -> da.Array:
    """0-d lazy count of molecule voxels that raises ParameterError when it is 0."""
    cnt = dmask.data.map_blocks(_molecule_check_block, dtype=np.int64, chunks=(1, 1, 1)).sum()
    return da.blockwise(_raise_if_zero, "", cnt, "", dtype=np.int64, meta=np.empty((), np.int64))


def _raise_if_zero(n: Any) -> np.ndarray:
    if int(n) == 0:
        raise ParameterError(_EMPTY_MOL)
    return np.asarray(n, dtype=np.int64)


def locspiral(
    vol: xr.DataArray | Sequence[xr.DataArray],
    *,
    mask: xr.DataArray | str | None,
    resolution_range: Sequence[float] = (25.0, 3.0),
    n_bands: int | None = None,
    band_sigma: float | None = None,
    band_width_voxels: float | None = None,
    threshold: float = 0.9,
    snr_weighting: bool = True,
    normalization: str = "power",
    quadrature: str = "riesz",
    compat_matlab_floor: bool = False,
    quantile_method: str = "hazen",
    fft_strategy: str = "auto",
) -> SpiralResult:
    """LocSpiral: local, model-free enhancement by noise-gated phase congruency.

    For each band ``j`` the voxel contributes ``cos φ_j · [m_j ≥ q_j] · C_j``
    to ``M`` and ``[m_j ≥ q_j] · C_j`` to ``W``, with ``q_j`` the
    ``threshold``-quantile of ``m_j`` over the background set (outside the
    mask, inside the sphere of radius L/2 about the box centre) and
    ``C_j = m_j/(m_j + q_j)`` (or 1 without ``snr_weighting``). Both maps
    are then standardised over the background set; ``M`` is clipped at 0.
    The amplitude itself is discarded, so contrast is equalised across
    resolutions and regions.

    Parameters
    ----------
    vol
        The map (average of the unfiltered, unmasked, unsharpened half
        maps), or the two half maps (averaged here).
    mask
        Molecule mask (1 = molecule, > 0.5 inside), aligned with ``vol``;
        required. ``"auto"``: make one with :func:`auto_mask` (computes,
        warns, and records the choice in ``params["mask"]``).
    resolution_range
        ``(low, high)`` Å (reference: 25–35 Å → the FSC resolution).
    n_bands, band_sigma, band_width_voxels, normalization, quadrature, compat_matlab_floor
        See :func:`band_bank`.
    threshold
        Noise significance quantile (0.9–0.95).
    snr_weighting
        Weight each band by ``C = m/(m + q)``.
    quantile_method
        numpy quantile method (``"hazen"`` = MATLAB's ``quantile``).
    fft_strategy
        ``"auto"`` | ``"gather"`` | ``"slab"`` (see :mod:`chunkem.engine.spectral`).

    Returns
    -------
    SpiralResult
        Lazy for dask input; numpy-backed for numpy input.

    Raises
    ------
    ParameterError
        Resolution range inverted or beyond Nyquist; empty mask; mask
        leaving no background (for lazy masks, raised when computing).
    """
    return _spiral_impl(vol, mask=mask, mode="spiral", resolution_range=resolution_range, n_bands=n_bands,
                        band_sigma=band_sigma, band_width_voxels=band_width_voxels, threshold=threshold,
                        snr_weighting=snr_weighting, normalization=normalization, quadrature=quadrature,
                        compat_matlab_floor=compat_matlab_floor, quantile_method=quantile_method,
                        fft_strategy=fft_strategy, reference_resolution=None)


def locbsharpen(
    vol: xr.DataArray | Sequence[xr.DataArray],
    *,
    mask: xr.DataArray | str | None,
    resolution_range: Sequence[float] = (25.0, 3.0),
    reference_resolution: float = 15.0,
    n_bands: int | None = None,
    band_sigma: float | None = None,
    band_width_voxels: float | None = None,
    threshold: float = 0.9,
    snr_weighting: bool = True,
    normalization: str = "power",
    quadrature: str = "riesz",
    compat_matlab_floor: bool = False,
    quantile_method: str = "hazen",
    fft_strategy: str = "auto",
) -> SpiralResult:
    """LocBSharpen: local B-flattening by freezing amplitudes at a reference resolution.

    As :func:`locspiral` without the binary noise gate, keeping the
    amplitude: bands coarser than ``reference_resolution`` (Å, default 15)
    add ``C·cos φ·m`` to ``M`` and ``C·m`` to ``W``; from the band nearest to
    it on, the amplitude of that band replaces ``m`` (amplitudes held at their
    15 Å value, i.e. a locally flattened fall-off). Same standardisation and
    positivity. Parameters as :func:`locspiral`.
    """
    if not (reference_resolution and reference_resolution > 0):
        raise ParameterError(f"reference_resolution must be a positive resolution in Å, got {reference_resolution}")
    return _spiral_impl(vol, mask=mask, mode="bsharpen", resolution_range=resolution_range, n_bands=n_bands,
                        band_sigma=band_sigma, band_width_voxels=band_width_voxels, threshold=threshold,
                        snr_weighting=snr_weighting, normalization=normalization, quadrature=quadrature,
                        compat_matlab_floor=compat_matlab_floor, quantile_method=quantile_method,
                        fft_strategy=fft_strategy, reference_resolution=float(reference_resolution))


def _spiral_impl(vol, *, mask, mode, resolution_range, n_bands, band_sigma, band_width_voxels, threshold,
                 snr_weighting, normalization, quadrature, compat_matlab_floor, quantile_method, fft_strategy,
                 reference_resolution) -> SpiralResult:
    what = "locspiral" if mode == "spiral" else "locbsharpen"
    dvol, dmask, lazy, bank, spec, mask, mask_info = _spiral_common(
        vol, mask, resolution_range=resolution_range, n_bands=n_bands, band_sigma=band_sigma,
        band_width_voxels=band_width_voxels, threshold=threshold, normalization=normalization,
        quadrature=quadrature, compat_matlab_floor=compat_matlab_floor, fft_strategy=fft_strategy, what=what)
    bg = _background(dmask)
    if not lazy:
        _check_mask_counts(mask, bg.compute(), need="background")
    inner = _inner_chunks(dvol.shape)
    sel = bg.data.rechunk(inner)
    dep = _require_molecule(dmask)
    acc_done = dep
    ref_band = -1
    if mode == "bsharpen":
        L = K.box_length(dvol.shape, voxel_size(dvol))
        f15 = (math.floor(L / reference_resolution) / L) if compat_matlab_floor else 1.0 / reference_resolution
        ref_band = int(np.argmin(np.abs(bank.centres - f15)))
    acc = _zeros(2 if mode == "spiral" else 3, dvol.shape, inner)
    noise = []
    for j in range(bank.n_bands):
        c, m = _band(spec, bank, j, dep, inner)
        q = _set_quantile(m, sel, level=threshold, method=quantile_method, empty_message=_EMPTY_BG,
                          minimum=MIN_BACKGROUND_VOXELS if j == 0 else 0)
        if mode == "spiral":
            acc = _update(K.spiral_update, acc, (c, m), q, snr_weighting=snr_weighting)
        else:
            acc = _update(K.bsharpen_update, acc, (c, m), q, band=j, ref_band=ref_band,
                          snr_weighting=snr_weighting)
        noise.append(q)
        dep, acc_done = _next_gate(m, acc_done, spectral.done(acc))
    M = _standardise(acc[0], sel, clip=True)
    W = _standardise(acc[1], sel, clip=False)
    vols, extra = _finish({"map": M, "quality": W}, dvol, lazy, {"noise": da.stack(noise)})
    params = {
        "op": what,
        "mask": mask_info,
        "resolution_range_A": [float(r) for r in resolution_range],
        "threshold": float(threshold),
        "snr_weighting": bool(snr_weighting),
        "quantile_method": quantile_method,
        "fft_strategy": fft_strategy,
    }
    if mode == "bsharpen":
        params["reference_resolution_A"] = reference_resolution
        params["reference_band"] = ref_band
    return SpiralResult(vols["map"], vols["quality"], extra["noise"], bank, params)


# --- LocBFactor -------------------------------------------------------------------------


@dataclass
class LocBFactorResult:
    """Output of :func:`locbfactor` (all maps share the input's geometry).

    Attributes
    ----------
    b_factor
        Local B in Å², **RELION sign** = 4 × ``slope`` (negative for decaying
        amplitudes; decay B = −b_factor). NaN where no fit exists.
    slope
        The reference's ``BMap``: slope of ``ln(C·m·sqrt(N_vox))`` vs ``s²`` (Å²).
    intercept
        The reference's ``AMap``: ``ln`` amplitude extrapolated to ``s = 0``.
    quality
        Coefficient of determination r² of each voxel's fit, in [0, 1].
    n_points
        Bands used per voxel (all of them unless ``drop_below_noise``).
    noise
        Per band ``ln(q_j · sqrt(N_vox))``: the noise level on the Guinier plot.
    bank
        The bands (``bank.s2``: abscissae, 1/Å²).
    probes
        ``{name: (z, y, x)}`` voxels whose Guinier points were kept.
    probe_amplitudes
        (n_bands, n_probes) local amplitudes ``m`` at the probes.
    params
        Parameters used, ``normalization_offset_b_A2`` included.
    """

    b_factor: xr.DataArray
    slope: xr.DataArray
    intercept: xr.DataArray
    quality: xr.DataArray
    n_points: xr.DataArray
    noise: Any
    bank: BandBank
    probes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    probe_amplitudes: Any = None
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def s2(self) -> np.ndarray:
        return self.bank.s2

    def guinier_points(self) -> dict[str, dict[str, list]]:
        """Per probe: ``s2`` (1/Å²), ``ln_amplitude`` (``ln(C·m·sqrt(N))``, the fitted points) and ``noise``."""
        if not self.probes or self.probe_amplitudes is None:
            return {}
        m = np.asarray(self.probe_amplitudes, dtype=np.float64)
        lnq = np.asarray(self.noise, dtype=np.float64)
        q = np.exp(lnq - self.params["log_scale"])
        out = {}
        for i, name in enumerate(self.probes):
            mi = m[:, i]
            c = mi / (mi + q) if self.params["snr_weighting"] else np.ones_like(mi)
            y = np.log(np.maximum(c * mi, 1e-30)) + self.params["log_scale"]
            out[name] = {"voxel_zyx": list(self.probes[name]), "s2": self.bank.s2.tolist(),
                         "ln_amplitude": y.tolist(), "noise": lnq.tolist()}
        return out

    def summary(self, mask: xr.DataArray | None = None) -> dict[str, float]:
        """Mean / median / spread of ``b_factor`` (and r²) inside ``mask`` (> 0.5); computes."""
        b = np.asarray(self.b_factor.values, dtype=np.float64)
        r2 = np.asarray(self.quality.values, dtype=np.float64)
        sel = np.isfinite(b)
        if mask is not None:
            sel &= np.asarray(mask.values) > 0.5
        if not sel.any():
            return {"voxels": 0}
        bs = b[sel]
        return {
            "voxels": int(sel.sum()),
            "mean_b_A2": float(bs.mean()),
            "median_b_A2": float(np.median(bs)),
            "p10_b_A2": float(np.percentile(bs, 10)),
            "p90_b_A2": float(np.percentile(bs, 90)),
            "mean_r2": float(np.nanmean(r2[sel])),
        }

    def to_dict(self) -> dict[str, Any]:
        noise = None if isinstance(self.noise, da.Array) else np.asarray(self.noise).tolist()
        return {
            "b_sign": "RELION: b_factor = 4 x slope of ln(amplitude) vs s^2; negative = decaying",
            "bands": self.bank.to_dict(),
            "s2_per_A2": self.bank.s2.tolist(),
            "noise_ln_amplitude": noise,
            "params": self.params,
            "guinier_points": (self.guinier_points()
                               if not isinstance(self.probe_amplitudes, da.Array) else None),
        }


def _guinier_solve_block(acc: np.ndarray, *, x_mean: float, min_points: int, x_sums) -> np.ndarray:
    return K.guinier_solve(acc, x_mean=x_mean, min_points=min_points, x_sums=x_sums)


def locbfactor(
    vol: xr.DataArray | Sequence[xr.DataArray],
    *,
    mask: xr.DataArray | str | None,
    resolution_range: Sequence[float] = (15.0, 4.0),
    n_bands: int = 10,
    band_sigma: float | None = None,
    band_width_voxels: float | None = None,
    threshold: float = 0.9,
    snr_weighting: bool = True,
    drop_below_noise: bool = False,
    normalization: str = "power",
    quadrature: str = "riesz",
    compat_matlab_floor: bool = False,
    quantile_method: str = "hazen",
    probes: dict[str, Sequence[int]] | None = None,
    fft_strategy: str = "auto",
) -> LocBFactorResult:
    """LocBFactor: local B-factor (and intercept) maps from per-voxel Guinier fits.

    For every band ``j`` (centre ``s_j``) the point
    ``(s_j², ln(C_j·m_j·sqrt(N_vox)))`` is added to each voxel's local Guinier
    plot (running least-squares sums, never a band stack), with
    ``C_j = m_j/(m_j + q_j)`` and ``q_j`` the ``threshold``-quantile of
    ``m_j`` over the background set. A line is fitted per voxel.

    **Sign convention**: ``b_factor = 4 × slope`` is the local B in RELION
    sign — negative for a map whose amplitudes fall off (a decay B of 80 Å²
    gives about −80). ``slope`` and ``intercept`` are the reference's BMap
    and AMap.

    Parameters
    ----------
    vol
        Map (average of the unfiltered half maps) or the two half maps.
    mask
        Molecule mask aligned with ``vol`` (the background set is its
        complement inside the box sphere).
    resolution_range
        ``(low, high)`` Å of the fit (reference: 10–15 Å → FSC resolution).
    n_bands
        Points on each local Guinier plot (reference ``numPoints``, 5–10).
    band_sigma, band_width_voxels, normalization, quadrature, compat_matlab_floor
        See :func:`band_bank`. With ``normalization="mean"`` (reference) the
        B values shift by ``params["normalization_offset_b_A2"]``.
    threshold
        Noise quantile level (0.9–0.95).
    snr_weighting
        Use ``C·m`` (reference) rather than ``m``.
    drop_below_noise
        Fit only the points above the band's noise level (reference
        ``filter=1``); voxels left with fewer than 2 points get NaN.
    probes
        ``{name: (z, y, x)}`` voxel indices whose Guinier points are kept
        (for plots; see :func:`choose_probes`).
    quantile_method, fft_strategy
        As :func:`locspiral`.

    Returns
    -------
    LocBFactorResult
    """
    vol = _split_average(vol)
    dvol, dmask, lazy, bank, spec, mask, mask_info = _spiral_common(
        vol, mask, resolution_range=resolution_range, n_bands=n_bands, band_sigma=band_sigma,
        band_width_voxels=band_width_voxels, threshold=threshold, normalization=normalization,
        quadrature=quadrature, compat_matlab_floor=compat_matlab_floor, fft_strategy=fft_strategy,
        what="locbfactor")
    bg = _background(dmask)
    if not lazy:
        _check_mask_counts(mask, bg.compute(), need="background")
    inner = _inner_chunks(dvol.shape)
    sel = bg.data.rechunk(inner)
    log_scale = 0.5 * math.log(float(np.prod(dvol.shape)))
    x = bank.s2
    x_mean = float(x.mean())
    probe_items = _check_probes(probes, dvol.shape)
    acc = _zeros(6 if drop_below_noise else 3, dvol.shape, inner)
    dep = _require_molecule(dmask)
    acc_done = dep
    noise, samples = [], []
    for j in range(bank.n_bands):
        c, m = _band(spec, bank, j, dep, inner)
        q = _set_quantile(m, sel, level=threshold, method=quantile_method, empty_message=_EMPTY_BG,
                          minimum=MIN_BACKGROUND_VOXELS if j == 0 else 0)
        acc = _update(K.guinier_update, acc, (m,), q, x=float(x[j] - x_mean), log_scale=log_scale,
                      snr_weighting=snr_weighting, drop_below_noise=drop_below_noise)
        noise.append(da.log(q) + log_scale)
        if probe_items:
            idx = tuple(np.array([p[ax] for _, p in probe_items]) for ax in range(3))
            samples.append(m.vindex[idx])
        dep, acc_done = _next_gate(m, acc_done, spectral.done(acc))
    xc = x - x_mean
    x_sums = (float(xc.size), float(xc.sum()), float((xc * xc).sum()))
    sol = da.map_blocks(_guinier_solve_block, acc, x_mean=x_mean, min_points=2, x_sums=x_sums, dtype=np.float32,
                        chunks=((4,), *acc.chunks[1:]))
    slope = sol[0]
    vols = {"b_factor": 4.0 * slope, "slope": slope, "intercept": sol[1], "quality": sol[2], "n_points": sol[3]}
    extra: dict[str, Any] = {"noise": da.stack(noise)}
    if probe_items:
        extra["probes"] = da.stack(samples)
    vols_out, extra = _finish(vols, dvol, lazy, extra)
    params = {
        "op": "locbfactor",
        "mask": mask_info,
        "resolution_range_A": [float(r) for r in resolution_range],
        "threshold": float(threshold),
        "snr_weighting": bool(snr_weighting),
        "drop_below_noise": bool(drop_below_noise),
        "quantile_method": quantile_method,
        "log_scale": log_scale,
        "normalization_offset_b_A2": bank.normalization_offset_b(),
        "fft_strategy": fft_strategy,
    }
    return LocBFactorResult(
        b_factor=vols_out["b_factor"], slope=vols_out["slope"], intercept=vols_out["intercept"],
        quality=vols_out["quality"], n_points=vols_out["n_points"], noise=extra["noise"], bank=bank,
        probes={name: tuple(int(v) for v in p) for name, p in probe_items},
        probe_amplitudes=extra.get("probes"), params=params)


def _check_probes(probes, shape) -> list[tuple[str, tuple[int, int, int]]]:
    if not probes:
        return []
    items = []
    for name, p in probes.items():
        zyx = tuple(int(v) for v in p)
        if len(zyx) != 3 or any(not 0 <= v < n for v, n in zip(zyx, shape)):
            raise ParameterError(f"probe {name!r}: voxel {tuple(p)} is outside the map {tuple(shape)}")
        items.append((str(name), zyx))
    return items


def choose_probes(mask: xr.DataArray, *, map_vol: xr.DataArray | None = None) -> dict[str, tuple[int, int, int]]:
    """Pick three voxels for Guinier plots: molecule core, periphery and background; computes.

    ``core``: the mask voxel deepest inside the molecule (largest distance to
    the mask surface); ``periphery``: a mask voxel about 1.5 Å inside the
    surface (the one with the largest map value among those, when ``map_vol``
    is given, else the first); ``background``: the background voxel farthest
    from the molecule inside the box sphere.
    """
    from scipy import ndimage

    m = np.asarray(mask.values) > 0.5
    vs = voxel_size(mask)
    if not m.any() or m.all():
        raise ParameterError("choose_probes: the mask must mark some, not all, voxels")
    inside = ndimage.distance_transform_edt(m, sampling=vs)
    outside = ndimage.distance_transform_edt(~m, sampling=vs)
    core = np.unravel_index(int(np.argmax(inside)), m.shape)
    band = m & (inside > 0) & (inside <= 1.5 + max(vs))
    if map_vol is not None and band.any():
        vals = np.where(band, np.asarray(map_vol.values), -np.inf)
        peri = np.unravel_index(int(np.argmax(vals)), m.shape)
    else:
        peri = tuple(int(v[0]) for v in np.nonzero(band)) if band.any() else core
    idx = np.indices(m.shape, dtype=np.float64)
    r2 = sum(((idx[a] - m.shape[a] // 2) * vs[a]) ** 2 for a in range(3))
    in_sphere = r2 < (K.box_length(m.shape, vs) / 2) ** 2
    far = np.where(in_sphere & ~m, outside, -1.0)
    bgv = np.unravel_index(int(np.argmax(far)), m.shape)
    return {"core": tuple(int(v) for v in core), "periphery": tuple(int(v) for v in peri),
            "background": tuple(int(v) for v in bgv)}


# --- LocOccupancy and the maturity index ----------------------------------------------------


@dataclass
class OccupancyResult:
    """Output of :func:`lococcupancy`.

    Attributes
    ----------
    occupancy
        Fraction of bands (in [0, 1]) in which the voxel's amplitude reaches
        the band's molecule quantile.
    quantiles
        Per-band molecule amplitude quantile ``q_j``.
    bank, params
        Bands and parameters used.
    """

    occupancy: xr.DataArray
    quantiles: Any
    bank: BandBank
    params: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        q = None if isinstance(self.quantiles, da.Array) else np.asarray(self.quantiles).tolist()
        return {"bands": self.bank.to_dict(), "molecule_quantile_per_band": q, "params": self.params}


def lococcupancy(
    vol: xr.DataArray | Sequence[xr.DataArray],
    *,
    mask: xr.DataArray | str | None,
    resolution_range: Sequence[float] = (25.0, 10.0),
    n_bands: int | None = None,
    band_sigma: float | None = None,
    band_width_voxels: float | None = None,
    threshold: float = 0.25,
    normalization: str = "power",
    quadrature: str = "riesz",
    compat_matlab_floor: bool = False,
    quantile_method: str = "hazen",
    fft_strategy: str = "auto",
) -> OccupancyResult:
    """LocOccupancy: local occupancy as the fraction of bands with significant amplitude.

    ``q_j`` is the ``threshold``-quantile (typically 0.25) of the band
    amplitude ``m_j`` over the MOLECULE voxels (mask > 0.5);
    ``occupancy = (1/n) Σ_j [m_j ≥ q_j]``. A uniformly occupied molecule
    gives about ``1 - threshold`` on average; parts at lower occupancy (weak
    density) fall below the quantile in more bands.

    Parameters
    ----------
    vol, mask
        As :func:`locspiral` (mask > 0.5 = molecule; must not be empty).
    resolution_range
        ``(low, high)`` Å (reference example 25 → 10 Å).
    threshold
        Molecule amplitude quantile level.
    n_bands, band_sigma, band_width_voxels, normalization, quadrature, compat_matlab_floor
        See :func:`band_bank`.
    quantile_method, fft_strategy
        As :func:`locspiral`.

    Returns
    -------
    OccupancyResult
    """
    vol = _split_average(vol)
    dvol, dmask, lazy, bank, spec, mask, mask_info = _spiral_common(
        vol, mask, resolution_range=resolution_range, n_bands=n_bands, band_sigma=band_sigma,
        band_width_voxels=band_width_voxels, threshold=threshold, normalization=normalization,
        quadrature=quadrature, compat_matlab_floor=compat_matlab_floor, fft_strategy=fft_strategy,
        what="lococcupancy")
    if not lazy:
        _check_mask_counts(mask, None, need="molecule")
    inner = _inner_chunks(dvol.shape)
    sel = _molecule(dmask).data.rechunk(inner)
    acc = _zeros(1, dvol.shape, inner)
    dep = acc_done = None
    qs = []
    for j in range(bank.n_bands):
        c, m = _band(spec, bank, j, dep, inner)
        q = _set_quantile(m, sel, level=threshold, method=quantile_method, empty_message=_EMPTY_MOL, minimum=0)
        acc = _update(K.occupancy_update, acc, (m,), q)
        qs.append(q)
        dep, acc_done = _next_gate(m, acc_done, spectral.done(acc))
    occ = acc[0] / np.float32(bank.n_bands)
    vols, extra = _finish({"occupancy": occ}, dvol, lazy, {"quantiles": da.stack(qs)})
    params = {"op": "lococcupancy", "mask": mask_info, "resolution_range_A": [float(r) for r in resolution_range],
              "threshold": float(threshold), "quantile_method": quantile_method, "fft_strategy": fft_strategy}
    return OccupancyResult(vols["occupancy"], extra["quantiles"], bank, params)


@dataclass
class MaturityResult:
    """The maturity index of an (immature) occupancy mask against a reference (mature) mask.

    ``index = |occ ∩ ref| / |ref|``: the fraction of the mature structure
    present. ``extra_fraction = |occ \\ ref| / |occ|``: density found outside
    the mature structure. ``dice``: 2|occ ∩ ref| / (|occ| + |ref|).
    """

    index: float
    overlap_voxels: int
    reference_voxels: int
    occupied_voxels: int
    extra_fraction: float
    dice: float
    occupancy_threshold: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def maturity_index(occ_mask: xr.DataArray, ref_mask: xr.DataArray, *, occupancy_threshold: float = 0.5
                   ) -> MaturityResult:
    """Maturity index: how much of a reference (mature) map's mask an occupancy mask covers; computes.

    Parameters
    ----------
    occ_mask
        Occupancy map in [0, 1] (e.g. :func:`lococcupancy` output, or a binary
        mask); occupied where ``> occupancy_threshold``.
    ref_mask
        Mask of the reference (mature) map, aligned; inside where ``> 0.5``.
    occupancy_threshold
        Level above which a voxel counts as occupied.

    Returns
    -------
    MaturityResult
        ``index = |occupied ∩ reference| / |reference|`` in [0, 1].
    """
    check_aligned(occ_mask, ref_mask, names=["occupancy mask", "reference mask"])
    occ = da.asarray(occ_mask.data) > occupancy_threshold
    ref = da.asarray(ref_mask.data)
    if isinstance(ref, da.Array) and isinstance(occ, da.Array) and ref.chunks != occ.chunks:
        ref = ref.rechunk(occ.chunks)
    ref = ref > 0.5
    from ..engine.cluster import compute

    n_ov, n_ref, n_occ = compute((occ & ref).sum(), ref.sum(), occ.sum(), label="maturity index")
    n_ov, n_ref, n_occ = int(n_ov), int(n_ref), int(n_occ)
    if n_ref == 0:
        raise ParameterError("maturity_index: the reference mask is empty")
    return MaturityResult(
        index=n_ov / n_ref, overlap_voxels=n_ov, reference_voxels=n_ref, occupied_voxels=n_occ,
        extra_fraction=(n_occ - n_ov) / n_occ if n_occ else 0.0,
        dice=2 * n_ov / (n_occ + n_ref), occupancy_threshold=float(occupancy_threshold))


# --- automatic mask ----------------------------------------------------------------------


@dataclass
class AutoMask:
    """An automatic molecule mask and how it was chosen."""

    mask: xr.DataArray
    choice: K.MaskChoice

    def to_dict(self) -> dict[str, Any]:
        return {"method": "threshold + small-component removal", **self.choice.to_dict()}


def _gaussian_block(x: np.ndarray, *, sigma: tuple[float, float, float]) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(np.asarray(x, dtype=np.float32), sigma=sigma, mode="reflect")


def _edge_block(x: np.ndarray, *, offset, voxel_size, centre, radius) -> np.ndarray:
    bg = K.background_set(np.zeros(x.shape, np.float32), offset=offset, voxel_size=voxel_size, centre=centre,
                          radius=radius)
    return (~bg).astype(np.float32)


def auto_mask(
    vol: xr.DataArray,
    *,
    n_sigma: float = 4.0,
    smoothing: float | None = None,
    min_voxels: int = 25,
    dilation: float = 0.0,
    connectivity: int = 1,
) -> AutoMask:
    """Automatic molecule mask: threshold a (lightly smoothed) map and drop small components; computes.

    The noise level is measured robustly (median and 1.4826 × MAD) on the
    voxels outside the sphere of radius L/2 about the box centre (box
    corners), sub-sampled on a fixed lattice; the threshold is
    ``median + n_sigma × σ``. Connected components (6-connected for
    ``connectivity=1``, as the reference's example scripts) smaller than
    ``min_voxels`` are removed, and the mask is optionally dilated.

    Parameters
    ----------
    vol
        The map.
    n_sigma
        Threshold in noise standard deviations above the noise median.
    smoothing
        Gaussian σ in Å applied before thresholding (default 1.5 × the
        largest voxel size; 0 = none, as the reference).
    min_voxels
        Smallest component kept (reference: 25 voxels).
    dilation
        Grow the mask by this distance (Å) afterwards.
    connectivity
        1, 2 or 3 (face, edge, vertex neighbours).

    Returns
    -------
    AutoMask
        ``mask`` (float32 0/1 Volume; dask-backed for dask input) and
        ``choice`` (the threshold and what was removed), to report.

    Notes
    -----
    Connected components need the whole binary mask in one place (one byte
    per voxel); the rest is chunked.
    """
    from scipy import ndimage

    from ..engine.cluster import compute

    validate_volume(vol)
    vs = voxel_size(vol)
    if not n_sigma > 0:
        raise ParameterError(f"n_sigma must be > 0, got {n_sigma}")
    sm = 1.5 * max(vs) if smoothing is None else float(smoothing)
    if sm < 0 or dilation < 0:
        raise ParameterError("smoothing and dilation must be distances >= 0 Å")
    dvol, lazy = _as_dask(vol)
    if sm > 0:
        sig = tuple(sm / v for v in vs)
        smooth = run_local(_gaussian_block, dvol, reach=4.0 * sm, sigma=sig, name="smoothed")
    else:
        smooth = dvol
    org, shape = origin(dvol), dvol.shape
    centre = tuple(o + (n // 2) * v for o, n, v in zip(org, shape, vs))
    edge = run_local(_edge_block, dvol, reach=0.0, with_offset=True, centre=centre,
                     radius=K.box_length(shape, vs) / 2.0)
    stride = max(1, int(round((np.prod(shape) / 4e6) ** (1 / 3))))
    sub = (slice(None, None, stride),) * 3
    vals, flags = compute(smooth.data[sub], edge.data[sub], label="auto mask noise")
    noise = np.asarray(vals)[np.asarray(flags) > 0.5].astype(np.float64)
    if noise.size < 100:
        raise ParameterError("auto_mask: the box has too few corner voxels to measure the noise")
    med = float(np.median(noise))
    sigma = float(1.4826 * np.median(np.abs(noise - med)))
    if sigma <= 0:
        sigma = float(noise.std()) or 1.0
    thr = med + float(n_sigma) * sigma
    (full,) = compute(smooth.data, label="auto mask")
    binary, kept, removed = K.threshold_components(np.asarray(full), threshold=thr, min_voxels=int(min_voxels),
                                                   connectivity=int(connectivity))
    if dilation > 0:
        r = [int(math.ceil(dilation / v)) for v in vs]
        zz, yy, xx = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
        ball = (zz * vs[0]) ** 2 + (yy * vs[1]) ** 2 + (xx * vs[2]) ** 2 <= dilation**2
        binary = ndimage.binary_dilation(binary, structure=ball)
    n = int(binary.sum())
    if n == 0:
        warnings.warn(f"auto_mask: nothing above the threshold {thr:.4g} ({n_sigma} σ): the mask is empty",
                      stacklevel=2)
    data: Any = binary.astype(np.float32)
    if lazy:
        data = da.from_array(data, chunks=vol.data.chunks)
    choice = K.MaskChoice(threshold=thr, n_sigma=float(n_sigma), noise_median=med, noise_sigma=sigma,
                          min_voxels=int(min_voxels), components_kept=kept, components_removed=removed,
                          voxels=n, fraction=n / float(np.prod(shape)), smoothing_A=sm, dilation_A=float(dilation))
    return AutoMask(like(vol, data, name="auto_mask"), choice)


# --- global Guinier ----------------------------------------------------------------------------


@dataclass
class GuinierResult:
    """A global Guinier fit (``ln`` mean shell amplitude vs ``s²``); ``b_relion = 4 × slope``.

    With a band bank (:func:`guinier_b` ``bank=``) also ``bands``: the
    band-matched fit, ``ln`` of the RMS amplitude of each band of the bank
    (the spectrum weighted by ``H_j²``, as the local amplitudes see it)
    against the band centres ``s_j²`` — the global counterpart of
    :func:`locbfactor` with the same bands.
    """

    line: K.GuinierLine
    frequency: np.ndarray
    amplitude: np.ndarray
    masked: bool
    bands: K.GuinierLine | None = None
    band_amplitude: np.ndarray | None = None

    @property
    def b_relion(self) -> float:
        return self.line.b_relion

    @property
    def b_relion_bands(self) -> float | None:
        """Band-matched global B (RELION sign, Å²), or None without a bank."""
        return None if self.bands is None else self.bands.b_relion

    def to_dict(self) -> dict[str, Any]:
        out = {**self.line.to_dict(), "masked": self.masked}
        if self.bands is not None:
            out["band_matched"] = self.bands.to_dict()
        return out


def _band_power_block(F: np.ndarray, start: tuple[int, int, int], *, shape, vs, bank: BandBank) -> np.ndarray:
    """Band powers of one spectrum block, z-piece by z-piece (bounded float64 temporaries)."""
    F = np.asarray(F)
    out = np.zeros(bank.n_bands, dtype=np.float64)
    step = max(1, int(2**20 // max(1, F.shape[1] * F.shape[2])))
    for z0 in range(0, F.shape[0], step):
        piece = F[z0:z0 + step]
        kz, ky, kx = spectral.frequencies(shape, vs, index=(start[0] + z0, start[1], start[2]),
                                          block_shape=piece.shape)
        out += K.band_powers(piece, kz=kz, ky=ky, kx=kx, nx=shape[2], voxel_x=vs[2], centres=bank.centres,
                             sigma=bank.sigma, dc_sigma=bank.dc_sigma, scales=bank.scales)
    return out


def _band_powers(spec: spectral.Spectrum, bank: BandBank) -> Any:
    """REDUCE: full-grid band powers of a spectrum (lazy 1-d array for dask spectra, else numpy)."""
    shape, vs = tuple(spec.shape), tuple(spec.voxel_size)
    if not spec.is_lazy:
        return _band_power_block(spec.data, (0, 0, 0), shape=shape, vs=vs, bank=bank)
    starts = [np.cumsum((0,) + tuple(c[:-1])) for c in spec.data.chunks]
    blocks = spec.data.to_delayed(optimize_graph=False)
    parts = [dask.delayed(_band_power_block, pure=True)(blocks[i], tuple(int(starts[a][i[a]]) for a in range(3)),
                                                        shape=shape, vs=vs, bank=bank)
             for i in np.ndindex(blocks.shape)]
    total = dask.delayed(sum, pure=True)(parts)
    return da.from_delayed(total, shape=(bank.n_bands,), dtype=np.float64)


def guinier_b(vol: xr.DataArray, *, resolution_range: Sequence[float], mask: xr.DataArray | None = None,
              fft_strategy: str = "auto", bank: BandBank | None = None) -> GuinierResult:
    """Global Guinier B (RELION sign) of a map, optionally multiplied by a (soft) mask; computes.

    ``ln`` of the mean Fourier amplitude per shell (00_conventions shells)
    against ``s²`` over ``resolution_range`` (low, high Å), fitted by least
    squares; ``b_relion = 4 × slope`` (negative for decaying amplitudes).

    With ``bank`` (e.g. ``locbfactor(...).bank``) the result also holds the
    band-matched fit (``bands``): ``ln sqrt(Σ_k |F|² H_j² / Σ_k H_j²)``
    against ``s_j²`` over the bank's bands. That is the definition to
    compare the mean local B of :func:`locbfactor` with: band ``j`` sees the
    spectrum within about ±2σ of ``s_j``, so where the spectrum is not a
    straight Guinier line near the ends of the range (a map low-pass
    filtered at the high-resolution end, a sharpened map) the shell fit and
    the band fit differ although both are correct (see
    ``tests/ops/test_spiral.py::test_emd3488_local_b_with_a_model_mask``).
    """
    validate_volume(vol)
    low, high = _resolution_range(resolution_range, vol.shape, voxel_size(vol))
    v = vol
    if mask is not None:
        check_aligned(vol, mask, names=["map", "mask"])
        v = like(vol, vol.data * mask.data.astype(np.float32), name="masked")
    spec = spectral.rfft(v, strategy=fft_strategy)
    prof = spectral.radial_profile(spec)
    amp = prof.mean_amplitude()
    line = K.guinier_fit(prof.frequency, amp, low_res=low, high_res=high)
    res = GuinierResult(line, prof.frequency, amp, mask is not None)
    if bank is not None:
        if tuple(bank.shape) != tuple(vol.shape):
            raise ParameterError(f"guinier_b: the bank is for a {bank.shape} box, the map is {tuple(vol.shape)}")
        powers = _band_powers(spec, bank)
        if isinstance(powers, da.Array):
            from ..engine.cluster import compute

            (powers,) = compute(powers, label="band powers")
        band_amp = np.sqrt(np.asarray(powers, dtype=np.float64))
        c = bank.centres
        res.bands = K.guinier_fit(c, band_amp, low_res=1.0 / c.min(), high_res=1.0 / c.max())
        res.band_amplitude = band_amp
    return res


# --- plots -----------------------------------------------------------------------------------------


def _png(fig: Any, path: str | os.PathLike) -> Path:
    import io

    import matplotlib.pyplot as plt

    from ..cli.common import atomic_write_bytes

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def plot_guinier(result: LocBFactorResult, path: str | os.PathLike) -> Path:
    """PNG of the local Guinier plots at the result's probe voxels (points, fitted line, noise level).

    The y axis is ``ln(C·m·sqrt(N_vox))``; the slope × 4 is the local B in
    RELION sign (given in each legend).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result.guinier_points()
    if not pts:
        raise ParameterError("plot_guinier: the result has no probe voxels (pass probes= to locbfactor)")
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colours = ["tab:red", "tab:orange", "tab:blue", "tab:green", "tab:purple", "tab:brown"]
    noise = None
    for i, (name, p) in enumerate(pts.items()):
        x, y = np.asarray(p["s2"]), np.asarray(p["ln_amplitude"])
        col = colours[i % len(colours)]
        b = float(np.asarray(result.b_factor.values[tuple(p["voxel_zyx"])]))
        a = float(np.asarray(result.intercept.values[tuple(p["voxel_zyx"])]))
        ax.plot(x, y, "o", color=col, ms=4, label=f"{name} {tuple(p['voxel_zyx'])}: B = {b:.1f} Å²")
        if np.isfinite(b):
            ax.plot(x, a + b / 4.0 * x, "-", color=col, lw=1)
        noise = p["noise"]
    if noise is not None:
        ax.plot(pts[next(iter(pts))]["s2"], noise, "k--", lw=1, label="noise level (band quantile)")
    ax.set_xlabel("s² (1/Å²)")
    ax.set_ylabel("ln(C·m·sqrt(N))")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    lo, hi = result.params.get("resolution_range_A", [None, None])
    ax.set_title(f"local Guinier plots, {lo}–{hi} Å (B in RELION sign = 4 × slope)")
    return _png(fig, path)


def plot_slices(vols: dict[str, xr.DataArray], path: str | os.PathLike, *, mask: xr.DataArray | None = None,
                cmaps: dict[str, str] | None = None, title: str = "") -> Path:
    """PNG of the central z, y and x slices of each Volume (one row each; computes the slices only).

    With ``mask``, voxels outside it (≤ 0.5) are blanked in every panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(vols)
    fig, axes = plt.subplots(len(names), 3, figsize=(9.5, 3.0 * len(names)), dpi=100, squeeze=False)
    for row, name in enumerate(names):
        v = vols[name]
        nz, ny, nx = v.shape
        cuts = [(0, nz // 2), (1, ny // 2), (2, nx // 2)]
        sl = []
        for ax_, i in cuts:
            index = [slice(None)] * 3
            index[ax_] = i
            img = np.asarray(v.data[tuple(index)], dtype=np.float64)
            if mask is not None:
                img = np.where(np.asarray(mask.data[tuple(index)]) > 0.5, img, np.nan)
            sl.append(img)
        finite = np.concatenate([s[np.isfinite(s)].ravel() for s in sl]) if sl else np.array([0.0])
        vmin, vmax = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
        for col, (img, (ax_, i)) in enumerate(zip(sl, cuts)):
            a = axes[row, col]
            im = a.imshow(img, origin="lower", cmap=(cmaps or {}).get(name, "gray"), vmin=vmin, vmax=vmax)
            a.set_title(f"{name}: {'zyx'[ax_]} = {i}", fontsize=8)
            a.set_xticks([])
            a.set_yticks([])
        fig.colorbar(im, ax=axes[row, 2], fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=9)
    return _png(fig, path)


# --- demo ----------------------------------------------------------------------------------------


def demo_stage(ctx: dict[str, Any]) -> dict[str, Any]:
    """Demo stage: LocBFactor and LocSpiral on the phantom, scored against its known local B.

    The phantom's ``local_b`` is the ATOMIC B field (decay sign). A map's
    local amplitude also decays because of the atoms' own density (form
    factors, chemistry): ``B_intrinsic``, measured here as the global
    Guinier decay of the same model rendered with one uniform B minus that B.
    The documented conversion is therefore
    ``B_atomic ≈ -b_factor - B_intrinsic``.
    """
    from ..engine.cluster import compute
    from ..io import save
    from ..phantoms import render_gemmi

    ph = ctx["phantom"]
    outdir = Path(ctx["outdir"]) / "spiral"
    outdir.mkdir(parents=True, exist_ok=True)
    h1 = ctx.get("half1", ph.half1)
    h2 = ctx.get("half2", ph.half2)
    mask = ctx.get("mask", ph.mask)
    vs = voxel_size(ph.truth)
    res = float(ph.params.get("resolution", 3.5))
    high = max(1.3 * res, 2.2 * max(vs))
    low = min(15.0, 0.5 * K.box_length(ph.truth.shape, vs))
    rr = (low, high)
    lb = locbfactor([h1, h2], mask=mask, resolution_range=rr)
    sp = locspiral([h1, h2], mask=mask, resolution_range=(min(25.0, low * 1.5), high))
    b_map, spiral_map = compute(lb.b_factor.data, sp.map.data, label="spiral demo")
    b_map = np.asarray(b_map, np.float64)
    b_ref = 60.0
    uniform = render_gemmi(ph.model.with_values(b_iso=np.full(len(ph.model), b_ref)), shape=ph.truth.shape,
                           voxel_size=vs, origin=origin(ph.truth))
    g_uni = guinier_b(like(ph.truth, uniform.astype(np.float32)), resolution_range=rr)
    b_intrinsic = -g_uni.b_relion - b_ref
    truth_b = np.asarray(ph.local_b.values, np.float64)
    inside = (np.asarray(ph.mask.values) > 0.5) & np.isfinite(b_map)
    est = -b_map - b_intrinsic
    err = est[inside] - truth_b[inside]
    # per-voxel estimates scatter (each is one short Guinier line); score thirds of the
    # molecule split by the true local B
    cuts = np.quantile(truth_b[inside], [1 / 3, 2 / 3])
    bins = np.digitize(truth_b[inside], cuts)
    t_means = [float(truth_b[inside][bins == k].mean()) for k in range(3)]
    e_means = [float(est[inside][bins == k].mean()) for k in range(3)]
    rel = [abs(e - t) / abs(t) for e, t in zip(e_means, t_means)]
    tv = np.asarray(ph.truth.values, np.float64)
    avg = 0.5 * (np.asarray(ph.half1.values, np.float64) + np.asarray(ph.half2.values, np.float64))
    sm = np.asarray(spiral_map, np.float64)

    def _cc(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.corrcoef(a[inside], b[inside])[0, 1])

    save(like(ph.truth, b_map.astype(np.float32), name="locbfactor"), outdir / "locbfactor_b.mrc")
    save(like(ph.truth, sm.astype(np.float32), name="locspiral"), outdir / "locspiral.mrc")
    return {
        "resolution_range_A": [round(low, 2), round(high, 2)],
        "n_bands": lb.bank.n_bands,
        "mean_local_b_relion_A2": float(np.mean(b_map[inside])),
        "b_intrinsic_A2": float(b_intrinsic),
        "local_b_thirds_truth_A2": t_means,
        "local_b_thirds_estimate_A2": e_means,
        "local_b_thirds_max_rel_error": float(max(rel)),
        "local_b_thirds_ranked": bool(np.all(np.diff(e_means) > 0)),
        "local_b_voxel_mean_error_A2": float(np.mean(err)),
        "local_b_voxel_median_abs_error_A2": float(np.median(np.abs(err))),
        "local_b_voxel_corr": _cc(est, truth_b),
        "locspiral_cc_truth": _cc(sm, tv),
        "average_map_cc_truth": _cc(avg, tv),
    }
