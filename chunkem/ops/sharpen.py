"""Global sharpening / blurring: a fixed B, or Phenix-style automatic sharpening.

* :func:`sharpen` applies one B-factor (**RELION sign**: negative sharpens,
  positive blurs; amplitudes multiplied by ``exp(-B s²/4)``), optionally with
  a low-pass, in one Fourier pass.
* :func:`auto_sharpen` chooses the sharpening as ``phenix.auto_sharpen``
  does (Terwilliger et al. 2018, method ``b_iso_to_d_cut``): it searches the
  target decay ``b_iso`` of the sharpened map on a grid and keeps the one
  that maximises the adjusted surface area (default) or the kurtosis of the
  map, on a representative box; then applies the winner to the whole map
  through the engine's FFT. Spec: ``02_auto_sharpening.md``.

B signs of :class:`AutoSharpenResult`: ``b_iso`` / ``original_b_iso`` are
**decay B** (``|F| ∝ exp(-b_iso s²/4)``); ``b_sharpen = original_b_iso −
b_iso`` is **cctbx's** (positive sharpens); ``bfactor_relion = −b_sharpen``
is the equivalent RELION B below ``d_cut``.

Two estimates differ in method from cctbx (spec §4.1, §4.6), aiming at the
same numbers:

* ``original_b_iso``: cctbx fits a maximum-likelihood anisotropic Wilson
  model with a protein reference curve; here ``ln<|F|²>`` vs ``s²`` over
  ``0.833 d … 10 Å`` is fitted with a line that may bend upwards once, at
  the shell where noise starts to dominate
  (:func:`chunkem.kernels.sharpening.wilson_b_iso_noise_aware`), and B is the
  slope before the bend. A plain line runs into the noise floor and comes
  out ~30 Å² low on noisy maps.
* ``solvent_fraction`` (when not given): cctbx's low-resolution-mask route,
  a sphere-averaged local variance thresholded at 5 % of its peak
  (:func:`estimate_solvent_fraction`).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from scipy import ndimage

from ..engine import spectral
from ..errors import ParameterError
from ..kernels import filters as KF
from ..kernels import sharpening as KS
from ..volume import like, make_volume, validate_volume, voxel_size

__all__ = ["sharpen", "AutoSharpenResult", "auto_sharpen", "estimate_solvent_fraction"]

METHODS = ("adjusted_sa", "kurtosis")


def sharpen(
    vol: xr.DataArray, *, bfactor: float, lowpass: float | None = None, strategy: str = "auto"
) -> xr.DataArray:
    """Apply a B-factor (and optionally a low-pass) to a map.

    Parameters
    ----------
    vol
        Volume (lazy in → lazy out).
    bfactor
        B in Å², **RELION sign**: amplitudes are multiplied by
        ``exp(-B s²/4)``, so ``B < 0`` sharpens and ``B > 0`` blurs.
    lowpass
        Optional low-pass resolution in Å (cosine edge, see
        :func:`chunkem.ops.filter.filter_volume`); recommended when sharpening.
    strategy
        FFT strategy of :func:`chunkem.engine.spectral.rfft`.

    Returns
    -------
    xarray.DataArray
        Same geometry as ``vol``.

    Examples
    --------
    >>> import numpy as np
    >>> from chunkem.volume import make_volume
    >>> v = make_volume(np.random.default_rng(0).normal(size=(16, 16, 16)), voxel_size=1.0)
    >>> back = sharpen(sharpen(v, bfactor=50.0), bfactor=-50.0)
    >>> bool(np.allclose(back.values, v.values, atol=1e-4))
    True
    """
    from .filter import filter_volume

    b = float(bfactor)
    if not np.isfinite(b):
        raise ParameterError(f"bfactor must be a finite number of Å², got {bfactor!r}")
    return filter_volume(vol, bfactor=b, bfactor_convention="relion", lowpass=lowpass, strategy=strategy)


@dataclass
class AutoSharpenResult:
    """Result of :func:`auto_sharpen` (B signs: see the module notes).

    Attributes
    ----------
    map
        Sharpened Volume (lazy for dask input).
    b_iso
        Chosen target decay B of the sharpened map (Å²).
    b_sharpen
        ``original_b_iso − b_iso`` (Å², cctbx sign, positive sharpens).
    bfactor_relion
        ``−b_sharpen``: the RELION-sign B applied below ``d_cut``.
    original_b_iso
        Decay B of the input from an isotropic Wilson fit (Å²).
    method
        ``"adjusted_sa"`` or ``"kurtosis"``.
    resolution, d_cut, d_min_used
        Å.
    solvent_fraction, region_weight
        Used in the score.
    box
        ``(z0, z1, y0, y1, x0, x1)`` voxel bounds of the analysed box.
    table
        Per grid point: ``b_iso``, ``b_sharpen``, ``sa_ratio``,
        ``normalized_regions``, ``n_regions``, ``adjusted_sa``, ``kurtosis``,
        ``score``.
    signal_to_noise
        Of the score curve (spec §4.5); < 3 means a poorly determined optimum.
    wilson
        The noise-aware Wilson fit behind ``original_b_iso`` (its break
        resolution and the plain straight-line B).
    warnings
        Messages.
    """

    map: xr.DataArray
    b_iso: float
    b_sharpen: float
    bfactor_relion: float
    original_b_iso: float
    method: str
    resolution: float
    d_cut: float
    d_min_used: float
    solvent_fraction: float
    region_weight: float
    box: tuple[int, int, int, int, int, int]
    table: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    signal_to_noise: float = math.nan
    k_sharpen: float = 10.0
    b_blur_hires: float | None = 200.0
    wilson: KS.WilsonFit | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary with the score table (the map is not included)."""

        def clean(v):
            return [None if not np.isfinite(x) else float(x) for x in np.asarray(v, dtype=np.float64)]

        return {
            "method": self.method,
            "b_iso_A2": self.b_iso,
            "b_sharpen_A2": self.b_sharpen,
            "bfactor_relion_A2": self.bfactor_relion,
            "original_b_iso_A2": self.original_b_iso,
            "sign_conventions": {
                "b_iso": "decay: |F| ~ exp(-b_iso s^2/4)",
                "b_sharpen": "cctbx: F * exp(+b_sharpen s^2/4), positive sharpens",
                "bfactor_relion": "RELION: F * exp(-B s^2/4) below d_cut, negative sharpens",
            },
            "resolution_A": self.resolution,
            "d_cut_A": self.d_cut,
            "d_min_used_A": self.d_min_used,
            "k_sharpen": self.k_sharpen,
            "b_blur_hires_A2": self.b_blur_hires,
            "solvent_fraction": self.solvent_fraction,
            "region_weight": self.region_weight,
            "box_voxels": list(self.box),
            "signal_to_noise": None if not np.isfinite(self.signal_to_noise) else self.signal_to_noise,
            "wilson_fit": None if self.wilson is None else self.wilson.to_dict(),
            "table": {k: clean(v) for k, v in self.table.items()},
            "warnings": list(self.warnings),
        }

    def plot(self, path: str | os.PathLike) -> Path:
        """PNG of the score against the target b_iso, the choice marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ..cli.common import atomic_write_bytes

        b = self.table["b_iso"]
        y = self.table["score"]
        fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
        ok = np.isfinite(y)
        ax.plot(b[ok], y[ok], "o-", color="tab:blue", ms=4)
        ax.axvline(self.b_iso, color="tab:red", lw=1)
        ax.annotate(f"b_iso = {self.b_iso:.0f} Å²\nb_sharpen = {self.b_sharpen:.0f} Å²", (self.b_iso, np.nanmax(y)),
                    xytext=(6, -28), textcoords="offset points", color="tab:red", fontsize=8)
        ax.set_xlabel("target b_iso of the sharpened map (Å², decay sign)")
        ax.set_ylabel(self.method.replace("_", " "))
        ax.grid(alpha=0.3)
        ax.set_title(f"auto-sharpen ({self.method}), S/N {self.signal_to_noise:.1f}")
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
        atomic_write_bytes(Path(path), buf.getvalue())
        return Path(path)


def _sharpen_kernel(F, *, kz, ky, kx, b_sharpen, d_cut, k_sharpen, b_blur_hires, s_max):
    """cctbx ``b_iso_to_d_cut`` multiplier, coefficients beyond ``s_max`` (1/Å) zeroed."""
    s = KF.radius(kz, ky, kx)
    m = KS.b_iso_to_d_cut_multiplier(s, b_sharpen=b_sharpen, d_cut=d_cut, k_sharpen=k_sharpen,
                                     b_blur_hires=b_blur_hires)
    if s_max is not None:
        m = np.where(s <= s_max * (1 + 1e-9), m, 0.0)
    return (F * m.astype(np.float32)).astype(np.complex64, copy=False)


def _select_box(vol: xr.DataArray, box: int | str | None, resolution: float) -> tuple[np.ndarray, tuple, bool]:
    """The analysed sub-volume (numpy), its voxel bounds, and whether it wraps."""
    shape = tuple(int(n) for n in vol.shape)
    if box is None:
        box = "whole" if np.prod(shape) <= 160**3 else 128
    if box == "whole":
        return np.asarray(vol.values, dtype=np.float32), (0, shape[0], 0, shape[1], 0, shape[2]), True
    if isinstance(box, str):
        raise ParameterError(f"box must be an edge in voxels, 'whole' or None, got {box!r}")
    edge = int(box)
    if edge < 16:
        raise ParameterError(f"box must be at least 16 voxels, got {box}")
    edges = [min(edge, n) for n in shape]
    if edges == list(shape):
        return np.asarray(vol.values, dtype=np.float32), (0, shape[0], 0, shape[1], 0, shape[2]), True
    # density selection on a coarse copy: the window holding the most density
    f = max(1, int(math.ceil(max(shape) / 64)))
    import dask.array as da

    data = vol.data
    if isinstance(data, np.ndarray):
        data = da.from_array(data, chunks=data.shape)
    coarse = np.asarray(da.coarsen(np.mean, data, {0: f, 1: f, 2: f}, trim_excess=True).compute(),
                        dtype=np.float64)
    vs = voxel_size(vol)
    sig = [max(0.5, resolution / (v * f)) for v in vs]
    sm = ndimage.gaussian_filter(coarse, sigma=sig, mode="wrap")
    pos = np.clip(sm - np.median(sm), 0, None)
    w = [max(1, e // f) for e in edges]
    dens = ndimage.uniform_filter(pos, size=w, mode="constant")
    c = np.array(np.unravel_index(int(np.argmax(dens)), dens.shape)) * f + f // 2
    lo = [int(min(max(0, ci - e // 2), n - e)) for ci, e, n in zip(c, edges, shape)]
    sl = tuple(slice(a, a + e) for a, e in zip(lo, edges))
    sub = np.asarray(vol.isel(z=sl[0], y=sl[1], x=sl[2]).values, dtype=np.float32)
    return sub, (lo[0], lo[0] + edges[0], lo[1], lo[1] + edges[1], lo[2], lo[2] + edges[2]), False


def _envelope_kernel(F, *, kz, ky, kx, radius, s_max):
    """Sphere average of radius ``radius`` Å, coefficients beyond ``s_max`` and the mean (DC) zeroed."""
    s = KF.radius(kz, ky, kx)
    m = KS.sphere_average_transfer(s, radius=radius) * (s <= s_max * (1 + 1e-9)) * (s > 0)
    return (F * m.astype(np.float32)).astype(np.complex64, copy=False)


def estimate_solvent_fraction(vol: xr.DataArray, *, resolution: float, fraction_of_max: float = 0.05,
                              radius: float | None = None) -> float:
    """Solvent fraction of a map from a low-resolution local-variance envelope (spec §4.6).

    The map's squared deviation from its mean, ``(m − <m>)²``, is averaged
    over spheres of ``radius`` Å (default ``2 × resolution``) and low-passed at
    ``resolution``, with its mean removed (one engine FFT); voxels where this
    envelope is below ``fraction_of_max`` × its maximum are solvent. This is
    the low-resolution-mask route of cctbx (``get_overall_mask``; RESOLVE's
    iterated estimate is not in cctbx); being a ratio to the peak it does
    not depend on the map's scale or on a B-factor applied to it, within the
    low-pass.

    Parameters
    ----------
    vol
        The map (computed: it is a reduction).
    resolution
        Nominal resolution (Å): the low-pass and the default radius.
    fraction_of_max
        Envelope threshold as a fraction of its maximum (cctbx: 0.05).
    radius
        Sphere radius (Å); default ``2 × resolution``.

    Returns
    -------
    float
        Fraction of voxels outside the envelope, clamped to [0.01, 0.99].
    """
    m = np.asarray(vol.values, dtype=np.float64)
    dev = make_volume((m - m.mean()) ** 2, voxel_size=voxel_size(vol))
    r = 2.0 * float(resolution) if radius is None else float(radius)
    env = spectral.fourier_filter(dev, _envelope_kernel, support=1.0 / float(resolution), radius=r,
                                  s_max=1.0 / float(resolution))
    f = KS.solvent_fraction_from_envelope(np.asarray(env.values), fraction_of_max=fraction_of_max)
    return float(np.clip(f, 0.01, 0.99)) if np.isfinite(f) else 0.5


def auto_sharpen(
    vol: xr.DataArray,
    *,
    resolution: float,
    method: str = "adjusted_sa",
    box: int | str | None = None,
    solvent_fraction: float | None = None,
    search_b_min: float = -100.0,
    search_b_max: float = 300.0,
    search_b_n: int = 21,
    k_sharpen: float = 10.0,
    b_blur_hires: float | None = 200.0,
    d_min_ratio: float = 0.833,
    d_cut: float | None = None,
    region_weight: float | None = None,
    sa_percent: float = 30.0,
    fraction_occupied: float = 0.20,
    max_regions: int = 30,
    strategy: str = "auto",
) -> AutoSharpenResult:
    """Choose and apply a global sharpening by maximising map detail (phenix.auto_sharpen).

    Parameters
    ----------
    vol
        The map (Volume; lazy in → lazy out for the sharpened map; the
        analysed box is computed).
    resolution
        Nominal resolution d in Å (sets ``d_cut`` and ``d_min = 0.833 d``).
    method
        ``"adjusted_sa"`` (default: surface area of the contoured density,
        penalised for fragmentation) or ``"kurtosis"``.
    box
        ``None``: the whole map up to 160³ voxels, else a 128-voxel cube
        around the densest region; an int: a cube of that edge around the
        densest region; ``"whole"``: the whole map.
    solvent_fraction
        Fraction of the box that is solvent; default: estimated from a
        low-resolution envelope of the box (:func:`estimate_solvent_fraction`).
    search_b_min, search_b_max, search_b_n
        Grid of target ``b_iso`` (Å², decay sign); widened to include the
        map's own ``original_b_iso``.
    k_sharpen, b_blur_hires, d_cut
        Parameters of the ``b_iso_to_d_cut`` law (see
        :func:`chunkem.kernels.sharpening.b_iso_to_d_cut_multiplier`);
        ``d_cut`` defaults to ``resolution``.
    d_min_ratio
        Coefficients finer than ``d_min_ratio × resolution`` are dropped.
    region_weight
        Fixed region weight; default: calibrated from the data
        (``delta_ratio``, spec §4.4).
    sa_percent, fraction_occupied, max_regions
        Adjusted-surface-area parameters (cctbx defaults).
    strategy
        FFT strategy for the final whole-map filter.

    Returns
    -------
    AutoSharpenResult

    Raises
    ------
    ParameterError
        Resolution beyond Nyquist, unknown method, too small a box, or no
        grid point with a defined score.
    """
    validate_volume(vol, source="map")
    if method not in METHODS:
        raise ParameterError(f"method must be one of {METHODS}, got {method!r}")
    vs = voxel_size(vol)
    nyq = 2.0 * max(vs)
    if not (np.isfinite(resolution) and resolution >= nyq * (1 - 1e-6)):
        raise ParameterError(f"resolution={resolution} Å is beyond Nyquist ({nyq:.3f} Å for voxel size {vs})")
    d_min_use = max(resolution * d_min_ratio, nyq)
    s_max = 1.0 / d_min_use
    dcut = float(d_cut) if d_cut is not None else float(resolution)
    notes: list[str] = []

    sub, bounds, wrap = _select_box(vol, box, resolution)
    bvol = make_volume(sub, voxel_size=vs)
    spec = spectral.rfft(bvol)
    prof = spectral.radial_profile(spec, progress=False)
    wfit = KS.wilson_b_iso_noise_aware(prof.frequency, prof.mean_power(), d_min=d_min_use, d_max=10.0)
    orig = wfit.b_iso
    if not np.isfinite(orig):
        orig = KS.wilson_b_iso(prof.frequency, prof.mean_power(), d_min=d_min_use, d_max=3.0 * d_min_use)
    if not np.isfinite(orig):
        orig = 200.0
        notes.append("could not estimate the map's B (too few shells); assuming original_b_iso = 200 Å²")
    if solvent_fraction is None:
        fs = estimate_solvent_fraction(bvol, resolution=resolution)
    else:
        fs = float(solvent_fraction)
        if fs >= 10:
            fs /= 100.0
        if not 0 < fs < 1:
            raise ParameterError(f"solvent_fraction must be in (0, 1) (or percent), got {solvent_fraction}")

    def evaluate(b_iso: float) -> KS.SAScore:
        out = spectral.apply(_sharpen_kernel, spec, b_sharpen=orig - b_iso, d_cut=dcut, k_sharpen=k_sharpen,
                             b_blur_hires=b_blur_hires, s_max=s_max)
        m = np.asarray(spectral.irfft(out).values)
        return KS.adjusted_sa(m, solvent_fraction=fs, region_weight=0.0, sa_percent=sa_percent,
                              fraction_occupied=fraction_occupied, max_regions=max_regions, wrap=wrap)

    grid = KS.search_grid(orig, b_min=search_b_min, b_max=search_b_max, n=search_b_n)
    raw = [evaluate(float(b)) for b in grid]
    sa = np.array([r.sa_ratio for r in raw])
    nr = np.array([r.normalized_regions for r in raw])
    nreg = np.array([r.n_regions for r in raw], dtype=np.float64)
    kurt = np.array([r.kurtosis for r in raw])
    if region_weight is None:
        b_low, b_high = float(grid[0]), float(grid[-1])
        mid = evaluate(b_low + 0.375 * (b_high - b_low))
        if np.isfinite(sa[0]) and np.isfinite(sa[-1]) and np.isfinite(mid.sa_ratio):
            rw = KS.region_weight_calibration((sa[0], nr[0]), (sa[-1], nr[-1]), (mid.sa_ratio, mid.normalized_regions))
        else:
            rw = 30.0
            notes.append("region weight calibration failed (fewer than 2 regions at a grid end); using 30")
    else:
        rw = float(region_weight)
    adj = sa - rw * nr
    score = adj if method == "adjusted_sa" else kurt
    if not np.isfinite(score).any():
        raise ParameterError("no sharpening B gave a defined score (the map has fewer than 2 density regions "
                             "at every level): try box='whole' or give solvent_fraction")
    best = int(np.nanargmax(np.where(np.isfinite(score), score, -np.inf)))
    b_iso = float(grid[best])
    sn = KS.score_signal_to_noise(score)
    if sn < 3.0:
        notes.append(f"the score curve is flat (signal/noise {sn:.1f} < 3): the chosen B is poorly determined")
    b_sharpen = orig - b_iso
    out = spectral.fourier_filter(vol, _sharpen_kernel, strategy=strategy, b_sharpen=b_sharpen, d_cut=dcut,
                                  k_sharpen=k_sharpen, b_blur_hires=b_blur_hires, s_max=s_max)
    out = like(vol, out.data)
    for n in notes:
        warnings.warn(n, stacklevel=2)
    return AutoSharpenResult(
        map=out,
        b_iso=b_iso,
        b_sharpen=float(b_sharpen),
        bfactor_relion=float(-b_sharpen),
        original_b_iso=float(orig),
        method=method,
        resolution=float(resolution),
        d_cut=dcut,
        d_min_used=float(d_min_use),
        solvent_fraction=fs,
        region_weight=float(rw),
        box=tuple(int(v) for v in bounds),  # type: ignore[arg-type]
        table={
            "b_iso": grid,
            "b_sharpen": orig - grid,
            "sa_ratio": sa,
            "normalized_regions": nr,
            "n_regions": nreg,
            "adjusted_sa": adj,
            "kurtosis": kurt,
            "score": score,
        },
        signal_to_noise=float(sn),
        k_sharpen=float(k_sharpen),
        b_blur_hires=b_blur_hires,
        wilson=wfit,
        warnings=notes,
    )
