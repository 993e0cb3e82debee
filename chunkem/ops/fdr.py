"""FDR confidence maps (Beckers, Jakobi & Sachse 2019) and the molecular mask they give.

:func:`fdr_confidence` estimates the background noise mean and σ from four
boxes near the faces of the map (or from the voxels outside a user mask),
turns every voxel into a right-sided p-value, adjusts the p-values inside the
centred sphere for multiple testing (Benjamini–Yekutieli by default, or
Benjamini–Hochberg) and returns the confidence map ``1 - q`` in [0, 1] and
the binary mask ``q <= fdr``. Spec: ``05_locscale_and_fdr.md`` §B.

Execution
---------
* Noise statistics: a REDUCE over the boxes (tiny) or over the voxels outside
  the user mask.
* p-values: pointwise, chunk-local.
* Ranking: exact and without gathering the map. A REDUCE of per-chunk
  histograms of the p-values (log-spaced bins) bounds, for each bin, how
  small the adjusted value of any p-value in it can be; every p-value above
  the last bin that can reach ``q < 1`` has ``q = 1`` exactly. Only the
  p-values at or below that bound (signal voxels and, for BY, a small share of
  the noise) are collected, 8 bytes each, and sorted; the resulting step
  function ``p -> q`` (compressed to its runs) is handed to every chunk.
  For BH on pure noise the bound can include most voxels (BH's q of noise is
  close to, but below, 1).

The statistics are computed when :func:`fdr_confidence` is called (a global
REDUCE, like a shell sum); the returned maps are lazy for dask input.

Differences from the reference code (``FDRutil.calcQMap``): the number of
tests ``n`` is the number of voxels in the sphere (the reference counts the
whole box, a side effect of comparing with NaN), and exact zeros of the map
are ordinary values (the reference sets them to p = 1).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import scipy.special
import xarray as xr

from ..engine import spectral
from ..engine.cluster import active_client, fits_in_memory, persist
from ..errors import DataValueError, ParameterError
from ..kernels import fdr as KF
from ..kernels.filters import radius
from ..volume import check_aligned, is_lazy, like, validate_volume, voxel_size

__all__ = ["FDRResult", "fdr_confidence", "n_in_sphere"]


@dataclass
class FDRResult:
    """Confidence map, mask and the numbers behind them.

    Attributes
    ----------
    confidence
        Volume ``1 - q`` in [0, 1] (0 outside the sphere).
    mask
        Volume, 1 where ``q <= fdr``, else 0.
    method
        ``"BY"`` or ``"BH"``.
    fdr
        The false discovery rate of ``mask``.
    noise_mean, noise_sigma
        Background mean and standard deviation (map units).
    noise_source
        ``"boxes"``, ``"box"`` (user centre) or ``"mask"``.
    noise_box
        Box edge in voxels (None with a mask).
    n_noise
        Number of noise samples.
    n_tests
        Number of p-values adjusted (voxels in the sphere).
    n_candidates
        p-values that needed exact ranks (see the module notes).
    n_selected
        Voxels with ``q <= fdr``.
    p_threshold
        Largest p-value with ``q <= fdr`` (NaN if none).
    map_threshold
        The map value of that p-value, ``μ + σ Φ⁻¹(1 - p)`` (after the
        optional low-pass).
    ks_distance
        Kolmogorov–Smirnov distance of the standardised noise sample from N(0, 1).
    box_means
        Mean of each noise box.
    lowpass
        Å or None.
    warnings
        Diagnostics (non-normal noise, disagreeing boxes).
    """

    confidence: xr.DataArray
    mask: xr.DataArray
    method: str
    fdr: float
    noise_mean: float
    noise_sigma: float
    noise_source: str
    noise_box: int | None
    n_noise: int
    n_tests: int
    n_candidates: int
    n_selected: int
    p_threshold: float
    map_threshold: float
    ks_distance: float
    box_means: list[float] = field(default_factory=list)
    lowpass: float | None = None
    warnings: list[str] = field(default_factory=list)
    noise_sample: np.ndarray | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Numbers for a JSON report (no maps)."""
        return {
            "method": self.method,
            "fdr": self.fdr,
            "noise_mean": self.noise_mean,
            "noise_sigma": self.noise_sigma,
            "noise_source": self.noise_source,
            "noise_box_voxels": self.noise_box,
            "n_noise": self.n_noise,
            "n_tests": self.n_tests,
            "n_candidates": self.n_candidates,
            "n_selected": self.n_selected,
            "p_threshold": self.p_threshold,
            "map_threshold": self.map_threshold,
            "ks_distance": self.ks_distance,
            "box_means": list(self.box_means),
            "lowpass_A": self.lowpass,
            "warnings": list(self.warnings),
        }

    def plot(self, path: str | os.PathLike) -> Path:
        """PNG: noise histogram vs the fitted normal, and central slices of the confidence map."""
        # Figure + Agg canvas directly: no pyplot (lighter import, no global state)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from ..cli.common import atomic_write_bytes

        conf = self.confidence
        fig = Figure(figsize=(12, 3.8))
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, 3)
        ax = axes[0]
        if self.noise_sample is not None and self.noise_sample.size:
            t = (self.noise_sample - self.noise_mean) / self.noise_sigma
            ax.hist(t, bins=60, density=True, color="0.6", label="noise sample")
            x = np.linspace(-5, 5, 200)
            ax.plot(x, np.exp(-x * x / 2) / math.sqrt(2 * math.pi), "k-", label="N(0,1)")
            ax.legend(fontsize=8)
        ax.set_xlabel("(map - μ) / σ")
        ax.set_title(f"noise: KS distance {self.ks_distance:.3f}")
        nz, ny, nx = conf.shape
        views = (("z centre", (nz // 2, slice(None), slice(None))), ("y centre", (slice(None), ny // 2, slice(None))))
        planes = dask.compute(*[conf.data[sl] for _, sl in views])  # one pass for both slices
        for a, (title, _), plane in zip(axes[1:], views, planes):
            im = a.imshow(np.asarray(plane), origin="lower", vmin=0, vmax=1, cmap="viridis")
            a.set_title(f"confidence, {title}")
            fig.colorbar(im, ax=a, fraction=0.046)
        fig.suptitle(f"FDR {self.method} at {self.fdr:g}: {self.n_selected} voxels")
        fig.tight_layout()
        import io

        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90)
        p = Path(path)
        atomic_write_bytes(p, buf.getvalue())
        return p


def n_in_sphere(shape: tuple[int, int, int]) -> int:
    """Number of voxels in the centred sphere of radius ``max(shape)//2`` (spec §B.2), analytically per z-plane."""
    r = max(shape) // 2
    cz, cy, cx = (n // 2 for n in shape)
    ys = np.arange(shape[1]) - cy
    xs = np.arange(shape[2]) - cx
    total = 0
    for z in range(shape[0]):
        rem = r * r - (z - cz) ** 2
        if rem < 0:
            continue
        # count (y, x) with y² + x² <= rem
        xmax2 = rem - ys * ys
        ok = xmax2 >= 0
        if not ok.any():
            continue
        lim = np.floor(np.sqrt(np.where(ok, xmax2, 0))).astype(np.int64)
        # x in [-lim, lim] intersected with [xs.min, xs.max]
        lo = np.maximum(-lim, xs[0])
        hi = np.minimum(lim, xs[-1])
        total += int(np.sum(np.where(ok & (hi >= lo), hi - lo + 1, 0)))
    return total


class _PBlock:
    """Picklable: p-values of one block (NaN outside the sphere)."""

    def __init__(self, mean: float, sigma: float, shape: tuple[int, int, int], sphere: bool):
        self.mean, self.sigma, self.shape, self.sphere = mean, sigma, shape, sphere

    def __call__(self, block: np.ndarray, block_info=None) -> np.ndarray:
        p = KF.p_values(block, mean=self.mean, sigma=self.sigma)
        if self.sphere:
            loc = block_info[0]["array-location"] if block_info else [(0, n) for n in block.shape]
            inside = KF.circular_mask_block(block.shape, full_shape=self.shape, index=[a for a, _ in loc])
            p = np.where(inside, p, np.nan)
        return p


def _hist(p: np.ndarray, edges: np.ndarray) -> np.ndarray:
    v = p[np.isfinite(p)]
    return KF.histogram_counts(v, edges)


def _take_candidates(p: np.ndarray, bound: float) -> np.ndarray:
    v = p[np.isfinite(p)]
    return v[v <= bound]


class _QBlock:
    """Picklable: confidence (1 - q) or mask (q <= fdr) of one p-value block."""

    def __init__(self, upper: np.ndarray, q: np.ndarray, what: str, fdr: float):
        self.upper, self.q, self.what, self.fdr = upper, q, what, fdr

    def __call__(self, p: np.ndarray) -> np.ndarray:
        fin = np.isfinite(p)
        qv = np.ones(p.shape)
        qv[fin] = KF.q_lookup(p[fin], self.upper, self.q)
        if self.what == "confidence":
            out = np.where(fin, 1.0 - qv, 0.0)
        else:
            out = np.where(fin & (qv <= self.fdr), 1.0, 0.0)
        return out.astype(np.float32)


def _hold_locally(nbytes: int) -> bool:
    """Persist an intermediate that several passes read? Only on the threaded scheduler
    (the persisted chunks then live in the graph itself) and when it fits a quarter of
    the memory; on a distributed cluster persisted results are futures that the
    returned (lazy) maps would not keep alive, so the passes recompute instead."""
    return active_client() is None and fits_in_memory(nbytes)


def _tanh_kernel(F, *, kz, ky, kx, cutoff):
    m = KF.tanh_lowpass_multiplier(radius(kz, ky, kx), cutoff=cutoff)
    return (F * m.astype(np.float32)).astype(np.complex64, copy=False)


def fdr_confidence(
    vol: xr.DataArray,
    *,
    method: str = "BY",
    fdr: float = 0.01,
    noise_box: int | None = None,
    box_centre: tuple[float, float, float] | None = None,
    lowpass: float | None = None,
    mask: xr.DataArray | None = None,
    sphere: bool = True,
) -> FDRResult:
    """FDR-controlled confidence map and molecular mask of a map.

    Parameters
    ----------
    vol
        Unmasked map (lazy in → lazy maps out).
    method
        ``"BY"`` (Benjamini–Yekutieli, default, valid under any dependence)
        or ``"BH"`` (Benjamini–Hochberg).
    fdr
        False discovery rate of the binary mask (default 0.01).
    noise_box
        Edge in voxels of the noise boxes (default ``max(int(0.05·N0), 10)``).
    box_centre
        Voxel indices (z, y, x) of a single user noise box instead of the four
        default boxes.
    lowpass
        Optional resolution (Å) of a tanh low-pass (fall-off 0.1) applied first.
    mask
        Optional molecular mask: the noise is estimated from the voxels where
        ``mask <= 0.5`` instead of from boxes.
    sphere
        Test only the voxels in the centred sphere of radius ``max(N)//2``
        (default, as the reference); False tests the whole box.

    Returns
    -------
    FDRResult

    Raises
    ------
    DataValueError
        The noise has zero variance (a masked map: give ``mask`` or ``box_centre``).
    ParameterError
        Unknown method, ``fdr`` outside (0, 1), boxes that do not fit.

    Examples
    --------
    >>> import numpy as np
    >>> from chunkem.volume import make_volume
    >>> v = make_volume(np.random.default_rng(0).normal(size=(40, 40, 40)), voxel_size=1.0)
    >>> r = fdr_confidence(v)
    >>> r.n_selected
    0
    """
    validate_volume(vol)
    if method not in KF.METHODS:
        raise ParameterError(f"method must be one of {KF.METHODS}, got {method!r}")
    fdr = float(fdr)
    if not 0.0 < fdr < 1.0:
        raise ParameterError(f"fdr must be in (0, 1), got {fdr}")
    lazy = is_lazy(vol)
    m = vol
    if lowpass is not None:
        lp = float(lowpass)
        nyq = 2.0 * max(voxel_size(vol))
        if not math.isfinite(lp) or lp <= 0:
            raise ParameterError(f"lowpass must be a positive resolution in Å, got {lowpass!r}")
        if lp < nyq:
            warnings.warn(f"lowpass {lp:g} Å is finer than Nyquist ({nyq:g} Å)", stacklevel=2)
        m = spectral.fourier_filter(vol, _tanh_kernel, cutoff=lp)
        if lazy and _hold_locally(int(m.size) * 4):
            (m,) = persist(m)
    data = m.data if isinstance(m.data, da.Array) else da.from_array(np.asarray(m.data), chunks=m.shape)
    shape = tuple(int(n) for n in m.shape)

    # --- noise statistics (REDUCE)
    msgs: list[str] = []
    box_means: list[float] = []
    if mask is not None:
        check_aligned(vol, mask, names=[str(vol.name or "map"), str(mask.name or "mask")])
        mdata = mask.data if isinstance(mask.data, da.Array) else da.from_array(np.asarray(mask.data), chunks=data.chunks)
        outside = (mdata <= 0.5).rechunk(data.chunks)
        sample_d = data[outside]
        (sample,) = dask.compute(sample_d)
        source, box = "mask", None
        if sample.size == 0:
            raise DataValueError(f"{mask.name or 'mask'}: no voxel outside the mask (<= 0.5) to estimate the noise from")
    else:
        box = int(noise_box) if noise_box is not None else KF.default_noise_box(shape)
        if box < 20:
            msgs.append(f"noise box of {box} voxels is small (< 20); the noise estimate may be poor")
        slices = KF.noise_boxes(shape, box, box_centre)
        parts = dask.compute(*[data[s] for s in slices])
        box_means = [float(np.mean(p)) for p in parts]
        sample = np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts])
        source = "box" if box_centre is not None else "boxes"
        if len(parts) > 1:
            sds = [float(np.std(p)) for p in parts]
            nb = parts[0].size
            spread = max(box_means) - min(box_means)
            tol = 3.0 * max(sds) / math.sqrt(nb) * math.sqrt(2.0)
            if spread > tol and max(sds) > 0:
                msgs.append(
                    f"noise box means differ by {spread:.3g} (> {tol:.3g}): the molecule may reach a box; "
                    "give box_centre or a mask"
                )
    sample = np.asarray(sample, dtype=np.float64)
    mu = float(np.mean(sample))
    var = float(np.var(sample))
    if not (var > 0.0 and math.isfinite(var)):
        raise DataValueError(
            f"{vol.name or 'map'}: the noise sample ({source}) has zero variance — the map looks masked; "
            "give a noise box centre in the solvent or a mask"
        )
    sigma = math.sqrt(var)
    ks = KF.ks_normal_distance((sample - mu) / sigma)
    if ks > 0.05 and sample.size > 100:
        msgs.append(f"the noise is not normal (KS distance {ks:.3f}); p-values may be off")

    # --- p-values (pointwise, lazy) and exact ranking (REDUCE + candidate gather)
    n_tests = n_in_sphere(shape) if sphere else int(np.prod(shape))
    pmap = data.map_blocks(_PBlock(mu, sigma, shape, sphere), dtype=np.float64, meta=np.empty((0, 0, 0)))
    if isinstance(data, da.Array) and _hold_locally(int(pmap.nbytes)):
        (pmap,) = persist(pmap)  # four passes read the p-values: compute them once when they fit
    edges = KF.histogram_edges()
    blocks = pmap.to_delayed().ravel()
    hists = [dask.delayed(_hist)(b, edges) for b in blocks]
    counts = np.sum(dask.compute(*hists), axis=0)
    bound = KF.candidate_bound(counts, edges, n=n_tests, method=method)
    if bound >= 0:
        cands = dask.compute(*[dask.delayed(_take_candidates)(b, bound) for b in blocks])
        cand = np.concatenate(cands) if cands else np.zeros(0)
    else:
        cand = np.zeros(0)
    upper, qv = KF.q_table(cand, n=n_tests, method=method)
    sel = qv <= fdr
    p_thr = float(upper[sel].max()) if sel.any() else math.nan
    n_sel = int(np.searchsorted(np.sort(cand), p_thr, side="right")) if sel.any() else 0
    map_thr = float(mu + sigma * scipy.special.ndtri(1.0 - p_thr)) if sel.any() and p_thr > 0 else math.nan

    conf = pmap.map_blocks(_QBlock(upper, qv, "confidence", fdr), dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))
    binm = pmap.map_blocks(_QBlock(upper, qv, "mask", fdr), dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))
    if not lazy:
        conf, binm = dask.compute(conf, binm, scheduler="threads")
    base = str(vol.name or "map")
    return FDRResult(
        confidence=like(vol, conf, name=f"{base}_confidence"),
        mask=like(vol, binm, name=f"{base}_fdr_mask"),
        method=method,
        fdr=fdr,
        noise_mean=mu,
        noise_sigma=sigma,
        noise_source=source,
        noise_box=box,
        n_noise=int(sample.size),
        n_tests=int(n_tests),
        n_candidates=int(cand.size),
        n_selected=n_sel,
        p_threshold=p_thr,
        map_threshold=map_thr,
        ks_distance=ks,
        box_means=box_means,
        lowpass=float(lowpass) if lowpass is not None else None,
        warnings=msgs,
        noise_sample=sample if sample.size <= 2_000_000 else sample[:: max(1, sample.size // 2_000_000)],
    )
