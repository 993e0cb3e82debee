"""Filters: Fourier low-/high-/band-pass at a resolution, B-factors, Gaussian smoothing.

Fourier filters run as one GLOBAL-FFT stage (:mod:`chunkem.engine.spectral`:
rfft → pointwise multiplier → irfft); Gaussian smoothing is a LOCAL stage
(:func:`chunkem.engine.local.run_local`) with a halo of ``truncate × σ`` Å.
All functions are lazy for dask-backed Volumes and in-memory for numpy ones,
and keep the input's geometry (voxel size, origin, header).

Edges: the multiplier is 1/2 at the cut-off frequency ``1 / resolution``;
``width`` (1/Å) sets the steepness. Default width: 0.2 × the cut-off
frequency, independent of the box size, so that a crop and the whole
tomogram are filtered alike (see :mod:`chunkem.kernels.filters`).

B-factor sign: :func:`apply_bfactor` multiplies amplitudes by
``exp(-B s²/4)`` (decay / RELION sign, 00_conventions §1): B > 0 blurs,
B < 0 sharpens. ``convention="sharpen"`` flips it (cctbx ``b_sharpen``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from ..engine.local import run_local
from ..engine.spectral import fourier_filter
from ..errors import ParameterError
from ..kernels import filters as K
from ..volume import as_triple, voxel_size

__all__ = [
    "DEFAULT_RELATIVE_WIDTH",
    "FilterSpec",
    "lowpass",
    "highpass",
    "bandpass",
    "apply_bfactor",
    "gaussian_smooth",
    "filter_volume",
]

DEFAULT_RELATIVE_WIDTH = 0.2


@dataclass
class FilterSpec:
    """The Fourier multiplier terms of a combined filter (for reports).

    ``terms`` is a list of ``(kind, parameters)``: ``("lowpass", {...})``,
    ``("highpass", {...})``, ``("bfactor", {...})``, ``("gaussian", {...})``.
    """

    terms: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"terms": [{"kind": k, **p} for k, p in self.terms]}


def _fourier_terms(F: np.ndarray, *, kz, ky, kx, terms) -> np.ndarray:
    """Fourier kernel: multiply ``F`` by the product of the multiplier terms."""
    s = K.radius(kz, ky, kx)
    m = None
    for kind, p in terms:
        if kind == "lowpass":
            t = K.lowpass_multiplier(s, cutoff=p["cutoff"], edge=p["edge"], width=p["width"])
        elif kind == "highpass":
            t = K.highpass_multiplier(s, cutoff=p["cutoff"], edge=p["edge"], width=p["width"])
        elif kind == "bfactor":
            t = K.bfactor_multiplier(s, bfactor=p["bfactor"], convention=p["convention"])
        elif kind == "gaussian":
            t = K.gaussian_multiplier(kz, ky, kx, sigma=p["sigma"])
        else:  # pragma: no cover - guarded by filter_volume
            raise ValueError(kind)
        m = t if m is None else m * t
    if m is None:
        return np.asarray(F, dtype=np.complex64)
    m = np.broadcast_to(np.asarray(m, dtype=np.float32), np.shape(F))
    return np.multiply(F, m, dtype=np.complex64)


def _check_resolution(vol: xr.DataArray, resolution: float, what: str) -> float:
    try:
        r = float(resolution)
    except (TypeError, ValueError):
        raise ParameterError(f"{what} must be a resolution in Å, got {resolution!r}") from None
    if not np.isfinite(r) or r <= 0:
        raise ParameterError(f"{what} must be a positive resolution in Å, got {resolution!r}")
    nyq = 2.0 * min(voxel_size(vol))
    if r < nyq:
        raise ParameterError(
            f"{what} {r:g} Å is finer than the Nyquist limit {nyq:g} Å of {vol.name or 'the map'} "
            f"(voxel size {voxel_size(vol)} Å)"
        )
    return r


def _check_edge(edge: str, width: float | None, cutoff: float) -> tuple[str, float]:
    if edge not in K.EDGES:
        raise ParameterError(f"edge must be one of {', '.join(K.EDGES)}, got {edge!r}")
    if width is None:
        return edge, DEFAULT_RELATIVE_WIDTH * cutoff
    w = float(width)
    if not np.isfinite(w) or w < 0:
        raise ParameterError(f"width must be a frequency width >= 0 in 1/Å, got {width!r}")
    return edge, w


def filter_volume(
    vol: xr.DataArray,
    *,
    lowpass: float | None = None,
    highpass: float | None = None,
    bfactor: float | None = None,
    bfactor_convention: str = "relion",
    edge: str = "cosine",
    width: float | None = None,
    strategy: str = "auto",
    name: str | None = None,
) -> xr.DataArray:
    """Low-pass, high-pass (band-pass when both) and B-factor in one Fourier pass.

    Parameters
    ----------
    vol
        Volume (numpy- or dask-backed).
    lowpass
        Keep resolutions coarser than this (Å); the multiplier is 1/2 there.
    highpass
        Remove resolutions coarser than this (Å); must be > ``lowpass``.
    bfactor
        B-factor in Å² applied as ``exp(-B s²/4)`` (``bfactor_convention``
        ``"relion"``/``"decay"``: B > 0 blurs, B < 0 sharpens) or
        ``exp(+B s²/4)`` (``"sharpen"``, cctbx ``b_sharpen``).
    edge
        ``"cosine"`` or ``"gaussian"`` edge of the pass filters.
    width
        Edge width in 1/Å (default 0.2 × the cut-off frequency of each edge).
    strategy
        FFT strategy of :func:`chunkem.engine.spectral.rfft`.
    name
        Output name (default: the input's).

    Returns
    -------
    xarray.DataArray
        Filtered Volume, same geometry; lazy for dask input.
    """
    terms = _terms(vol, lowpass=lowpass, highpass=highpass, bfactor=bfactor,
                   bfactor_convention=bfactor_convention, edge=edge, width=width)
    if not terms:
        raise ParameterError("nothing to do: give lowpass=, highpass= or bfactor=")
    return fourier_filter(vol, _fourier_terms, strategy=strategy, name=name, terms=tuple(terms),
                          support=_support(terms))


def _support(terms) -> float | None:
    """Band limit (1/Å) of a filter with a low-pass term: its transforms then run on that
    window only (exact: the multiplier is zero beyond it, or < 1e-9 for a Gaussian edge,
    where a sharpening B-factor could lift the tail and no window is used)."""
    lows = [p for kind, p in terms if kind == "lowpass"]
    if not lows:
        return None
    p = lows[0]
    sharpening = any(kind == "bfactor" and (1.0 if q["convention"] == "sharpen" else -1.0) * q["bfactor"] > 0
                     for kind, q in terms)
    if p["edge"] == "gaussian" and sharpening:
        return None
    return K.lowpass_support(cutoff=p["cutoff"], edge=p["edge"], width=p["width"])


def _terms(vol, *, lowpass, highpass, bfactor, bfactor_convention, edge, width) -> list:
    terms: list[tuple[str, dict[str, Any]]] = []
    if lowpass is not None and highpass is not None:
        lo = _check_resolution(vol, lowpass, "lowpass")
        hi = float(highpass)
        if not hi > lo:
            raise ParameterError(
                f"band-pass needs the high-pass resolution ({highpass} Å) coarser than the low-pass one ({lowpass} Å)"
            )
    if highpass is not None:
        r = float(highpass)
        if not np.isfinite(r) or r <= 0:
            raise ParameterError(f"highpass must be a positive resolution in Å, got {highpass!r}")
        e, w = _check_edge(edge, width, 1.0 / r)
        terms.append(("highpass", {"resolution": r, "cutoff": 1.0 / r, "edge": e, "width": w}))
    if lowpass is not None:
        r = _check_resolution(vol, lowpass, "lowpass")
        e, w = _check_edge(edge, width, 1.0 / r)
        terms.append(("lowpass", {"resolution": r, "cutoff": 1.0 / r, "edge": e, "width": w}))
    if bfactor is not None:
        b = float(bfactor)
        if not np.isfinite(b):
            raise ParameterError(f"bfactor must be a finite number of Å², got {bfactor!r}")
        if bfactor_convention not in K.BFACTOR_CONVENTIONS:
            raise ParameterError(
                f"bfactor convention must be one of {', '.join(K.BFACTOR_CONVENTIONS)}, got {bfactor_convention!r}"
            )
        terms.append(("bfactor", {"bfactor": b, "convention": bfactor_convention}))
    return terms


def lowpass(
    vol: xr.DataArray, *, resolution: float, edge: str = "cosine", width: float | None = None,
    strategy: str = "auto",
) -> xr.DataArray:
    """Low-pass filter to ``resolution`` Å (multiplier 1/2 at ``1/resolution``).

    Examples
    --------
    >>> import numpy as np
    >>> from chunkem.volume import make_volume
    >>> v = make_volume(np.random.default_rng(0).random((16, 16, 16)), voxel_size=2.0)
    >>> lp = lowpass(v, resolution=8.0)
    >>> bool(lp.std() < v.std()), lp.attrs["voxel_size"]
    (True, (2.0, 2.0, 2.0))
    """
    return filter_volume(vol, lowpass=resolution, edge=edge, width=width, strategy=strategy)


def highpass(
    vol: xr.DataArray, *, resolution: float, edge: str = "cosine", width: float | None = None,
    strategy: str = "auto",
) -> xr.DataArray:
    """High-pass filter: remove features coarser than ``resolution`` Å (1 - low-pass)."""
    return filter_volume(vol, highpass=resolution, edge=edge, width=width, strategy=strategy)


def bandpass(
    vol: xr.DataArray,
    *,
    low_resolution: float,
    high_resolution: float,
    edge: str = "cosine",
    width: float | None = None,
    strategy: str = "auto",
) -> xr.DataArray:
    """Band-pass: keep resolutions between ``low_resolution`` Å (coarse, e.g. 50) and ``high_resolution`` Å (fine, e.g. 8)."""
    return filter_volume(vol, highpass=low_resolution, lowpass=high_resolution, edge=edge, width=width,
                         strategy=strategy)


def apply_bfactor(
    vol: xr.DataArray, *, bfactor: float, convention: str = "relion", strategy: str = "auto"
) -> xr.DataArray:
    """Apply a B-factor (Å²) to the amplitudes.

    Parameters
    ----------
    bfactor
        B in Å².
    convention
        ``"relion"`` (default) or ``"decay"``: multiply by ``exp(-B s²/4)``,
        so B > 0 blurs and B < 0 sharpens (RELION ``--adhoc_bfac -100``
        sharpens). ``"sharpen"`` (cctbx ``b_sharpen``): ``exp(+B s²/4)``.

    Notes
    -----
    Sharpening amplifies noise without bound at high frequency; combine with a
    low-pass (:func:`filter_volume` with ``lowpass=`` and ``bfactor=``).
    """
    return filter_volume(vol, bfactor=bfactor, bfactor_convention=convention, strategy=strategy)


def gaussian_smooth(
    vol: xr.DataArray, *, sigma: float | Sequence[float], truncate: float = 4.0, mode: str = "reflect"
) -> xr.DataArray:
    """Gaussian smoothing in real space with standard deviation ``sigma`` Å.

    A LOCAL stage: ``scipy.ndimage.gaussian_filter`` with σ/voxel size per
    axis, run chunk-wise with a halo of ``truncate × σ`` Å; identical to one
    whole-array ``gaussian_filter`` call (edge ``mode`` at the map border).

    Parameters
    ----------
    sigma
        Standard deviation in Å (one number or (z, y, x)).
    truncate
        Kernel radius in σ.
    mode
        scipy.ndimage edge mode at the true map edge (``"reflect"``,
        ``"nearest"``, ``"mirror"``, ``"constant"``, or ``"wrap"`` for a
        periodic map, run with a periodic halo).
    """
    sig = as_triple(sigma, "sigma")
    if any((not np.isfinite(s)) or s < 0 for s in sig):
        raise ParameterError(f"sigma must be >= 0 Å, got {sigma!r}")
    if truncate <= 0:
        raise ParameterError(f"truncate must be > 0, got {truncate!r}")
    vs = voxel_size(vol)
    sig_vox = tuple(s / v for s, v in zip(sig, vs))
    reach = tuple(truncate * s for s in sig)
    # "wrap" needs data from the far side of the map: a periodic halo, not the block's own edge
    boundary = "periodic" if mode in ("wrap", "grid-wrap") else "none"
    return run_local(K.gaussian_block, vol, reach=reach, boundary=boundary, sigma_voxels=sig_vox, mode=mode,
                     truncate=truncate)


def demo_stage(ctx: dict) -> dict:
    """``chunkem demo`` stage "engine": filters, binning and a pyramid on the phantom.

    Low-passes half map 1 (lazy, from zarr) and checks that it correlates
    better with the truth than the raw half map; smooths it; bins it by 2 and
    writes a 3-level OME-Zarr pyramid. Returns a summary for the demo report.
    """
    from pathlib import Path

    from ..engine.cluster import compute
    from ..io import save
    from .bin import bin_volume, pyramid

    half1, truth = ctx["half1"], ctx["phantom"].truth
    outdir = Path(ctx["outdir"]) / "engine"
    outdir.mkdir(parents=True, exist_ok=True)
    vs = voxel_size(half1)
    res = round(max(4.0 * max(vs), 6.0), 2)
    lp = lowpass(half1, resolution=res)
    lp_truth = lowpass(truth, resolution=res)
    smooth = gaussian_smooth(half1, sigma=max(vs))

    def cc(a, b):
        a = a - a.mean()
        b = b - b.mean()
        return (a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())

    cc_raw, cc_lp, cc_smooth = compute(
        cc(half1.data, truth.data), cc(lp.data, lp_truth.data), cc(smooth.data, truth.data), progress=False
    )
    save(lp, outdir / "half1_lowpass.zarr", progress=False)
    levels = pyramid(bin_volume(half1, factor=2, method="fourier"), levels=3)
    save(levels[0], outdir / "half1_bin2_pyramid.zarr", levels=levels[1:], progress=False)
    return {
        "lowpass_A": res,
        "cc_half1_truth": float(cc_raw),
        "cc_lowpass_truth_lowpass": float(cc_lp),
        "cc_smooth_truth": float(cc_smooth),
        "bin2_voxel_A": float(voxel_size(levels[0])[0]),
        "pyramid_levels": len(levels),
    }
