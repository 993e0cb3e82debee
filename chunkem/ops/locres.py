"""Local resolution maps (local FSC as blocres, monogenic as MonoRes) and local filtering.

:func:`local_resolution` estimates the resolution around every voxel:

``method="localfsc"`` (half maps)
    FSC of Hann-tapered windows of ``window`` Å around each voxel (blocres
    semantics: tapered around the window average, padded to twice the
    window, shells of the padded window, first crossing of ``cutoff`` with
    linear interpolation, clamped to ``[best, worst]``).

    * ``mode="exact"``: one windowed FFT per voxel, as blocres does
      (batched; for validation and small regions; ``step`` samples a grid
      and fills the gaps by trilinear interpolation).
    * ``mode="fast"`` (default): for each shell ``s_j = j / window`` of
      the window, both halves are band-passed to a Gaussian band around
      ``s_j`` (DC excluded; one global FFT per half, one inverse per band,
      through :mod:`chunkem.engine.spectral`) and the windowed sums of
      ``h1_j h2_j``, ``h1_j²`` and ``h2_j²`` with the squared Hann window
      give the local FSC of that shell at every voxel (Parseval; FFT
      correlations on the chunks, halo = half the window). The bands are
      folded one by one into a running first crossing (the same rule and
      interpolation as the exact mode, one float per voxel). Each band's
      windowed sums cover only the bounding box of a chunk's voxels still
      active (in the mask, not yet crossed) plus half a window, so the work
      shrinks with the mask and as voxels cross; each band is inverted from
      the spectrum window ``|k| <=`` its band limit (pruned transforms), and
      a band's spectra wait for the previous band's state, so one band's
      maps are in memory at a time. The cost grows with the number of
      shells (``window / (2 · voxel)`` bands), not with window volume ×
      voxels. ``band_spacing = 1/(2·window)`` samples the exact mode's
      padded shells one to one: about 1.7x the time, slightly closer to the
      exact mode on real maps (below).

    **The approximation.** Per voxel ``v`` the exact shell sum is a
    bilinear form ``Σ_{u,u'} w(u-v) w(u'-v) K_j(u-u') h1(u) h2(u')`` with
    ``K_j`` the inverse transform of the padded shell; the fast one is
    ``Σ_x w(x-v)² (b_j*h1)(x) (b_j*h2)(x)``. For a locally stationary map
    both have the same expectation when ``|B_j|²`` equals the shell
    smeared by the window's power spectrum, ``T_j = χ_j * |Ŵ|²`` (standard
    deviation ``sqrt(1/3 + 1/48) / window ≈ 0.6 / window``). We use a
    Gaussian of standard deviation ``0.7 / window`` in power; bands equal
    to the numerically computed ``T_j`` (and the mean removal of the exact
    mode) gave the same agreement (NPC sphere, before the mirrored faces:
    86.5 % vs 86.4 %; phantom 98.7 % vs 99.0 %), and the mean curves of the
    two modes agree to < 0.01 in FSC.
    What remains is noise, not bias: the fast kernel equals the exact one
    times the window autocorrelation in ``u - u'``, so it averages more
    Fourier modes and its curve is smoother. Where the local FSC hovers
    near the cutoff over several shells the first crossing of the noisier
    exact curve comes earlier, so exact reads coarser there, and no band
    shape can reproduce the exact mode's own noise. Narrower bands (closer
    to hard shells) or a smaller product window made the agreement worse.
    On stationary correlated noise (64³, window 12 voxels, padded shells 2
    to 10) the per-shell local FSC of the two modes correlates at 0.90-0.96
    across voxels (0.95-0.96 from shell 4 on), more than the exact mode
    with itself one voxel away (0.88-0.91), but the fast values spread only
    0.68-0.82x as much; bands and windows that match the exact spread
    (``w³`` or a shrunk ``w²``) lower the correlation and the NPC agreement
    (sphere, before the mirrored faces: 85.0 -> 81-82 %).
    ``benchmarks/locres_fast_vs_exact.py`` measures both.

    **Map faces.** A periodic box (what the FFTs alone give) joins density
    cut by one face to the opposite face, a jump that both halves share
    and that reads as fine resolution: a phantom whose molecule is cut by
    the box face read 0.34-0.43 Å too fine over the 6 slices next to the
    cut (median; exact and fast alike). With ``faces="mirror"`` both modes
    see the map mirrored beyond its faces (``engine.local.extend``, half a
    window and two voxels, up to an FFT-friendly size), the fast mode's
    global FFTs included: within 0.06 Å of the uncut map. It costs the
    larger FFTs (256³, 21-voxel window: 288³, 16 -> 24 s, 1.4 -> 1.7 GB),
    so ``faces="auto"`` (default) mirrors only the axes whose face slabs
    carry density (their halves correlate above ``FACE_SIGNAL``): cropped
    maps, sub-tomogram averages and tomograms get the mirror, centred
    single-particle maps (solvent at the faces) the periodic box at no
    cost. blocres leaves the voxels within half a window of a face
    unestimated.

    Measured (fraction of mask voxels within one padded shell
    ``1/(2·window)`` or 0.3 Å, whichever is larger; in brackets within
    ``1/window``). Phantom (64³, 1.1 Å, exact on every 4th voxel): window
    12 / 16 / 19 (default) / 24 voxels: 96.7 / 98.8 / 99.3 / 99.1 %
    (98.6 / 99.6 / 99.8 / 100 %); RMSE vs the known local resolution at the
    default window 0.29 Å (fast) and 0.30 Å (exact). Real sub-tomogram-
    average half maps (NPC, 32³, the whole data set, 2.68 Å; the global FSC
    reaches Nyquist, so the default window is 12 voxels), window 8 / 10 /
    12 / 14 / 16 voxels:

    * on the molecule (chunkem's FDR confidence mask of the averaged
      halves, 1 %, 876 voxels): 99.8 / 98.9 / 99.3 / 98.5 / 97.3 %
      (100 / 100 / 100 / 100 / 99.9 %), also within half a window of the
      faces (97.1-100 %); the exact mode agrees with itself one voxel away
      for 96-99 %;
    * in the data set's sphere (10 875 voxels, 94 % of them outside the
      molecule): 85.1 / 86.6 / 87.6 / 88.7 / 89.9 % (92.6 / 93.6 / 94.3 /
      94.9 / 95.7 %), the exact mode with itself one voxel away 84.4 /
      85.4 / 87.8 / 90.2 / 92.2 %: away from the density the local FSC
      hovers near the cutoff over several shells and the first crossing is
      noise; where the two modes disagree there the exact one mostly reads
      coarser, its noisier curve dipping below the cutoff first.

``method="monores"`` (one map or half maps)
    Monogenic amplitude (the map filtered around frequency ``f`` and its
    three Riesz components, ``A = sqrt(g² + Σ R_j g²)``), smoothed by a
    raised-cosine low-pass at ``f / smoothing``, compared with the
    ``significance`` quantile of the noise amplitude: with half maps the
    noise map ``(h1 - h2)/2`` inside the centred sphere, with one map the
    voxels outside the mask inside it; the sphere stops where the map falls
    flat if it was masked by a smaller one (Xmipp's "cliff": the first
    shell beyond the mask whose variance drops below 1 % of the previous
    shell's). Identical half maps are refused, and so is one map flat
    everywhere outside the mask (masked tightly: no noise to compare
    with); noise whose variance fades more than 10-fold across the noise
    region (soft-masked maps, as many deposited maps are) gets a warning:
    the threshold is too low and the map reads too fine. Resolutions are scanned
    from ``max_resolution`` to Nyquist in ``resolution_step`` Å (steps in
    the same Fourier shell skipped); a voxel takes the last resolution that
    passed before two consecutive failures (Xmipp); the steps are folded one
    by one into a running state (last passed step and consecutive
    failures, one small integer per voxel, exact in float32), one step's maps in memory at a time,
    and a band step's four inverse FFTs run on the band's spectrum window,
    the amplitude's smoothing on its own. Unassigned voxels take
    the median, then a σ = 3 voxel Gaussian smoothing keeps the finer of
    smoothed and raw values. ``filter="band"`` (default) analyses a band
    ``|s - f| < 0.2 f``; ``filter="highpass"`` with ``smoothing=1`` is
    Xmipp's MonoRes (which reads systematically coarser than local FSC: its
    test pools all noise above ``f``).

:func:`local_filter` low-passes each voxel at its own local resolution by
band-wise blending: the map is split into Hann bands that sum to one; each
band is weighted per voxel by a ramp that is 1 below ``1/d(v)`` and 0 above
(optionally times a local B factor) and the weighted bands are summed. At a
voxel the result equals the global low-pass at that voxel's resolution.

Spec: ``../shared/design/algorithms/03_local_resolution.md`` (A, D).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from ..engine import spectral
from ..engine.local import crop, extend, fft_widths, run_local
from ..errors import DataValueError, ParameterError
from ..kernels import locres as K
from ..kernels import spiral as KS
from ..kernels.render import cc_from_sums, cc_sums
from ..volume import check_aligned, check_independent, like, validate_volume, voxel_size

__all__ = [
    "LocalResolutionResult",
    "local_resolution",
    "local_filter",
    "default_window",
    "demo_stage",
    "WINDOW_FACTOR",
]

#: Default window edge as a multiple of the global FSC (0.143) resolution
#: (blocres' rule of thumb is 5-7x the expected resolution).
WINDOW_FACTOR = 6.0
_METHODS = ("localfsc", "monores")
_MODES = ("fast", "exact")


# --------------------------------------------------------------------------- result


@dataclass
class LocalResolutionResult:
    """A local resolution map and how it was made.

    Attributes
    ----------
    resolution
        Volume of local resolution in Å on the input grid; ``fill`` where
        nothing was estimated (outside the mask). Lazy for dask input.
    method, mode
        ``"localfsc"`` (mode ``"fast"`` / ``"exact"``) or ``"monores"``.
    window
        Window edge in Å (local FSC), per axis in voxels in ``box``.
    cutoff
        FSC threshold of ``resolution`` (local FSC).
    best, worst
        Clamp range in Å (data limit, low-resolution cap).
    frequencies
        Shell / band frequencies (1/Å) tested, or MonoRes resolutions (Å).
    global_resolution
        Global FSC 0.143 resolution of the halves (Å) when it was computed.
    mask
        The analysis mask Volume (or None: every voxel).
    fill
        Value outside the analysed region.
    params
        Other parameters for the report.
    extra
        Local FSC with several cutoffs: the maps of the other cutoffs
        (cutoff -> Volume), in the order given; :meth:`at_cutoff` gives a
        result for one of them.
    """

    resolution: xr.DataArray
    method: str
    mode: str | None
    window: float | None
    box: tuple[int, int, int] | None
    cutoff: float | None
    best: float
    worst: float
    frequencies: list[float]
    global_resolution: float | None = None
    mask: xr.DataArray | None = None
    fill: float = 0.0
    params: dict[str, Any] = field(default_factory=dict)
    extra: dict[float, xr.DataArray] = field(default_factory=dict)
    _stats: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def cutoffs(self) -> list[float]:
        """Every FSC threshold computed, ``cutoff`` first (empty for MonoRes)."""
        return ([self.cutoff] if self.cutoff is not None else []) + list(self.extra)

    def at_cutoff(self, cutoff: float) -> LocalResolutionResult:
        """The result for one of the :attr:`cutoffs` (its map as ``resolution``, no ``extra``); MonoRes: ``None``."""
        if cutoff == self.cutoff:
            return replace(self, extra={}) if self.extra else self
        if cutoff not in self.extra:
            raise KeyError(f"cutoff {cutoff} was not computed (have {self.cutoffs})")
        return replace(self, resolution=self.extra[cutoff], cutoff=float(cutoff), extra={}, _stats=None)

    def values_in_mask(self) -> np.ndarray:
        """Local resolution values (Å) of the analysed voxels (computes)."""
        from ..engine.cluster import compute

        res = self.resolution.data
        sel = (res != self.fill) & (res == res)  # not fill, not NaN
        if self.mask is not None:
            sel = sel & (self.mask.data > 0.5)
        if isinstance(res, da.Array) or isinstance(sel, da.Array):
            res_np, sel_np = compute(da.asarray(res), da.asarray(sel), label="local resolution statistics")
        else:
            res_np, sel_np = np.asarray(res), np.asarray(sel)
        return np.asarray(res_np)[np.asarray(sel_np)].astype(np.float64)

    def statistics(self) -> dict[str, Any]:
        """Median, quartiles, 5/95 % and mean (Å) inside the mask, and the fractions at the fine (``best``) and
        coarse (``worst``) clamps (computes once)."""
        if self._stats is None:
            v = self.values_in_mask()
            if v.size == 0:
                self._stats = {"n_voxels": 0}
            else:
                q = np.percentile(v, [5, 25, 50, 75, 95])
                self._stats = {
                    "n_voxels": int(v.size),
                    "median_A": float(q[2]),
                    "q25_A": float(q[1]),
                    "q75_A": float(q[3]),
                    "p05_A": float(q[0]),
                    "p95_A": float(q[4]),
                    "mean_A": float(v.mean()),
                    "min_A": float(v.min()),
                    "max_A": float(v.max()),
                    # at the clamps: limited by the voxel size / data limit, or by the window / scan start
                    "at_best_fraction": float(np.mean(v <= self.limits[0] * (1 + 1e-5))),
                    "at_worst_fraction": float(np.mean(v >= self.limits[1] * (1 - 1e-5))),
                }
        return dict(self._stats)

    @property
    def limits(self) -> tuple[float, float]:
        """(fine, coarse) limits of the values in Å: ``best`` and ``worst`` (MonoRes: the finest and the coarsest
        resolution scanned, within them)."""
        if self.method == "monores" and self.frequencies:
            return (max(self.best, min(self.frequencies)), min(self.worst, max(self.frequencies)))
        return (self.best, self.worst)

    @property
    def median(self) -> float:
        """Median local resolution (Å) inside the mask."""
        return float(self.statistics().get("median_A", math.nan))

    @property
    def quartiles(self) -> tuple[float, float]:
        """(25 %, 75 %) local resolution (Å) inside the mask."""
        st = self.statistics()
        return (float(st.get("q25_A", math.nan)), float(st.get("q75_A", math.nan)))

    def with_resolution(self, resolution: xr.DataArray) -> LocalResolutionResult:
        """The same result holding another resolution Volume (e.g. the map reopened from disk)."""
        return replace(self, resolution=resolution, _stats=None)

    def to_dict(self) -> dict[str, Any]:
        """Parameters and statistics for a JSON report (computes the statistics)."""
        return {
            "method": self.method,
            "mode": self.mode,
            "window_A": self.window,
            "window_voxels": list(self.box) if self.box else None,
            "cutoff": self.cutoff,
            "cutoffs": self.cutoffs,
            "best_A": self.best,
            "worst_A": self.worst,
            "global_resolution_A": self.global_resolution,
            "n_frequencies": len(self.frequencies),
            "fill": self.fill,
            "statistics": self.statistics(),
            **self.params,
        }

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Write a PNG: histogram inside the mask and central slices coloured by resolution."""
        import matplotlib
        from matplotlib.figure import Figure

        from ..cli.common import atomic_write_bytes

        vals = self.values_in_mask()
        nz, ny, nx = self.resolution.shape
        cuts = (np.s_[nz // 2, :, :], np.s_[:, ny // 2, :], np.s_[:, :, nx // 2])
        slices = []
        for sl in cuts:
            r = np.asarray(self.resolution.data[sl], dtype=np.float64)
            ok = (r != self.fill) & np.isfinite(r)
            if self.mask is not None:
                ok &= np.asarray(self.mask.data[sl]) > 0.5
            slices.append(np.where(ok, r, np.nan))
        lo, hi = (np.percentile(vals, [1, 99]) if vals.size else (self.best, self.worst))
        if hi <= lo:
            hi = lo + 1e-3
        fig = Figure(figsize=(16, 4))
        axes = fig.subplots(1, 4)
        ax = axes[0]
        if vals.size:
            ax.hist(vals, bins=40, color="0.4")
            med = float(np.median(vals))
            ax.axvline(med, color="r", label=f"median {med:.2f} Å")
            ax.legend()
        ax.set_xlabel("local resolution (Å)")
        ax.set_ylabel("voxels")
        cmap = matplotlib.colormaps["jet_r"].with_extremes(bad="white")
        im = None
        for a, img, lab in zip(axes[1:], slices, "zyx"):
            im = a.imshow(img, cmap=cmap, vmin=lo, vmax=hi, origin="lower")
            a.set_title(f"central {lab} slice")
            a.set_xticks([])
            a.set_yticks([])
        if im is not None:
            fig.colorbar(im, ax=axes[1:].tolist(), label="Å", shrink=0.8)
        fig.suptitle(title or f"local resolution ({self.method}{'/' + self.mode if self.mode else ''})")
        import io as _io

        buf = _io.BytesIO()
        fig.savefig(buf, format="png", dpi=80)
        atomic_write_bytes(Path(path), buf.getvalue())
        return Path(path)


# --------------------------------------------------------------------------- helpers


def _is_lazy(*vols: xr.DataArray | None) -> bool:
    return any(v is not None and isinstance(v.data, da.Array) for v in vols)


def _check_inputs(half1, half2, mask) -> None:
    validate_volume(half1, source="half1")
    vols, names = [half1], ["half1"]
    if half2 is not None:
        validate_volume(half2, source="half2")
        check_independent(half1, half2, data=True)
        vols.append(half2)
        names.append("half2")
    if mask is not None:
        validate_volume(mask, source="mask")
        vols.append(mask)
        names.append("mask")
    check_aligned(*vols, names=names)


def _cutoffs(cutoff: float | Sequence[float]) -> list[float]:
    """FSC thresholds as a list (one number or several), each in (0, 1), no repeats."""
    values = [cutoff] if np.isscalar(cutoff) else list(cutoff)
    if not values:
        raise ParameterError("cutoff: give at least one FSC threshold")
    out: list[float] = []
    for c in values:
        try:
            c = float(c)
        except (TypeError, ValueError):
            raise ParameterError(f"cutoff must be a number between 0 and 1, got {c!r}") from None
        if not 0.0 < c < 1.0:
            raise ParameterError(f"cutoff must be between 0 and 1, got {c}")
        if c in out:
            raise ParameterError(f"cutoff {c} is given twice")
        out.append(c)
    return out


def _mask_count(mask: xr.DataArray) -> int:
    """Voxels with mask > 0.5 (computes a small reduction)."""
    cnt = (mask.data > 0.5).sum()
    return int(cnt.compute() if isinstance(cnt, da.Array) else cnt)


def _nyquist_resolution(vs: Sequence[float]) -> float:
    return 2.0 * max(vs)


def global_fsc_resolution(half1: xr.DataArray, half2: xr.DataArray, *, cutoff: float = 0.143,
                          strategy: str = "auto") -> float:
    """Unmasked global FSC resolution (Å) of two half maps at ``cutoff`` (computes).

    Shells and first-crossing rule of :mod:`chunkem.kernels.fsc`.
    """
    from ..kernels.fsc import resolution_crossing

    s1 = spectral.rfft(half1, strategy=strategy)
    s2 = spectral.rfft(half2, strategy=strategy)
    sums = spectral.shell_sums(s1, s2, progress=False)
    vs = voxel_size(half1)
    box_edge = float(min(n * v for n, v in zip(half1.shape, vs)))
    c = resolution_crossing(sums.fsc(), box_edge=box_edge, threshold=cutoff, nyquist=_nyquist_resolution(vs))
    return float(min(c.resolution_interp, box_edge))


def default_window(global_resolution: float, voxel_size: Sequence[float], shape: Sequence[int]) -> float:
    """Default local FSC window (Å): ``WINDOW_FACTOR`` × the global resolution.

    At least 8 voxels and at most the shortest box edge.
    """
    vmax = max(voxel_size)
    lo = 8 * vmax
    hi = min(n * v for n, v in zip(shape, voxel_size))
    return float(min(max(WINDOW_FACTOR * global_resolution, lo), hi))


def _window_box(window: float, vs: Sequence[float], shape: Sequence[int]) -> tuple[int, int, int]:
    if not (isinstance(window, (int, float)) and math.isfinite(window) and window > 0):
        raise ParameterError(f"window must be a positive length in Å, got {window!r}")
    box = tuple(int(round(window / v)) for v in vs)
    if min(box) < 3:
        raise ParameterError(
            f"window {window:g} Å is {min(box)} voxel(s) along an axis (voxel size {tuple(vs)} Å); "
            "it must span at least 3 voxels"
        )
    for b, n, ax in zip(box, shape, "zyx"):
        if b > n:
            raise ParameterError(
                f"window {window:g} Å ({b} voxels along {ax}) is larger than the box ({n} voxels along {ax})"
            )
    return box  # type: ignore[return-value]


def _check_range(best: float, worst: float, vs) -> None:
    if not (math.isfinite(best) and best > 0):
        raise ParameterError(f"best (finest reported resolution) must be a positive length in Å, got {best}")
    if best < _nyquist_resolution(vs) - 1e-9:
        raise ParameterError(f"best={best:g} Å is finer than Nyquist ({_nyquist_resolution(vs):g} Å)")
    if not worst > best:
        raise ParameterError(f"worst ({worst:g} Å) must be coarser than best ({best:g} Å)")


def _work_chunks(vol: xr.DataArray):
    """Chunks of the internal stages: the ``chunkem.chunks`` setting (not the input's), None for numpy."""
    from ..engine.chunks import auto_chunks

    if not isinstance(vol.data, da.Array):
        return None
    return auto_chunks(vol.shape)


def _rechunk(vol: xr.DataArray | None, chunks) -> xr.DataArray | None:
    if vol is None or chunks is None or not isinstance(vol.data, da.Array):
        return vol
    return like(vol, vol.data.rechunk(chunks), name=vol.name)


# kernels adapters (module level: picklable for distributed workers)


def _exact_block(h1, h2, *rest, has_mask, **kw):
    mask = rest[0] if has_mask else None
    return K.local_fsc_exact(h1, h2, mask, **kw)


def _mono_init_block(*blocks, has_mask):
    return K.monores_state_init(blocks[0] if has_mask else None, blocks[0].shape)


def _mono_final_block(state, *rest, has_mask, resolutions):
    return K.monores_state_resolution(state, rest[0] if has_mask else None, resolutions=resolutions)


def _interp_block(values, *rest, has_mask, **kw):
    return K.interpolate_grid(values, rest[0] if has_mask else None, **kw)


def _amp_block(g, r1, r2, r3):
    return KS.local_amplitude(g, r1, r2, r3)


def _post_block(raw, *rest, has_mask, **kw):
    return K.monores_postprocess(raw, rest[0] if has_mask else None, **kw)


def _input_chunks(vol: xr.DataArray):
    return vol.data.chunks if isinstance(vol.data, da.Array) else None


def _fill_outside(res: xr.DataArray, mask: xr.DataArray | None, fill: float, chunks=None) -> xr.DataArray:
    if chunks is not None and isinstance(res.data, da.Array):
        res = like(res, res.data.rechunk(chunks), name=res.name)
        if mask is not None:
            mask = _rechunk(mask, chunks)
    data = res.data
    bad = data != data  # NaN
    if mask is not None:
        bad = bad | (mask.data <= 0.5)
    if isinstance(data, da.Array) or isinstance(bad, da.Array):
        out = da.where(bad, np.float32(fill), data)
    else:
        out = np.where(bad, np.float32(fill), data)
    return like(res, out, name="local_resolution")


# --------------------------------------------------------------------------- local FSC


def _state_init_block(*blocks, has_mask):
    return K.crossing_state_init(blocks[0] if has_mask else None, blocks[0].shape)


def _band_fsc_block(h1, h2, state, *, offset, voxel_size, origin, map_shape, box, **kw):
    """One band's local FSC on a block where ``state`` is active; zeros beyond the true map edge ("none" halos)."""
    pads = []
    for ax in range(3):
        g0 = int(round((offset[ax] - origin[ax]) / voxel_size[ax]))
        half = int(box[ax]) // 2
        pads.append((half if g0 == 0 else 0, half if g0 + h1.shape[ax] == map_shape[ax] else 0))
    return K.local_fsc_band_fsc(h1, h2, state, box=box, edge_pad=pads, **kw)


#: Local FSC ``faces``: what lies beyond the map's faces.
_FACES = ("auto", "mirror", "periodic")
#: ``faces="auto"`` mirrors an axis whose face slabs' half maps correlate above this (shared signal): cut
#: density 0.38-0.97 (a phantom cropped through its molecule, the NPC sub-tomogram averages), solvent faces of
#: centred phantoms <= 0.015, independent noise 0.001.
FACE_SIGNAL = 0.05


def _face_correlation(h1: xr.DataArray, h2: xr.DataArray, *, thickness: Sequence[int]) -> list[float]:
    """Per axis, the correlation of the two half maps over the slabs (``thickness`` voxels) at both faces of that
    axis: the shared signal the box's wrap-around would join to the opposite face (0 where a slab is flat).
    Computes the face slabs only: one small REDUCE of :func:`~chunkem.kernels.render.cc_sums`."""
    sums = []
    for ax, t in enumerate(thickness):
        t = max(1, min(int(t), h1.shape[ax] // 2))
        for part in (slice(0, t), slice(h1.shape[ax] - t, None)):
            sl = (slice(None),) * ax + (part,)
            sums.append(_summed(cc_sums, h1.data[sl], h2.data[sl], size=6))
    if any(isinstance(v, da.Array) for v in sums):
        import dask

        sums = list(dask.compute(*sums))
    out = []
    for lo, hi in zip(sums[0::2], sums[1::2]):
        r = cc_from_sums(np.asarray(lo) + np.asarray(hi))
        out.append(r if math.isfinite(r) else 0.0)
    return out


def _face_widths(box: Sequence[int], shape: Sequence[int], mirrored: Sequence[bool],
                 step: int = 1) -> list[tuple[int, int]]:
    """Voxels by which local FSC extends the map beyond each face of the ``mirrored`` axes (none elsewhere): half
    a window and ``max(2, step)`` more on the low side (every window of a voxel of the map, or of a grid point
    the exact mode interpolates from, lies in the extended map, clear of its own wrap-around), at least that on
    the high side, up to an FFT-friendly length."""
    return fft_widths([int(b) // 2 + max(2, int(step)) if m else 0 for b, m in zip(box, mirrored)], shape)


def _ones_like(data):
    if isinstance(data, da.Array):
        return da.ones(data.shape, chunks=data.chunks, dtype=np.float32)
    return np.ones(data.shape, dtype=np.float32)


def _band_map(spec, gate, *, lim, centre, sigma, chunks) -> xr.DataArray:
    """A half map band-passed around ``centre`` (from the window ``|k| <= lim``), computed after ``gate``."""
    return spectral.irfft(spectral.apply(K.band_pass, spectral.after(spectral.window(spec, lim), gate), centre=centre,
                                         sigma=sigma), chunks=chunks)


def _localfsc_fast(h1, h2, mask, *, box, vs, cutoffs, best, worst, pad, strategy, spacing, sigma):
    """Fast local FSC maps, one per cutoff (all from the same bands), and the band frequencies."""
    nyq = 1.0 / _nyquist_resolution(vs)
    centres = np.arange(1, int(math.floor(nyq / spacing + 1e-9)) + 1) * spacing
    if centres.size == 0:
        raise ParameterError(f"window too small: no Fourier shell between 0 and Nyquist ({nyq:.3g} 1/Å)")
    reach = tuple((b // 2) * v for b, v in zip(box, vs))
    s1 = spectral.rfft(h1, strategy=strategy)
    s2 = spectral.rfft(h2, strategy=strategy)
    chunks = _work_chunks(h1)
    start = _rechunk(mask if mask is not None else h1, chunks)
    org = tuple(float(o) for o in h1.attrs["origin"])
    shape = tuple(int(n) for n in h1.shape)
    state0 = run_local(_state_init_block, start, reach=0.0, has_mask=mask is not None, name="crossing_state")
    states = [state0] * len(cutoffs)
    lowest = int(np.argmin(cutoffs))  # its active voxels include those of every other cutoff
    f_prev = 0.0
    gate = None
    for j, c in enumerate(centres):
        # the band is zero (< 1e-3 in amplitude) beyond `lim`: band-pass the window |k_axis| <= lim only, and
        # invert it with transforms pruned to the lines it touches. The band's spectra wait for the previous
        # band's state (`gate`), so that at most one band's maps are in memory (not all bands' inverse FFTs
        # at once on an idle thread); the second half's inverse waits for the first's (each uses every core).
        lim = K.band_limit(centre=float(c), sigma=sigma)
        b1 = _band_map(s1, gate, lim=lim, centre=float(c), sigma=sigma, chunks=chunks)
        b2 = _band_map(s2, spectral.done(b1.data) if isinstance(b1.data, da.Array) else None, lim=lim, centre=float(c), sigma=sigma, chunks=chunks)
        # windowed sums with a zero halo (the window is truncated at the true map edge) where the lowest
        # cutoff's crossing is still open (blocks whose voxels have all crossed skip the band), folded into
        # each cutoff's running first crossing
        fsc = run_local(_band_fsc_block, b1, b2, states[lowest], reach=reach, with_offset=True, box=box,
                        origin=org, map_shape=shape, name=f"local_fsc_{c:.4f}")
        states = [run_local(K.crossing_step, st, fsc, reach=0.0, f_prev=f_prev, f_cur=float(c), first=j == 0,
                            cutoff=co, name="crossing_state") for st, co in zip(states, cutoffs)]
        f_prev = float(c)
        if isinstance(states[lowest].data, da.Array):
            gate = spectral.done(*[st.data for st in states])  # every cutoff's state: none lags behind
    res = [run_local(K.crossing_state_resolution, st, reach=0.0, f_last=float(centres[-1]), best=best, worst=worst,
                     name="local_resolution") for st in states]
    return res, [float(c) for c in centres]


def _localfsc_exact(h1, h2, mask, *, box, vs, cutoffs, best, worst, pad, step, grid_origin):
    """Exact local FSC maps, one per cutoff (each voxel's curve computed once, crossed at every cutoff), and
    the shell frequencies. With ``step`` the computed voxels are those on the grid ``index % step == 0``
    counted from ``grid_origin`` (Å: the input map's first voxel)."""
    reach = tuple((b // 2) * v for b, v in zip(box, vs))
    vols = [_rechunk(v, _work_chunks(h1)) for v in [h1, h2] + ([mask] if mask is not None else [])]
    kw: dict[str, Any] = dict(box=box, voxel_size=vs, cutoff=tuple(cutoffs), best=best, worst=worst, pad=pad)
    stepped = step is not None and max(step) > 1
    if stepped:
        org = tuple(float(o) for o in grid_origin)
        kw.update(step=step, origin=org)
        grids = run_local(_exact_block, *vols, reach=reach, boundary="periodic", with_offset=True,
                          has_mask=mask is not None, name="local_resolution", outputs=len(cutoffs), **kw)
        res = [run_local(_interp_block, *([g] + ([mask] if mask is not None else [])),
                         reach=tuple(s * v for s, v in zip(step, vs)), with_offset=True, has_mask=mask is not None,
                         step=step, origin=org, name="local_resolution") for g in grids]
    else:
        res = run_local(_exact_block, *vols, reach=reach, boundary="periodic", has_mask=mask is not None,
                        name="local_resolution", outputs=len(cutoffs), **kw)
    fshape = tuple(b * (pad + 1) for b in box)
    freqs = K.shell_layout(fshape, vs).frequency[1:].tolist()
    return res, freqs


# --------------------------------------------------------------------------- MonoRes


def _quantile_np(values: np.ndarray, select: np.ndarray | None, q: float) -> np.float64:
    v = np.asarray(values, dtype=np.float64)
    if select is not None:
        v = v[np.asarray(select, dtype=bool)]
    if v.size == 0:
        raise DataValueError("MonoRes: the noise region is empty (no voxel outside the mask inside the box sphere)")
    return np.float64(np.quantile(v, q))


def _quantile_block(values, select=None, *, q):
    return np.asarray(_quantile_np(values, select, q))


#: MonoRes: fewer analysed voxels than this fraction passing any step is worth a warning (they take the median).
_MIN_ASSIGNED = 0.5


class _VectorBlock:
    """Picklable: ``func`` of one block (or of aligned blocks) as a vector, on a 4-D block for summing."""

    def __init__(self, func, kw):
        self.func, self.kw = func, kw

    def __call__(self, *blocks):
        return np.asarray(self.func(*blocks, **self.kw))[None, None, None, :]


def _summed(func, *arrays, size: int, dtype=np.float64, **kw):
    """``Σ func(*blocks, **kw)`` over the blocks of aligned 3-D arrays, ``func`` giving a vector of ``size``
    additive sums (counts, moments): a chunk-invariant REDUCE, nothing gathered. A lazy 1-d array when any array
    is lazy (aligned to the first lazy one's chunks), else the vector of the whole arrays."""
    if not any(isinstance(a, da.Array) for a in arrays):
        return np.asarray(func(*arrays, **kw))
    ref = next(a for a in arrays if isinstance(a, da.Array))
    arrs = [a.rechunk(ref.chunks) if isinstance(a, da.Array) else da.from_array(np.asarray(a), chunks=ref.chunks)
            for a in arrays]
    per = da.map_blocks(_VectorBlock(func, kw), *arrs, new_axis=3, dtype=dtype,
                        chunks=tuple((1,) * nb for nb in ref.numblocks) + ((int(size),),))
    return per.sum(axis=(0, 1, 2))


def _median_of_counts(counts, *, resolutions):
    """Median resolution (Å) of the voxels that passed a step, from summed :func:`K.monores_state_counts`;
    warns when fewer than half of the analysed voxels passed any step."""
    counts = np.asarray(counts)
    passed, n_in = counts[:-1], int(counts[-1])
    n_pass = int(passed.sum())
    if n_pass == 0:
        raise DataValueError("MonoRes: no voxel passed any resolution step (no signal above the noise threshold)")
    med = np.float64(K.median_from_counts(resolutions, passed))
    if n_pass < _MIN_ASSIGNED * n_in:
        warnings.warn(
            f"MonoRes: only {100 * n_pass / n_in:.1f} % of the {n_in} voxels analysed passed any resolution step "
            f"(from {resolutions[0]:g} Å on, their signal stayed below the noise threshold); the others take the "
            f"median, {med:.2f} Å. Check the mask and the noise (with one map the voxels outside the mask must be "
            "noise only), or raise max_resolution", stacklevel=2)
    return np.asarray(med)


def _state_median(state, *, resolutions):
    """The MonoRes median (:func:`_median_of_counts`) of a folded state: per-block step counts summed (a
    chunk-invariant REDUCE of ``len(resolutions) + 1`` integers per block, nothing gathered); a lazy 0-d
    array when the state is lazy, else its value."""
    n = len(resolutions)
    total = _summed(K.monores_state_counts, state, size=n + 1, dtype=np.int64, n_steps=n)
    if not isinstance(total, da.Array):
        return _median_of_counts(total, resolutions=resolutions)
    return da.map_blocks(_median_of_counts, total, drop_axis=[0], dtype=np.float64,
                         meta=np.empty((), np.float64), resolutions=resolutions)


def _gather_reduce(func, *arrays, **kw):
    """0-d dask array: ``func`` of the arrays gathered into one chunk each (a REDUCE with an exact answer)."""
    one = [a.rechunk(a.shape) for a in arrays]
    return da.map_blocks(func, *one, drop_axis=[0, 1, 2], dtype=np.float64, meta=np.empty((), np.float64), **kw)


#: Voxels in the strided sample that a MonoRes REDUCE (noise quantile, noise sphere) gathers into one task.
_MAX_SAMPLES = 4_000_000


def _sample_stride(shape: Sequence[int]) -> int:
    """Stride of a sample of at most ``_MAX_SAMPLES`` voxels of a map of ``shape``."""
    return max(1, int(math.ceil((int(np.prod(shape)) / _MAX_SAMPLES) ** (1 / 3))))


def _reduce_sample(func, *arrays, stride: int, **kw):
    """``func(*samples, **kw)`` of the arrays sampled every ``stride`` voxels, gathered into one task (a
    chunk-invariant REDUCE): a lazy 0-d array when any array is lazy, else its value."""
    sl = (slice(None, None, stride),) * 3
    parts = [a[sl] for a in arrays]
    if any(isinstance(p, da.Array) for p in parts):
        return _gather_reduce(func, *[da.asarray(p) for p in parts], **kw)
    return func(*parts, **kw)[()]


def _lazy_quantile(vol: xr.DataArray, select, q: float):
    """q-quantile of vol over ``select`` (bool array or None) on a strided sample (chunk-invariant)."""
    arrays = [vol.data] + ([select] if select is not None else [])
    return _reduce_sample(_quantile_block, *arrays, stride=_sample_stride(vol.shape), q=q)


def _sphere_select(shape, lazy_like, radius=None) -> Any:
    """Voxels within ``radius`` voxels (default N/2) of the array centre (index N//2), 00_conventions §3.

    ``radius`` may be a 0-d dask array (computed with the selection).
    """
    r = min(shape) / 2.0 if radius is None else radius
    if isinstance(lazy_like, da.Array):
        ax = [(da.arange(n, chunks=(c,)) - n // 2) ** 2 for n, c in zip(shape, lazy_like.chunks)]
    else:
        ax = [(np.arange(n) - n // 2) ** 2 for n in shape]
    return (ax[0][:, None, None] + ax[1][None, :, None] + ax[2][None, None, :]) <= r * r


#: One map: its noise (outside the mask) must not be flatter than this fraction of its spread inside the mask.
_FLAT_NOISE = 1e-3
#: ... and a noise variance falling more than this from the inner to the outer third of the noise shells is
#: a soft-masked map (a deposited map: 162; unmasked phantom 0.9, a phantom in a soft mask 4.7, betaGal 2.7).
_NOISE_FALLOFF = 10.0


def _noise_radius_np(sample, mask, other, *, stride, shape, label, halves) -> np.float64:
    """Radius (voxels) of the sphere that holds the noise (Xmipp's cliff of ``sample``), after checking the noise.

    One map: the noise is ``sample`` outside ``other`` (the grown mask); half
    maps: ``sample`` is their mean and ``other`` their half difference, the
    noise everywhere in the sphere. ``mask`` None: no protein radius (no cliff).
    """
    v = np.asarray(sample, dtype=np.float64)
    inside_mask = np.ones(v.shape, bool) if mask is None else np.asarray(mask) > 0.5
    radius = K.monores_noise_radius(v, inside_mask, stride=stride, shape=shape)
    sphere = K.sample_radius(v.shape, stride=stride, shape=shape) <= radius
    if halves:
        nv, nsel, what = np.asarray(other, dtype=np.float64), sphere, "MonoRes with half maps"
    else:
        nv, nsel, what = v, sphere & (np.asarray(other) <= 0.5), "MonoRes with one map"
    noise, signal = nv[nsel], v[inside_mask]
    if noise.size == 0:
        where = "inside the box sphere" if halves else "outside the mask inside the box sphere"
        raise DataValueError(f"{what} ({label}): no voxel {where} (radius {radius:.0f} voxels) to take the noise "
                             "from; give half maps or a tighter mask")
    if signal.size and noise.std() <= _FLAT_NOISE * signal.std():
        if halves:
            raise DataValueError(
                f"{what} ({label}): the two half maps are the same (the standard deviation of their difference is "
                f"{noise.std():.3g}, of their mean {signal.std():.3g}): give two independent half maps")
        raise DataValueError(
            f"{what} ({label}): the map is flat outside the mask (standard deviation "
            f"{noise.std():.3g} there, {signal.std():.3g} inside): it looks masked, so there is no noise to compare "
            "the signal with; give the two half maps or the unmasked map")
    fall, r0, r1 = K.noise_falloff(nv, nsel, stride=stride, shape=shape)
    if fall > _NOISE_FALLOFF:
        warnings.warn(
            f"{what} ({label}): the noise variance falls {fall:.0f}-fold from radius {r0:.0f} to {r1:.0f} voxels: "
            f"the map{'s look' if halves else ' looks'} multiplied by a soft mask, so the noise threshold is too low "
            "and the map reads too fine; give unmasked maps", stacklevel=2)
    return np.float64(radius)


def _noise_radius_block(sample, other, mask=None, **kw):
    return np.asarray(_noise_radius_np(sample, mask, other, **kw))


def _noise_radius(vol: xr.DataArray, mask: xr.DataArray | None, other: xr.DataArray, *, halves: bool,
                  label: str | None = None):
    """Radius (voxels) of the sphere that holds the noise (Xmipp's cliff), from a strided sample (see
    :func:`_noise_radius_np`)."""
    shape = tuple(int(n) for n in vol.shape)
    stride = _sample_stride(shape)
    arrays = [vol.data, other.data] + ([mask.data] if mask is not None else [])
    block = partial(_noise_radius_block, stride=stride, shape=shape, label=label or vol.name or "map", halves=halves)
    return _reduce_sample(block, *arrays, stride=stride)


def _monogenic(spec, gate, *, cut, width, kind, smooth_cut, smooth_width, chunks, strategy):
    """Smoothed monogenic amplitude of one step (lazy); its spectra wait for ``gate`` (orders the steps).

    A band filter is zero beyond ``cut + width``: its four inverse FFTs run
    on that spectrum window (pruned transforms); the amplitude's smoothing
    low-pass runs on the window of its own support. The three Riesz
    components share ``FH / |k|`` (float32 kernels of
    :mod:`chunkem.kernels.spiral`).
    """
    g = spectral.after(spec, gate)
    if kind == "band":
        g = spectral.window(g, cut + width)
    fh = spectral.apply(K.monogenic_band, g, cut=cut, width=width, kind=kind)
    base = spectral.apply(KS.riesz_base, fh)
    comps = [spectral.irfft(fh, chunks=chunks)] + [
        spectral.irfft(spectral.apply(KS.riesz_component, base, component=c), chunks=chunks) for c in "zyx"]
    amp = run_local(_amp_block, *comps, reach=0.0, name="monogenic_amplitude")
    return spectral.fourier_filter(amp, K.lowpass_kernel, strategy=strategy, cut=smooth_cut, width=smooth_width,
                                   support=smooth_cut + smooth_width)


def _dilate_block(mask, *, radius, voxel_size):
    """Mask > 0.5 grown by a ball of ``radius`` Å (as float32 0/1)."""
    from scipy import ndimage

    r = [int(math.floor(radius / v)) for v in voxel_size]
    z, y, x = np.ogrid[-r[0]:r[0] + 1, -r[1]:r[1] + 1, -r[2]:r[2] + 1]
    ball = (z * voxel_size[0]) ** 2 + (y * voxel_size[1]) ** 2 + (x * voxel_size[2]) ** 2 <= radius**2
    return ndimage.binary_dilation(np.asarray(mask) > 0.5, structure=ball).astype(np.float32)


def _monores(h1, h2, mask, *, vs, best, max_resolution, resolution_step, significance, kind, smoothing,
             band_width, strategy, noise_margin):
    shape = tuple(int(n) for n in h1.shape)
    L = float(min(n * v for n, v in zip(shape, vs)))
    # resolutions: coarse -> fine, one per Fourier shell
    ds: list[float] = []
    seen = set()
    d = float(max_resolution)
    while d >= best - 1e-9:
        i = int(round(L / d))
        if i not in seen:
            seen.add(i)
            ds.append(round(d, 6))
        d -= resolution_step
    if len(ds) > K.MAX_MONORES_STEPS:
        raise ParameterError(f"MonoRes: {len(ds)} resolution steps; at most {K.MAX_MONORES_STEPS} (raise "
                             f"resolution_step)")
    if len(ds) < 2:
        raise ParameterError(
            f"max_resolution {max_resolution:g} Å and best {best:g} Å leave fewer than 2 steps to scan"
        )
    lazy = _is_lazy(h1, h2, mask)
    chunks = _work_chunks(h1)
    h1, h2, mask = (_rechunk(v, chunks) for v in (h1, h2, mask))
    if h2 is not None:
        sig = like(h1, (h1.data + h2.data) * np.float32(0.5), name="mean")
        noi = like(h1, (h1.data - h2.data) * np.float32(0.5), name="noise")
        spec_s = spectral.rfft(sig, strategy=strategy)
        spec_n = spectral.rfft(noi, strategy=strategy)
        # noise: the half difference inside the centred sphere, or inside the sphere where masked half maps fall
        # flat (Xmipp's cliff)
        noise_select = _sphere_select(shape, h1.data if lazy else None,
                                      radius=_noise_radius(sig, mask, noi, halves=True, label=h1.name))
    else:
        spec_s = spectral.rfft(h1, strategy=strategy)
        spec_n = None
        # noise: outside the mask grown by `noise_margin` Å (no signal tails), inside the centred sphere, or
        # inside the sphere where a masked map falls flat (Xmipp's cliff)
        grown = run_local(_dilate_block, mask, reach=noise_margin, radius=noise_margin, voxel_size=vs,
                          name="grown_mask")
        sphere = _sphere_select(shape, h1.data if lazy else None, radius=_noise_radius(h1, mask, grown, halves=False))
        noise_select = sphere & (grown.data <= 0.5)
    amin = min(vs)
    edge = 0.02 / amin  # Xmipp's raised-cosine edge: 0.02 cycles/voxel
    # the steps are folded one by one into a running state (last passed step, consecutive failures);
    # a step's spectra wait for the previous step's state and the noise map's for the signal's, so one step's
    # maps are in memory at a time
    start = mask if mask is not None else h1
    state = run_local(_mono_init_block, start, reach=0.0, has_mask=mask is not None, name="monores_state")
    gate = None
    for k, d in enumerate(ds):
        f = 1.0 / d
        width = band_width * f if kind == "band" else edge
        kw = dict(cut=f, width=width, kind=kind, smooth_cut=f / smoothing, smooth_width=edge, chunks=chunks,
                  strategy=strategy)
        amp = _monogenic(spec_s, gate, **kw)
        if spec_n is not None:
            amp_n = _monogenic(spec_n, spectral.done(amp.data) if isinstance(amp.data, da.Array) else None, **kw)
            thr = _lazy_quantile(amp_n, noise_select, significance)
        else:
            thr = _lazy_quantile(amp, noise_select, significance)
        thr32 = thr.astype(np.float32) if isinstance(thr, da.Array) else np.float32(thr)  # float32 ratio maps
        ratio = like(h1, amp.data / thr32, name=f"ratio_{d:.3f}")
        state = run_local(K.monores_step, state, ratio, reach=0.0, step=k, name="monores_state")
        if isinstance(state.data, da.Array):
            gate = spectral.done(state.data)
    vols = [state] + ([mask] if mask is not None else [])
    raw = run_local(_mono_final_block, *vols, reach=0.0, has_mask=mask is not None, resolutions=tuple(ds),
                    name="local_resolution")
    # unassigned voxels and the outside (NaN in `raw`) take the median of the assigned ones
    rdata = raw.data
    assigned = rdata == rdata
    med = _state_median(state.data, resolutions=tuple(ds))
    if isinstance(rdata, da.Array):
        filled = da.where(assigned, rdata, med.astype(np.float32))
    else:
        filled = np.where(assigned, rdata, np.float32(med))
    filled_v = like(h1, filled, name="local_resolution")
    pvols = [filled_v] + ([mask] if mask is not None else [])
    sigma_vox = 3.0
    res = run_local(_post_block, *pvols, reach=tuple(3 * sigma_vox * v for v in vs), has_mask=mask is not None,
                    sigma=sigma_vox, best=best, name="local_resolution")
    return res, ds


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu threshold of a sample (maximises the between-class variance)."""
    hist, edges = np.histogram(values, bins=bins)
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mt = m0[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        between = (mt * w0 - m0 * w0[-1]) ** 2 / (w0 * w1)
    between = np.nan_to_num(between[:-1], nan=-1.0)
    return float(edges[1:][:-1][int(np.argmax(between))]) if between.size else float(np.median(values))


def _auto_mask(vol: xr.DataArray) -> xr.DataArray:
    """Automatic mask: the map smoothed by a Gaussian (σ = 2 voxels) above its Otsu threshold, dilated by 2 voxels.

    The threshold is computed (a strided sample of the smoothed map); the mask
    itself stays lazy.
    """
    from scipy import ndimage

    vs = voxel_size(vol)
    sm = run_local(ndimage.gaussian_filter, vol, reach=tuple(8 * v for v in vs), sigma=2.0, mode="reflect",
                   truncate=4.0, name="smoothed")
    n = int(np.prod(vol.shape))
    stride = max(1, int(math.ceil((n / 2_000_000) ** (1 / 3))))
    sample = sm.data[::stride, ::stride, ::stride]
    sample = np.asarray(sample.compute() if isinstance(sample, da.Array) else sample, dtype=np.float64)
    thr = _otsu(sample.ravel())
    binary = like(vol, (sm.data > thr).astype(np.float32), name="auto_mask")
    return run_local(ndimage.maximum_filter, binary, reach=tuple(2 * v for v in vs), size=5, mode="nearest",
                     name="auto_mask")


# --------------------------------------------------------------------------- public API


def local_resolution(
    half1: xr.DataArray,
    half2: xr.DataArray | None = None,
    *,
    method: str = "localfsc",
    mode: str = "fast",
    window: float | None = None,
    mask: xr.DataArray | None = None,
    cutoff: float | Sequence[float] = 0.143,
    step: int | None = None,
    best: float | None = None,
    worst: float | None = None,
    pad: int = 1,
    band_spacing: float | None = None,
    faces: str = "auto",
    max_resolution: float | None = None,
    resolution_step: float = 0.25,
    significance: float = 0.95,
    monores_filter: str = "band",
    smoothing: float = 2.0,
    noise_margin: float = 6.0,
    fill: float = 0.0,
    strategy: str = "auto",
) -> LocalResolutionResult:
    """Local resolution map (Å) of half maps (local FSC) or of one map (MonoRes).

    Parameters
    ----------
    half1, half2
        Half maps (aligned Volumes). ``half2`` is required for
        ``method="localfsc"``; optional for ``"monores"`` (then ``half1`` is
        the map and a mask is needed or made automatically).
    method
        ``"localfsc"`` (blocres-like) or ``"monores"`` (monogenic).
    mode
        Local FSC only: ``"fast"`` (band-wise, default) or ``"exact"``
        (one windowed FFT per voxel).
    window
        Local FSC window edge in Å (Hann taper). Default
        ``WINDOW_FACTOR`` (6) × the global unmasked FSC 0.143 resolution of
        the halves (computed: two FFTs and a shell reduction), at least 8
        voxels, at most the box. Must span ≥ 3 voxels and fit in the box.
    mask
        Soft mask in [0, 1]: only voxels with mask > 0.5 are estimated
        (others get ``fill``); MonoRes also takes its single-map noise from
        outside it. Default: every voxel (MonoRes with one map: automatic).
    cutoff
        FSC threshold (0.143; 0.5 for the more conservative blocres value),
        or several (blocres ``-cutoff 0.5,0.143``): the first gives
        ``.resolution``, the others ``.extra`` (see
        :meth:`LocalResolutionResult.at_cutoff`). The fast mode gets them all
        from the same bands at almost no extra cost; the exact mode computes
        each voxel's curve once and crosses it at every cutoff (NPC halves,
        0.143 and 0.5: 5.1 s, against 10.2 s as two runs).
    step
        Exact local FSC only: compute every ``step`` voxels (global grid) and
        fill the gaps by trilinear interpolation. The fast mode is per voxel
        at no extra cost and ignores it.
    best
        Finest reported resolution in Å (the data limit; default Nyquist,
        2 × the largest voxel size). Results are clamped to it.
    worst
        Coarsest reported resolution in Å (default: the window for local
        FSC, ``max_resolution`` for MonoRes).
    pad
        Local FSC window padding factor (FFT size ``window · (pad + 1)``,
        blocres default 1); sets the shells of both modes.
    band_spacing
        Fast mode: spacing of the band centres in 1/Å (default one shell
        of the window, ``1 / window``; ``1 / (window · (pad + 1))`` samples
        the exact mode's shells). The cost is proportional to the number
        of bands, ``Nyquist / band_spacing``.
    faces
        Local FSC, both modes: what lies beyond the map's faces.
        ``"mirror"``: the map mirrored (extended by half a window and a few
        voxels; costs the larger FFTs). ``"periodic"``: the box wrapped
        around, as its FFTs see it (density cut by one face meets the
        opposite face: a jump both halves share, read as fine resolution
        near those faces). ``"auto"`` (default): mirrored along each axis
        whose two face slabs (half a window thick) carry density, i.e.
        where the halves correlate at more than ``FACE_SIGNAL`` (0.05:
        cropped maps, sub-tomogram averages, tomograms), periodic where the
        faces are solvent (centred single-particle maps: nothing to pay).
    max_resolution
        MonoRes: coarsest resolution tested (Å; default
        ``min(box / 3, max(20 Å, 5 × Nyquist))``).
    resolution_step
        MonoRes: resolution step in Å (steps in the same Fourier shell are
        skipped).
    significance
        MonoRes: quantile of the noise amplitude used as threshold.
    monores_filter
        MonoRes: ``"band"`` (default, ``|s - f| < 0.2 f``) or ``"highpass"``
        (Xmipp).
    smoothing
        MonoRes: the amplitude is low-passed at ``f / smoothing``
        (Xmipp: 1).
    noise_margin
        MonoRes with one map: the noise voxels are those farther than this
        (Å) from the mask (Xmipp: 0), so that density tails just outside a
        tight mask do not raise the noise threshold.
    fill
        Value of voxels not estimated.
    strategy
        FFT strategy for :mod:`chunkem.engine.spectral`.

    Returns
    -------
    LocalResolutionResult
        ``.resolution`` is lazy for dask input. The default window, the
        mask check and ``faces="auto"`` (sums over the face slabs) compute
        small reductions; statistics compute on demand.

    Raises
    ------
    GeometryError
        Mismatched half maps / mask.
    ParameterError
        Unknown method/mode, window < 3 voxels or larger than the box,
        resolution limits out of range, missing half map.
    DataValueError
        Empty mask.

    Examples
    --------
    >>> from chunkem.phantoms import make_phantom
    >>> ph = make_phantom(box=37, n_residues=40, voxel_size=1.4, resolution=4.5, seed=3)
    >>> r = local_resolution(ph.half1, ph.half2, mask=ph.mask, window=14.0)
    >>> r.box, 3.0 < r.median < 4.5
    ((10, 10, 10), True)
    """
    if method not in _METHODS:
        raise ParameterError(f"method must be one of {', '.join(_METHODS)}, got {method!r}")
    if mode not in _MODES:
        raise ParameterError(f"mode must be one of {', '.join(_MODES)}, got {mode!r}")
    if method == "localfsc" and half2 is None:
        raise ParameterError("local FSC needs two half maps (half2 is missing); use method='monores' for one map")
    _check_inputs(half1, half2, mask)
    vs = voxel_size(half1)
    shape = tuple(int(n) for n in half1.shape)
    if mask is not None and _mask_count(mask) == 0:
        raise DataValueError(f"mask {mask.name or ''}: no voxel is above 0.5 (empty mask)".replace("  ", " "))
    cutoffs = _cutoffs(cutoff)
    if max(vs) / min(vs) > 1.01:
        warnings.warn(f"anisotropic voxels {vs} Å: windows are per-axis voxel counts, shells physical",
                      stacklevel=2)
    best = float(best) if best is not None else _nyquist_resolution(vs)

    if method == "localfsc":
        glob = None
        if window is None:
            glob = global_fsc_resolution(half1, half2, strategy=strategy)
            window = default_window(glob, vs, shape)
        window = float(window)
        box = _window_box(window, vs, shape)
        worst_v = float(worst) if worst is not None else window
        _check_range(best, worst_v, vs)
        if pad < 0 or int(pad) != pad:
            raise ParameterError(f"pad must be an integer >= 0, got {pad}")
        pad = int(pad)
        st = None
        if mode == "exact":
            if step is not None:
                if int(step) != step or step < 1:
                    raise ParameterError(f"step must be a positive integer (voxels), got {step}")
                if step > min(box) // 2:
                    raise ParameterError(f"step {step} voxels must not exceed half the window ({min(box) // 2})")
                st = (int(step),) * 3
        else:
            spacing = float(band_spacing) if band_spacing is not None else 1.0 / window
            if not spacing > 0:
                raise ParameterError(f"band_spacing must be positive (1/Å), got {band_spacing}")
        # both modes see the map mirrored beyond the faces that carry density (not wrapped around: a periodic
        # box joins density cut by one face to the opposite face, a jump both halves share, which reads as
        # fine resolution)
        if faces not in _FACES:
            raise ParameterError(f"faces must be one of {', '.join(_FACES)}, got {faces!r}")
        face_r = _face_correlation(half1, half2, thickness=[b // 2 for b in box]) if faces == "auto" else None
        mirrored = [faces == "mirror" or (face_r is not None and r > FACE_SIGNAL) for r in (face_r or [0.0] * 3)]
        ext = _face_widths(box, shape, mirrored, step=max(st) if st else 1)
        h1e, h2e = (extend(h, ext) for h in (half1, half2))
        me = mask  # the extension is outside the map: never estimated
        if any(mirrored):
            me = extend(mask if mask is not None else like(half1, _ones_like(half1.data), name="mask"), ext,
                        mode="constant", value=0.0)
        if mode == "exact":
            maps, freqs = _localfsc_exact(h1e, h2e, me, box=box, vs=vs, cutoffs=cutoffs, best=best, worst=worst_v,
                                          pad=pad, step=st, grid_origin=half1.attrs["origin"])
        else:
            maps, freqs = _localfsc_fast(h1e, h2e, me, box=box, vs=vs, cutoffs=cutoffs, best=best,
                                         worst=worst_v, pad=pad, strategy=strategy, spacing=spacing,
                                         sigma=K.effective_band_sigma(window))
        maps = [_fill_outside(crop(r, ext), mask, fill, chunks=_input_chunks(half1)) for r in maps]
        return LocalResolutionResult(
            resolution=maps[0], method=method, mode=mode, window=window, box=box, cutoff=cutoffs[0], best=best,
            worst=worst_v, frequencies=freqs, global_resolution=glob, mask=mask, fill=float(fill),
            params={"pad": pad, "step": step if mode == "exact" else None,
                    "band_sigma_per_A": K.effective_band_sigma(window) if mode == "fast" else None,
                    "faces": faces, "mirrored_axes": "".join(a for a, m in zip("zyx", mirrored) if m),
                    "face_correlation": [round(float(r), 4) for r in face_r] if face_r is not None else None,
                    "face_extension_voxels": [int(a) for a, _ in ext]},
            extra=dict(zip(cutoffs[1:], maps[1:])),
        )

    # MonoRes
    if monores_filter not in ("band", "highpass"):
        raise ParameterError(f"monores_filter must be 'band' or 'highpass', got {monores_filter!r}")
    if not 0.5 < significance < 1.0:
        raise ParameterError(f"significance must be between 0.5 and 1, got {significance}")
    if not resolution_step > 0:
        raise ParameterError(f"resolution_step must be positive (Å), got {resolution_step}")
    if not smoothing >= 1.0:
        raise ParameterError(f"smoothing must be >= 1, got {smoothing}")
    L = float(min(n * v for n, v in zip(shape, vs)))
    if max_resolution is None:
        max_resolution = min(L / 3.0, max(20.0, 5.0 * _nyquist_resolution(vs)))
    max_resolution = float(max_resolution)
    _check_range(best, max_resolution, vs)
    auto = False
    if half2 is None and mask is None:
        mask = _auto_mask(half1)
        auto = True
        if _mask_count(mask) == 0:
            raise DataValueError("MonoRes: the automatic mask is empty; give a mask")
    res, ds = _monores(half1, half2, mask, vs=vs, best=best, max_resolution=max_resolution,
                       resolution_step=float(resolution_step), significance=float(significance),
                       kind=monores_filter, smoothing=float(smoothing), band_width=0.2, strategy=strategy,
                       noise_margin=float(noise_margin))
    worst_v = float(worst) if worst is not None else max_resolution
    res = _clip(res, best, worst_v)
    res = _fill_outside(res, mask, fill, chunks=_input_chunks(half1))
    return LocalResolutionResult(
        resolution=res, method="monores", mode=None, window=None, box=None, cutoff=None, best=best, worst=worst_v,
        frequencies=ds, mask=mask, fill=float(fill),
        params={"significance": significance, "monores_filter": monores_filter, "smoothing": smoothing,
                "resolution_step_A": resolution_step, "max_resolution_A": max_resolution,
                "half_maps": half2 is not None, "auto_mask": auto},
    )


def _clip(res: xr.DataArray, lo: float, hi: float) -> xr.DataArray:
    data = res.data
    out = da.clip(data, lo, hi) if isinstance(data, da.Array) else np.clip(data, lo, hi)
    return like(res, out, name=res.name)


# --------------------------------------------------------------------------- local filtering


def local_filter(
    vol: xr.DataArray,
    *,
    locres: xr.DataArray,
    n_bands: int = 40,
    bfactor: float | xr.DataArray | None = None,
    strategy: str = "auto",
) -> xr.DataArray:
    """Low-pass each voxel at its own local resolution (band-wise blending), lazily.

    The map is split into ``n_bands`` Hann bands ``b_j`` (centres
    ``j · Δ``, ``Δ = s_Nyquist / (n_bands - 1)``, summing to one at every
    frequency; one FFT, one inverse FFT per band through
    :mod:`chunkem.engine.spectral`). Each band is weighted per voxel by
    ``g_j(v)``, a linear ramp in frequency that is 1 below ``1/d(v) - Δ/2``
    and 0 above ``1/d(v) + Δ/2`` (``d`` = ``locres``), times the B factor,
    and the weighted bands are summed. At a voxel the result equals the
    global filter with profile ``Σ_j b_j(s) g_j`` evaluated there.

    Parameters
    ----------
    vol
        Map to filter.
    locres
        Local resolution map in Å on the same grid (e.g.
        ``local_resolution(...).resolution``); voxels with 0, negative or
        NaN values are set to 0 in the output.
    n_bands
        Number of bands from 0 to Nyquist (≥ 4). More bands follow each
        voxel's cutoff more sharply (the ramp is one band spacing wide).
    bfactor
        Optional B in Å² (one number, or a Volume of local B), **RELION
        sign**: band amplitudes are multiplied by ``exp(-B s²/4)``, so
        B < 0 sharpens (e.g. ``-50``) and B > 0 blurs.
    strategy
        FFT strategy.

    Returns
    -------
    xarray.DataArray
        Filtered Volume with ``vol``'s geometry; lazy for dask input.
    """
    validate_volume(vol, source="map")
    validate_volume(locres, source="locres")
    vols = [vol, locres]
    names = ["map", "locres"]
    bmap = None
    if isinstance(bfactor, xr.DataArray):
        validate_volume(bfactor, source="bfactor")
        bmap = bfactor
        vols.append(bmap)
        names.append("bfactor")
        bval = None
    elif bfactor is not None:
        bval = float(bfactor)
        if not math.isfinite(bval):
            raise ParameterError(f"bfactor must be finite (Å²), got {bfactor}")
    else:
        bval = None
    check_aligned(*vols, names=names)
    if int(n_bands) != n_bands or n_bands < 4:
        raise ParameterError(f"n_bands must be an integer >= 4, got {n_bands}")
    vs = voxel_size(vol)
    nyq = 1.0 / _nyquist_resolution(vs)
    spacing = nyq / (int(n_bands) - 1)
    spec = spectral.rfft(vol, strategy=strategy)
    chunks = vol.data.chunks if isinstance(vol.data, da.Array) else None
    total = None
    for j in range(int(n_bands)):
        c = j * spacing
        band = spectral.irfft(spectral.apply(_hann_band_kernel, spec, centre=c, spacing=spacing), chunks=chunks)
        bv = [band, locres] + ([bmap] if bmap is not None else [])
        term = run_local(_blend_block, *bv, reach=0.0, centre=c, spacing=spacing, bfactor=bval,
                         has_bmap=bmap is not None, name="locally_filtered")
        total = term.data if total is None else total + term.data
    return like(vol, total, name=f"{vol.name or 'map'}_locfilt")


def _hann_band_kernel(F, *, kz, ky, kx, centre, spacing):
    s = np.sqrt(kz**2 + ky**2 + kx**2)
    return (F * K.hann_band(s, centre=centre, spacing=spacing)).astype(np.complex64)


def _blend_block(band, locres, *rest, has_bmap, **kw):
    return K.blend_band(band, locres, rest[0] if has_bmap else None, **kw)


# --------------------------------------------------------------------------- demo


def demo_stage(ctx: dict[str, Any]) -> dict[str, Any]:
    """Demo: fast local FSC of the phantom's half maps vs its known local resolution.

    Writes ``locres.mrc`` (resolution map, FSC 0.143), ``locres.png`` and
    returns the median and the RMSE / bias / correlation against the
    phantom's ``local_resolution`` inside the mask (the truth is defined at
    FSC 0.143), and the median at the blocres-style 0.5 cutoff from the same
    bands (coarser).
    """
    import time

    from ..engine.cluster import compute
    from ..io import save

    t0 = time.perf_counter()
    ph = ctx["phantom"]
    h1, h2, mask = ctx["half1"], ctx["half2"], ctx["mask"]
    r = local_resolution(h1, h2, mask=mask, method="localfsc", mode="fast", cutoff=(0.143, 0.5))
    res, res05, m, truth = compute(r.resolution.data, r.extra[0.5].data, mask.data,
                                   np.asarray(ph.local_resolution.values), label="local resolution")
    inside = np.asarray(m) > 0.5
    est = np.asarray(res, dtype=np.float64)[inside]
    tru = np.asarray(truth, dtype=np.float64)[inside]
    err = est - tru
    resv = like(r.resolution, np.asarray(res, dtype=np.float32), name="local_resolution")
    out = Path(ctx["outdir"])
    save(resv, out / "locres.mrc", progress=False)
    done = LocalResolutionResult(resolution=resv, method=r.method, mode=r.mode, window=r.window, box=r.box,
                                 cutoff=r.cutoff, best=r.best, worst=r.worst, frequencies=r.frequencies,
                                 global_resolution=r.global_resolution,
                                 mask=like(mask, np.asarray(m, dtype=np.float32)), fill=r.fill)
    done.plot(out / "locres.png", title="demo phantom: local FSC (fast)")
    return {
        "window_A": round(float(r.window or 0), 2),
        "median_A": round(float(np.median(est)), 3),
        "truth_median_A": round(float(np.median(tru)), 3),
        "median_fsc05_A": round(float(np.median(np.asarray(res05, dtype=np.float64)[inside])), 3),
        "rmse_A": round(float(np.sqrt(np.mean(err**2))), 3),
        "bias_A": round(float(np.mean(err)), 3),
        "corr": round(float(np.corrcoef(est, tru)[0, 1]), 3) if est.size > 2 else None,
        "seconds": round(time.perf_counter() - t0, 2),
    }
