"""Kernels of local resolution: local FSC (exact and band-wise fast) and MonoRes.

Pure numpy/scipy functions on in-memory blocks (no dask); the op
:mod:`chunkem.ops.locres` runs them through the engine.

Local FSC, exact (blocres semantics)
------------------------------------
For a voxel ``v`` the two half maps are cut to a cube of ``box`` voxels
starting at ``v - box // 2`` (even boxes centre at index ``box / 2``), each
cube is tapered around its own average with the separable Hann window
``w(i) = 0.5 (1 - cos(2 pi i / (n - 1)))``, zero-padded to ``box (pad + 1)``
(padding with the average as Bsoft does only changes the DC term, which is
not used) and the FSC is taken over the shells of the padded cube
(``i = round(|s| L)``, ``L = min_axis P_axis a_axis``, 00_conventions §2).
The local resolution is where that curve first falls below the cutoff
(:func:`first_crossing`). :func:`local_fsc_exact` does this for every
selected voxel, in batches of windows transformed together.

Local FSC, fast (band-wise)
---------------------------
Parseval turns the shell sum of the windowed cross-spectrum into a real-space
sum: for a band ``b_j`` around the shell frequency ``s_j``,
``sum_k b_j(k)^2 F[w h1](k) F[w h2](k)* ~ sum_x w(x - v)^2 h1_j(x) h2_j(x)``,
with ``h_j`` the half map band-passed to ``b_j`` (one global FFT per band)
and the approximation ``b_j * (w h) ~ w (b_j * h)`` valid when the band is
at least as wide as the taper's spectral width. The local FSC of band ``j``
at every voxel is then three windowed sums (``h1_j h2_j``, ``h1_j^2``,
``h2_j^2``) with the kernel ``w^2`` (:func:`windowed_band_fsc`, an FFT
correlation on the block), and the resolution is the first crossing over the
bands, folded band by band into one float per voxel
(:func:`local_fsc_band_fsc`, :func:`crossing_step`). The cost grows with
the number of bands, not with window volume x voxels. Bands are Gaussian in
``|s|`` without DC (:func:`gaussian_band`, :func:`band_pass`) with the width
the exact window effectively has (:func:`effective_band_sigma`), centred on
the window's shells. In expectation both modes then weight the local
spectrum alike; they differ in noise (see :mod:`chunkem.ops.locres`).

MonoRes (monogenic amplitude)
-----------------------------
:func:`monogenic_band` is the Fourier kernel of one step's filtered map; its
three Riesz components and the amplitude come from :mod:`chunkem.kernels.spiral`
(``riesz_base``, ``riesz_component``, ``local_amplitude``);
:func:`monores_step` folds the amplitude/threshold ratio of each step, from low
to high resolution, into a running state with the two-failure freeze rule of
Xmipp's MonoRes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.fft
from numpy.lib.stride_tricks import sliding_window_view

__all__ = [
    "hann_taper",
    "hann_window",
    "ShellLayout",
    "shell_layout",
    "local_fsc_curves",
    "first_crossing",
    "crossing_to_resolution",
    "local_fsc_exact",
    "gaussian_band",
    "band_pass",
    "band_limit",
    "effective_band_sigma",
    "windowed_band_fsc",
    "resolution_from_bands",
    "crossing_state_init",
    "crossing_step",
    "crossing_state_frequency",
    "crossing_state_resolution",
    "local_fsc_band_fsc",
    "raised_cosine_highpass",
    "raised_cosine_lowpass",
    "monogenic_filter",
    "monogenic_band",
    "lowpass_kernel",
    "monores_state_init",
    "monores_step",
    "monores_state_resolution",
    "sample_radius",
    "monores_noise_radius",
    "noise_falloff",
    "monores_postprocess",
    "interpolate_grid",
    "hann_band",
    "lowpass_weight",
    "blend_band",
]


# --------------------------------------------------------------------------- windows


def hann_taper(n: int) -> np.ndarray:
    """1-D Hann taper of ``n`` points, ``0.5 (1 - cos(2 pi i / (n - 1)))`` (blocres).

    Zero at both ends, 1 in the middle (odd ``n``).

    Examples
    --------
    >>> hann_taper(5).round(3).tolist()
    [0.0, 0.5, 1.0, 0.5, 0.0]
    """
    n = int(n)
    if n < 2:
        return np.ones(max(n, 0))
    i = np.arange(n, dtype=np.float64)
    return 0.5 * (1.0 - np.cos(2.0 * np.pi * i / (n - 1)))


def hann_window(box: Sequence[int]) -> np.ndarray:
    """Separable 3-D Hann window of shape ``box`` (product of :func:`hann_taper`)."""
    bz, by, bx = (int(b) for b in box)
    return hann_taper(bz)[:, None, None] * hann_taper(by)[None, :, None] * hann_taper(bx)[None, None, :]


# --------------------------------------------------------------------------- exact local FSC


@dataclass(frozen=True)
class ShellLayout:
    """Fourier shells of a padded window (rfft half-space) as a one-hot matrix.

    Attributes
    ----------
    fft_shape
        Real-space shape of the padded window (voxels).
    onehot
        (n_freq, n_shells) float32 matrix: 1 where the half-space voxel (in
        C order) belongs to the shell; corners beyond the last shell are 0
        rows. Shell sums of many windows are one matrix product.
    frequency
        Frequency of every shell ``0 ... n - 1`` in 1/Å (``i / L``).
    """

    fft_shape: tuple[int, int, int]
    onehot: np.ndarray
    frequency: np.ndarray


def shell_layout(fft_shape: Sequence[int], voxel_size: Sequence[float]) -> ShellLayout:
    """Shells of a real-space grid ``fft_shape`` with ``voxel_size`` Å.

    Shell index ``i = floor(|s| L + 0.5)``, ``L = min_axis(N_axis a_axis)`` Å,
    shells ``0 ... floor(N_min / 2)`` (00_conventions §2).
    """
    shape = tuple(int(n) for n in fft_shape)
    vs = tuple(float(v) for v in voxel_size)
    kz = scipy.fft.fftfreq(shape[0], d=vs[0])[:, None, None]
    ky = scipy.fft.fftfreq(shape[1], d=vs[1])[None, :, None]
    kx = scipy.fft.rfftfreq(shape[2], d=vs[2])[None, None, :]
    length = min(n * v for n, v in zip(shape, vs))
    nshell = min(shape) // 2 + 1
    idx = np.floor(np.sqrt(kz**2 + ky**2 + kx**2) * length + 0.5).astype(np.int64).ravel()
    onehot = np.zeros((idx.size, nshell), dtype=np.float32)
    keep = np.nonzero(idx < nshell)[0]
    onehot[keep, idx[keep]] = 1.0
    return ShellLayout(fft_shape=shape, onehot=onehot, frequency=np.arange(nshell, dtype=np.float64) / length)


def _padded_rfftn(cubes: np.ndarray, fshape: tuple[int, int, int], workers: int) -> np.ndarray:
    """rfftn over the last 3 axes with zero padding to ``fshape``, skipping the all-zero lines."""
    f = scipy.fft.rfft(cubes, n=fshape[2], axis=3, workers=workers)
    f = scipy.fft.fft(f, n=fshape[1], axis=2, workers=workers, overwrite_x=True)
    return scipy.fft.fft(f, n=fshape[0], axis=1, workers=workers, overwrite_x=True)


def local_fsc_curves(
    h1: np.ndarray,
    h2: np.ndarray,
    starts: np.ndarray,
    *,
    box: Sequence[int],
    voxel_size: Sequence[float],
    pad: int = 1,
    layout: ShellLayout | None = None,
    taper: np.ndarray | None = None,
    workers: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """FSC curves of tapered windows of two maps (blocres ``fsc_local``).

    Parameters
    ----------
    h1, h2
        Half maps (3-D, same shape).
    starts
        (n, 3) integer index of each window's first voxel; every window
        ``start ... start + box - 1`` must lie inside the arrays.
    box
        Window edge per axis (voxels).
    voxel_size
        Å per axis.
    pad
        Zero padding: FFT size ``box * (pad + 1)`` (blocres default 1).
    layout, taper
        Precomputed :func:`shell_layout` of the padded window and
        :func:`hann_window` (computed when omitted).
    workers
        Threads for ``scipy.fft``.

    Returns
    -------
    curves : ndarray (n, n_shells)
        FSC per shell; shell 0 is set to 1 (DC is not used), empty or
        zero-power shells to 0.
    frequency : ndarray (n_shells,)
        Shell frequencies in 1/Å.
    """
    box = tuple(int(b) for b in box)
    fshape = tuple(b * (int(pad) + 1) for b in box)
    if layout is None:
        layout = shell_layout(fshape, voxel_size)
    if taper is None:
        taper = hann_window(box)
    starts = np.asarray(starts, dtype=np.int64).reshape(-1, 3)
    n = starts.shape[0]
    nshell = layout.frequency.size
    if n == 0:
        return np.zeros((0, nshell)), layout.frequency
    for ax in range(3):
        if starts[:, ax].min() < 0 or starts[:, ax].max() + box[ax] > h1.shape[ax]:
            raise ValueError(f"a window of {box} at the given starts leaves the array of shape {h1.shape}")
    taper32 = taper.astype(np.float32)
    spectra = []
    for arr in (h1, h2):
        view = sliding_window_view(np.asarray(arr, dtype=np.float32), box)
        cubes = view[starts[:, 0], starts[:, 1], starts[:, 2]]  # (n, bz, by, bx), a copy
        cubes -= cubes.mean(axis=(1, 2, 3), keepdims=True)
        cubes *= taper32
        spectra.append(_padded_rfftn(cubes, fshape, workers).reshape(n, -1))
    f1, f2 = spectra
    parts = np.empty((3, n, f1.shape[1]), dtype=np.float32)
    np.multiply(f1.real, f2.real, out=parts[0])
    parts[0] += f1.imag * f2.imag
    np.multiply(f1.real, f1.real, out=parts[1])
    parts[1] += f1.imag * f1.imag
    np.multiply(f2.real, f2.real, out=parts[2])
    parts[2] += f2.imag * f2.imag
    sums = (parts.reshape(3 * n, -1) @ layout.onehot).reshape(3, n, nshell).astype(np.float64)
    den = np.sqrt(sums[1] * sums[2])
    with np.errstate(invalid="ignore", divide="ignore"):
        curves = np.where(den > 0, sums[0] / np.where(den > 0, den, 1.0), 0.0)
    curves[:, 0] = 1.0
    return curves, layout.frequency


def first_crossing(curves: np.ndarray, frequency: np.ndarray, *, cutoff: float = 0.143) -> np.ndarray:
    """Frequency (1/Å) where each curve first falls below ``cutoff`` (vectorised).

    The same first-crossing rule as the global FSC
    (:func:`chunkem.kernels.fsc.resolution_crossing`): walk shells
    ``i = 1, 2, ...`` to the first ``curve[i] < cutoff``; interpolate linearly
    in frequency between shell ``i - 1`` and ``i``. Shell 0 counts as 1.

    Parameters
    ----------
    curves
        (..., n) values at ``frequency`` (last axis); NaN counts as 0.
    frequency
        (n,) increasing frequencies in 1/Å; ``frequency[0]`` is the DC / start.
    cutoff
        Threshold.

    Returns
    -------
    ndarray (...)
        Crossing frequency; 0 when shell 1 already fails (no resolution),
        ``frequency[-1]`` when the curve never falls below the cutoff.

    Examples
    --------
    >>> round(float(first_crossing(np.array([1, .9, .5, .1, .3]), np.arange(5) / 100.0, cutoff=0.143)), 5)
    0.02892
    """
    c = np.nan_to_num(np.asarray(curves, dtype=np.float64), nan=0.0)
    f = np.asarray(frequency, dtype=np.float64)
    below = c < cutoff
    below[..., 0] = False
    has = below.any(axis=-1)
    i = np.argmax(below, axis=-1)
    i = np.where(has, i, 1)
    c1 = np.take_along_axis(c, i[..., None], axis=-1)[..., 0]
    c0 = np.take_along_axis(c, (i - 1)[..., None], axis=-1)[..., 0]
    c0 = np.where(i - 1 == 0, np.maximum(c0, 1.0), c0)
    v0 = c0 - cutoff
    v1 = c1 - cutoff
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(v0 != v1, v0 / (v0 - v1), 0.0)
    s = f[i - 1] + r * (f[i] - f[i - 1])
    s = np.where(i - 1 == 0, 0.0, s)  # shell 1 fails: no resolution (clamped to the worst later)
    return np.where(has, s, f[-1])


def crossing_to_resolution(s: np.ndarray, *, best: float, worst: float) -> np.ndarray:
    """Resolution ``1 / s`` in Å clamped to ``[best, worst]`` (``s <= 0`` gives ``worst``)."""
    s = np.asarray(s, dtype=np.float64)
    with np.errstate(divide="ignore"):
        d = np.where(s > 0, 1.0 / np.where(s > 0, s, 1.0), np.inf)
    return np.clip(d, best, worst)


def _grid_select(shape, step, offset, origin, voxel_size) -> np.ndarray:
    """Voxels of a block lying on the global grid ``index % step == 0``."""
    sel = []
    for ax in range(3):
        first = int(round((offset[ax] - origin[ax]) / voxel_size[ax]))
        g = first + np.arange(shape[ax])
        sel.append(g % int(step[ax]) == 0)
    return sel[0][:, None, None] & sel[1][None, :, None] & sel[2][None, None, :]


def local_fsc_exact(
    h1: np.ndarray,
    h2: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    box: Sequence[int],
    voxel_size: Sequence[float],
    cutoff: float | Sequence[float] = 0.143,
    best: float,
    worst: float,
    pad: int = 1,
    margin: Sequence[int] | None = None,
    step: Sequence[int] | None = None,
    offset: Sequence[float] | None = None,
    origin: Sequence[float] | None = None,
    fill: float = np.nan,
    batch: int = 128,
    workers: int = 1,
) -> np.ndarray:
    """Per-voxel local FSC resolution of a block, one windowed FFT per voxel.

    Parameters
    ----------
    h1, h2
        Half-map blocks including a margin of at least ``box // 2`` voxels
        on every side (a halo, or periodic padding at the true edge).
    mask
        Optional block: only voxels with ``mask > 0.5`` are computed (with
        ``step``, grid points within ``step`` voxels of such a voxel).
    box
        Window edge (voxels) per axis.
    voxel_size
        Å per axis.
    cutoff
        FSC threshold (0.143, 0.5...), or a sequence of them: each voxel's
        curve is computed once and crossed at every cutoff.
    best, worst
        Clamp range of the result in Å (data limit / Nyquist, low-res cap).
    pad
        Window zero padding factor (FFT size ``box (pad + 1)``).
    margin
        Voxels at each face of the block that are not computed (default
        ``box // 2`` on the low side, ``box - box // 2 - 1`` on the high
        side, i.e. where a full window fits).
    step, offset, origin
        Compute only the voxels on the global grid ``index % step == 0``
        (``offset``/``origin`` in Å locate the block in the map).
    fill
        Value of voxels not computed.
    batch
        Windows transformed together.
    workers
        Threads for ``scipy.fft``.

    Returns
    -------
    ndarray (float32)
        Local resolution in Å at the computed voxels, ``fill`` elsewhere;
        with a sequence of cutoffs, one such map per cutoff stacked
        (``(len(cutoff), *h1.shape)``).
    """
    cutoffs = [float(c) for c in np.atleast_1d(cutoff)]
    stacked = np.ndim(cutoff) > 0
    box = tuple(int(b) for b in box)
    shape = h1.shape
    lo = tuple(b // 2 for b in box)
    hi = tuple(b - b // 2 - 1 for b in box)
    if margin is not None:
        lo = hi = tuple(int(m) for m in margin)
    out = np.full((len(cutoffs),) + tuple(shape), fill, dtype=np.float32)
    inner = np.zeros(shape, dtype=bool)
    if any(lo[a] + hi[a] >= shape[a] for a in range(3)):
        return out if stacked else out[0]
    inner[lo[0]:shape[0] - hi[0], lo[1]:shape[1] - hi[1], lo[2]:shape[2] - hi[2]] = True
    if step is not None and any(int(s) > 1 for s in step):
        grid = _grid_select(shape, step, offset, origin, voxel_size)
        sel = inner & grid
        if mask is not None:
            from scipy.ndimage import maximum_filter

            size = tuple(2 * int(s) + 1 for s in step)
            sel &= maximum_filter(np.asarray(mask) > 0.5, size=size, mode="constant")
    else:
        sel = inner if mask is None else inner & (np.asarray(mask) > 0.5)
    centres = np.argwhere(sel)
    if centres.size == 0:
        return out if stacked else out[0]
    fshape = tuple(b * (int(pad) + 1) for b in box)
    layout = shell_layout(fshape, voxel_size)
    taper = hann_window(box)
    res = np.empty((len(cutoffs), centres.shape[0]), dtype=np.float32)
    wlo = np.asarray([b // 2 for b in box])
    for k in range(0, centres.shape[0], batch):
        c = centres[k:k + batch]
        curves, freq = local_fsc_curves(h1, h2, c - wlo, box=box, voxel_size=voxel_size, pad=pad,
                                        layout=layout, taper=taper, workers=workers)
        for j, co in enumerate(cutoffs):
            s = first_crossing(curves, freq, cutoff=co)
            res[j, k:k + batch] = crossing_to_resolution(s, best=best, worst=worst)
    out[:, centres[:, 0], centres[:, 1], centres[:, 2]] = res
    return out if stacked else out[0]


def interpolate_grid(
    values: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    step: Sequence[int],
    offset: Sequence[float],
    origin: Sequence[float],
    voxel_size: Sequence[float],
    fill: float = np.nan,
) -> np.ndarray:
    """Trilinear fill of a block whose values are known on the global grid ``index % step == 0``.

    Grid points holding NaN are left out (their weight goes to the other
    corners); voxels with no valid corner get ``fill``. With ``mask`` only
    voxels with ``mask > 0.5`` are filled. The block must extend ``step``
    voxels beyond the voxels of interest (a halo).
    """
    v = np.asarray(values, dtype=np.float64)
    shape = v.shape
    step = tuple(int(s) for s in step)
    num = np.zeros(shape)
    den = np.zeros(shape)
    # per axis: global index, lower grid point (local), fractional weight
    lows, fracs = [], []
    for ax in range(3):
        first = int(round((offset[ax] - origin[ax]) / voxel_size[ax]))
        g = first + np.arange(shape[ax])
        r = np.mod(g, step[ax])
        lows.append(np.arange(shape[ax]) - r)
        fracs.append(r / step[ax])
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                idx, wts, ok = [], [], []
                for ax, d in enumerate((dz, dy, dx)):
                    p = lows[ax] + d * step[ax]
                    w = fracs[ax] if d else 1.0 - fracs[ax]
                    good = (p >= 0) & (p < shape[ax])
                    idx.append(np.clip(p, 0, shape[ax] - 1))
                    wts.append(np.where(good, w, 0.0))
                    ok.append(good)
                val = v[np.ix_(idx[0], idx[1], idx[2])]
                w3 = wts[0][:, None, None] * wts[1][None, :, None] * wts[2][None, None, :]
                finite = np.isfinite(val)
                w3 = np.where(finite, w3, 0.0)
                num += w3 * np.where(finite, val, 0.0)
                den += w3
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 1e-12, num / np.where(den > 1e-12, den, 1.0), fill)
    if mask is not None:
        out = np.where(np.asarray(mask) > 0.5, out, fill)
    return out.astype(np.float32)


# --------------------------------------------------------------------------- fast (band-wise) local FSC


def gaussian_band(s: np.ndarray, *, centre: float, sigma: float) -> np.ndarray:
    """Amplitude of a Gaussian band, ``exp(-(s - centre)^2 / (4 sigma^2))`` (1/Å).

    Its square (the weight of the band's power) is a Gaussian of standard
    deviation ``sigma`` around ``centre``.
    """
    t = np.asarray(s, dtype=np.float64) - centre
    return np.exp(-(t * t) / (4.0 * sigma * sigma))


def band_pass(F: np.ndarray, *, kz: np.ndarray, ky: np.ndarray, kx: np.ndarray, centre: float,
              sigma: float) -> np.ndarray:
    """Fourier kernel (for ``engine.spectral.apply``): ``F`` times :func:`gaussian_band` of ``|k|`` (1/Å).

    The DC term is set to 0: the exact mode subtracts each window's mean
    before the FFT, so a constant offset of the maps must not leak into the
    lowest bands (the fast mode is then invariant to it, as the exact one).
    """
    f32 = np.float32
    s = np.sqrt((kz**2 + ky**2).astype(f32) + (kx**2).astype(f32))
    t = s - f32(centre)
    t *= t
    t *= f32(-1.0 / (4.0 * sigma * sigma))
    band = np.exp(t, out=t)
    band[s == 0] = 0.0
    out = np.asarray(F, dtype=np.complex64) * band
    return out


def band_limit(*, centre: float, sigma: float, rel: float = 1e-3) -> float:
    """Frequency (1/Å) beyond which the :func:`gaussian_band` amplitude is below ``rel`` of its peak.

    ``centre + 2 sigma sqrt(ln(1 / rel))``: the band's power there is
    ``rel²`` of its peak (1e-6 by default), so a spectrum band-passed to it
    can be cut to ``|k_axis| <= band_limit`` (a window) without a visible
    change of the windowed sums.
    """
    return float(centre) + 2.0 * float(sigma) * float(np.sqrt(np.log(1.0 / rel)))


def effective_band_sigma(window: float) -> float:
    """Width (1/Å, standard deviation in power) of the band a Hann-tapered window of ``window`` Å sees.

    The exact mode's padded shell (width ``1 / (2 W)``, variance
    ``1 / (48 W^2)``) is smeared by the Hann window's power spectrum
    (variance ``1 / (3 W^2)``): a band of standard deviation about
    ``0.6 / W``. We use ``0.7 / W``: on the NPC half maps and the phantom it
    agrees best with the exact mode (0.6: 83 %, 0.7: 85-86 %, 0.8: 78-84 %
    within one padded shell on NPC), as well as bands equal to the exact
    smeared-shell profile (see :mod:`chunkem.ops.locres`).
    """
    return 0.7 / float(window)


def windowed_band_fsc(
    h1: np.ndarray,
    h2: np.ndarray,
    *,
    box: Sequence[int],
    halo: bool = False,
    rel_eps: float = 1e-5,
    workers: int = 1,
) -> np.ndarray:
    """Local FSC of one band at every voxel: windowed sums with the squared Hann window.

    ``FSC(v) = S12 / sqrt(S11 S22)`` with
    ``Sab(v) = sum_i w(i)^2 ha(v - box//2 + i) hb(v - box//2 + i)`` (the
    window of :func:`local_fsc_exact`, ``w`` = :func:`hann_window`). The
    sums are correlations done with FFTs of the block.

    Parameters
    ----------
    h1, h2
        Band-passed half-map blocks.
    box
        Window edge per axis (voxels).
    halo
        False: linear correlation (the block is zero-padded by ``box - 1``
        before the FFT): exact wherever the block holds the whole window
        (``box // 2`` voxels below, ``box - box // 2 - 1`` above); beyond the
        block the map counts as zero, so at the true map edge the window is
        truncated. True: the block carries a halo of ``box // 2`` voxels on
        every side (zeros beyond the true map edge, i.e. the same result)
        and only the voxels at least ``box // 2`` from every face are used:
        the FFT is then circular, without the extra padding (cheaper).
    rel_eps
        Voxels whose ``sqrt(S11 S22)`` is below ``rel_eps`` times its
        largest value in the block get FSC 0: where a map is exactly zero
        (masked maps) the float32 FFT sums are pure round-off (about
        ``1e-7`` of the block's largest power), and the exact mode gives 0
        there too. With any real signal or noise the local power never
        comes near that level, so the result does not depend on the
        chunking.
    workers
        Threads for ``scipy.fft``.

    Returns
    -------
    ndarray (float32)
    """
    shape = h1.shape
    box = tuple(int(b) for b in box)
    extra = (0, 0, 0) if halo else tuple(b - 1 for b in box)
    fshape = tuple(scipy.fft.next_fast_len(n + e, real=True) for n, e in zip(shape, extra))
    a = np.asarray(h1, dtype=np.float32)
    b = np.asarray(h2, dtype=np.float32)
    prods = np.stack([a * b, a * a, b * b])
    spec = scipy.fft.rfftn(prods, s=fshape, axes=(1, 2, 3), workers=workers)
    del prods
    ks = []
    for ax in range(3):
        w2 = hann_taper(box[ax]) ** 2
        k = np.zeros(fshape[ax])
        idx = (np.arange(box[ax]) - box[ax] // 2) % fshape[ax]
        k[idx] = w2
        kf = scipy.fft.rfft(k) if ax == 2 else scipy.fft.fft(k)
        ks.append(np.conj(kf))  # correlation: out[v] = sum_i k[i] p[v + i - box//2]
    spec *= (ks[0][:, None, None] * ks[1][None, :, None] * ks[2][None, None, :]).astype(np.complex64)
    sums = scipy.fft.irfftn(spec, s=fshape, axes=(1, 2, 3), workers=workers, overwrite_x=True)
    sums = sums[:, :shape[0], :shape[1], :shape[2]]
    s12 = sums[0]
    den = np.sqrt(np.maximum(sums[1], 0))  # sqrt(S11) sqrt(S22): no float32 overflow
    den *= np.sqrt(np.maximum(sums[2], 0))
    if halo:
        lo = tuple(bx // 2 for bx in box)
        inner = den[lo[0]:shape[0] - lo[0], lo[1]:shape[1] - lo[1], lo[2]:shape[2] - lo[2]]
        eps = rel_eps * float(inner.max()) if inner.size else 0.0
    else:
        eps = rel_eps * float(den.max()) if den.size else 0.0
    fsc = np.zeros(shape, dtype=np.float32)
    np.divide(s12, den, out=fsc, where=den > eps)
    return np.clip(fsc, -1.0, 1.0, out=fsc)


def resolution_from_bands(
    *bands: np.ndarray,
    frequency: Sequence[float],
    cutoff: float = 0.143,
    best: float,
    worst: float,
    mask: np.ndarray | None = None,
    fill: float = np.nan,
) -> np.ndarray:
    """Local resolution (Å) from per-band local FSC blocks, first crossing over the bands.

    Parameters
    ----------
    bands
        Local FSC blocks of bands ``1 ... n`` (same shape), in increasing
        frequency order.
    frequency
        ``(n + 1,)`` frequencies in 1/Å: 0 (a virtual DC band with FSC 1)
        then the band centres.
    cutoff, best, worst
        Threshold and clamp range (Å).
    mask
        Optional: voxels with ``mask <= 0.5`` get ``fill``. Pass it as the
        first of ``bands`` is not possible; give it with this keyword.
    fill
        Value outside the mask.
    """
    stack = np.stack([np.ones_like(bands[0], dtype=np.float32)] + [np.asarray(b) for b in bands], axis=-1)
    s = first_crossing(stack, np.asarray(frequency, dtype=np.float64), cutoff=cutoff)
    d = crossing_to_resolution(s, best=best, worst=worst).astype(np.float32)
    if mask is not None:
        d = np.where(np.asarray(mask) > 0.5, d, np.float32(fill))
    return d


def crossing_state_init(mask: np.ndarray | None, shape: Sequence[int] | None = None) -> np.ndarray:
    """Start state of :func:`crossing_step`: 1 (the virtual DC band, FSC 1) in the mask, crossed elsewhere.

    Voxels with ``mask <= 0.5`` start as crossed at ``s = 0`` (state -1) so
    that no band work is spent on them. ``mask=None``: every voxel of
    ``shape`` is active.
    """
    if mask is None:
        return np.ones(tuple(shape), dtype=np.float32)
    return np.where(np.asarray(mask) > 0.5, np.float32(1.0), np.float32(-1.0)).astype(np.float32)


def crossing_step(state: np.ndarray, fsc: np.ndarray, *, f_prev: float, f_cur: float, first: bool,
                  cutoff: float = 0.143) -> np.ndarray:
    """One band of the running first-crossing rule of :func:`first_crossing`.

    The state of a voxel is one float32: ``x >= 0`` (in fact ``>= cutoff``)
    while its curve has not yet fallen below ``cutoff``, holding the FSC of
    the previous band; ``x <= -1`` once it has, holding the crossing
    frequency ``s = -1 - x`` (1/Å). Folding the bands ``1 ... n`` in order
    and finishing with :func:`crossing_state_frequency` gives exactly
    :func:`first_crossing` of the stacked curve (NaN counts as 0; a failure
    of the first band gives ``s = 0``), without holding all bands at once.

    Parameters
    ----------
    state
        Current state (from :func:`crossing_state_init` or a previous step).
    fsc
        FSC of this band (same shape).
    f_prev, f_cur
        Frequencies (1/Å) of the previous band (0 for the first) and of this one.
    first
        True for the first band (its failure means no resolution: ``s = 0``).
    cutoff
        Threshold.
    """
    x = np.array(state, dtype=np.float32)  # a copy: the new state
    c1 = np.asarray(fsc, dtype=np.float32)
    active = x >= 0
    fail = active & ~(c1 >= cutoff)  # NaN fails (counts as 0)
    keep = active & ~fail
    x[keep] = c1[keep]
    if fail.any():
        if first:
            s = np.zeros(int(fail.sum()))
        else:
            v0 = x[fail].astype(np.float64) - cutoff
            v1 = np.nan_to_num(c1[fail].astype(np.float64), nan=0.0) - cutoff
            with np.errstate(invalid="ignore", divide="ignore"):
                r = np.where(v0 != v1, v0 / (v0 - v1), 0.0)
            s = f_prev + r * (f_cur - f_prev)
        x[fail] = -1.0 - s
    return x


def crossing_state_frequency(state: np.ndarray, *, f_last: float) -> np.ndarray:
    """Crossing frequency (1/Å) of a folded state: ``-1 - x`` if crossed, ``f_last`` if never."""
    x = np.asarray(state, dtype=np.float64)
    return np.where(x <= -1.0, -1.0 - x, f_last)


def local_fsc_band_fsc(
    h1: np.ndarray,
    h2: np.ndarray,
    state: np.ndarray,
    *,
    box: Sequence[int],
    edge_pad: Sequence[tuple[int, int]] | None = None,
    workers: int = 1,
) -> np.ndarray:
    """Fast local FSC of one band on a block with a halo, where the running first crossing still needs it.

    The block must carry ``box // 2`` voxels of halo on every side, except
    on the sides listed in ``edge_pad`` (``(low, high)`` voxels per axis):
    there it is padded with that many zeros first (the true map edge: the
    map counts as zero beyond it, the window is truncated). The FSC is
    :func:`windowed_band_fsc` with ``halo=True`` (circular FFT, no extra
    padding), taken only over the bounding box of the voxels still active
    in ``state`` (a :func:`crossing_step` state: not crossed, inside the
    mask) among those at least ``box // 2`` from the faces of the (padded)
    block, plus half a window around it; the other voxels get NaN, which
    :func:`crossing_step` never reads (they are crossed, or halo voxels the
    caller discards). When no voxel is active the band is skipped (all NaN).
    The cost falls as the voxels cross. With several cutoffs pass the state
    of the lowest: a voxel still active for a higher cutoff is active for it.
    """
    box = tuple(int(b) for b in box)
    lo = tuple(b // 2 for b in box)
    state = np.asarray(state)
    out = np.full(state.shape, np.nan, dtype=np.float32)
    pads = [(int(a), int(b)) for a, b in edge_pad] if edge_pad is not None else [(0, 0)] * 3
    # work in the coordinates of the block zero-padded at the true map edge, without padding it
    sh = tuple(n + p[0] + p[1] for n, p in zip(state.shape, pads))
    inner = tuple(slice(lo[ax] - pads[ax][0], sh[ax] - lo[ax] - pads[ax][0]) for ax in range(3))
    if any(s.stop <= s.start for s in inner):
        return out
    active = state[inner] >= 0
    if not active.any():
        return out
    # bounding box of the active voxels (block coordinates); the FFT covers it plus half a window
    box_lo, box_hi = [], []
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(active.any(axis=other))
        box_lo.append(inner[ax].start + int(idx[0]))
        box_hi.append(inner[ax].start + int(idx[-1]) + 1)
    region = tuple(slice(a - h, b + h) for a, b, h in zip(box_lo, box_hi, lo))
    fsc = windowed_band_fsc(_zero_extended(h1, region), _zero_extended(h2, region), box=box, halo=True,
                            workers=workers)
    core = tuple(slice(h, h + b - a) for a, b, h in zip(box_lo, box_hi, lo))
    out[tuple(slice(a, b) for a, b in zip(box_lo, box_hi))] = fsc[core]
    return out


def _zero_extended(arr: np.ndarray, region: tuple[slice, ...]) -> np.ndarray:
    """``arr[region]`` as float32, with zeros where the region reaches beyond the array (negative starts too)."""
    a = np.asarray(arr)
    src = tuple(slice(max(s.start, 0), min(s.stop, n)) for s, n in zip(region, a.shape))
    if all(s.start >= 0 and s.stop <= n for s, n in zip(region, a.shape)):
        return np.asarray(a[region], dtype=np.float32)
    out = np.zeros(tuple(s.stop - s.start for s in region), dtype=np.float32)
    dst = tuple(slice(c.start - s.start, c.stop - s.start) for c, s in zip(src, region))
    out[dst] = a[src]
    return out


def crossing_state_resolution(state: np.ndarray, *, f_last: float, best: float, worst: float) -> np.ndarray:
    """Local resolution (Å, float32) of a folded state, clamped to ``[best, worst]``."""
    s = crossing_state_frequency(state, f_last=f_last)
    return crossing_to_resolution(s, best=best, worst=worst).astype(np.float32)


# --------------------------------------------------------------------------- MonoRes


def _real(s) -> np.ndarray:
    """``s`` as float32 when it is float32 (Fourier kernels on float32 grids), else float64."""
    s = np.asarray(s)
    return s if s.dtype == np.float32 else s.astype(np.float64)


def _radius(kz: np.ndarray, ky: np.ndarray, kx: np.ndarray) -> np.ndarray:
    """``|k|`` (1/Å) of broadcast frequency axes, in float32."""
    kz, ky, kx = (np.asarray(k, dtype=np.float32) for k in (kz, ky, kx))
    s = (ky * ky + kx * kx) + kz * kz
    return np.sqrt(s, out=s)


def raised_cosine_highpass(s: np.ndarray, *, cut: float, width: float) -> np.ndarray:
    """MonoRes high-pass: 0 below ``cut - width``, raised cosine to 1 at ``cut``, 1 above (1/Å)."""
    s = _real(s)
    t = np.clip((s - (cut - width)) / width, 0.0, 1.0)
    return 0.5 * (1.0 - np.cos(np.pi * t))


def raised_cosine_lowpass(s: np.ndarray, *, cut: float, width: float) -> np.ndarray:
    """MonoRes smoothing low-pass: 1 below ``cut``, raised cosine to 0 at ``cut + width`` (1/Å)."""
    s = _real(s)
    t = np.clip((s - cut) / width, 0.0, 1.0)
    return 0.5 * (1.0 + np.cos(np.pi * t))


def monogenic_filter(s: np.ndarray, *, cut: float, width: float, kind: str = "band") -> np.ndarray:
    """Filter applied before the Riesz transform (1/Å).

    ``kind="band"``: ``cos^2(pi/2 (s - cut) / width)`` for ``|s - cut| < width``
    (a band around the tested frequency); ``kind="highpass"``: Xmipp's
    high-pass, :func:`raised_cosine_highpass` (0 below ``cut - width``, 1
    above ``cut``).
    """
    if kind == "highpass":
        return raised_cosine_highpass(s, cut=cut, width=width)
    if kind != "band":
        raise ValueError(f"kind must be 'band' or 'highpass', got {kind!r}")
    t = (_real(s) - cut) / width
    return np.where(np.abs(t) < 1.0, np.cos(0.5 * np.pi * t) ** 2, 0.0)


def monogenic_band(F: np.ndarray, *, kz: np.ndarray, ky: np.ndarray, kx: np.ndarray, cut: float, width: float,
                   kind: str = "band") -> np.ndarray:
    """Fourier kernel: ``F · H(|k|)`` (complex64), the spectrum of one MonoRes step's filtered map.

    ``H`` is :func:`monogenic_filter`. Its Riesz components are
    ``FH · (-i k_j / |k|)`` (:func:`chunkem.kernels.spiral.riesz_base` then
    :func:`~chunkem.kernels.spiral.riesz_component`), and the monogenic
    amplitude is ``sqrt(g² + Σ r_j²)`` of the four inverses
    (:func:`~chunkem.kernels.spiral.local_amplitude`).
    """
    h = monogenic_filter(_radius(kz, ky, kx), cut=cut, width=width, kind=kind).astype(np.float32, copy=False)
    return np.multiply(np.asarray(F, dtype=np.complex64), h)


def lowpass_kernel(F: np.ndarray, *, kz: np.ndarray, ky: np.ndarray, kx: np.ndarray, cut: float,
                   width: float) -> np.ndarray:
    """Fourier kernel: ``F`` times :func:`raised_cosine_lowpass` (complex64)."""
    h = raised_cosine_lowpass(_radius(kz, ky, kx), cut=cut, width=width).astype(np.float32, copy=False)
    return np.multiply(np.asarray(F, dtype=np.complex64), h)


#: MonoRes scan state: ``fails * _FAIL_UNIT + (k + 1)`` with ``k`` the index of the last step that passed
#: (0: none yet), -1 for voxels not analysed. Small integers: exact in the float32 of a Volume.
_FAIL_UNIT = 4096.0
MAX_MONORES_STEPS = 4095


def monores_state_init(mask: np.ndarray | None, shape: Sequence[int] | None = None) -> np.ndarray:
    """Start state of :func:`monores_step`: no step passed, no failure; voxels with ``mask <= 0.5`` left out.

    The state of a voxel is one float32 holding a small integer,
    ``fails * 4096 + (k + 1)``: ``k`` the index of the last step that passed
    (``k + 1 = 0``: none yet) and ``fails`` the consecutive failures since;
    -1 for voxels that are not analysed. ``mask=None``: every voxel of
    ``shape`` is analysed.
    """
    if mask is None:
        return np.zeros(tuple(shape), dtype=np.float32)
    return np.where(np.asarray(mask) > 0.5, np.float32(0.0), np.float32(-1.0))


def monores_step(state: np.ndarray, ratio: np.ndarray, *, step: int, max_fails: int = 2) -> np.ndarray:
    """Step ``step`` (0-based index into the scanned resolutions) of the MonoRes scan, folded into the state.

    Xmipp's two-failure freeze rule: a voxel still active (analysed, fewer
    than ``max_fails`` consecutive failures) whose ``ratio`` (monogenic
    amplitude / noise threshold) is above 1 records this step and its
    failure count is reset; an active voxel that fails counts one more
    failure; after ``max_fails`` consecutive failures the voxel is frozen at
    its last recorded step. NaN ratios fail. Steps are folded from low to
    high resolution.
    """
    if not 0 <= int(step) < MAX_MONORES_STEPS:
        raise ValueError(f"step must be between 0 and {MAX_MONORES_STEPS - 1}, got {step}")
    x = np.array(state, dtype=np.float32)  # a copy: the new state
    fails = np.floor(x / np.float32(_FAIL_UNIT))
    active = (x >= 0) & (fails < max_fails)
    ok = np.asarray(ratio) > 1.0
    x[active & ok] = np.float32(int(step) + 1)
    x[active & ~ok] += np.float32(_FAIL_UNIT)
    return x


def monores_state_resolution(state: np.ndarray, mask: np.ndarray | None = None, *,
                             resolutions: Sequence[float]) -> np.ndarray:
    """Resolution (Å, float32) of a folded MonoRes state: ``resolutions[k]``; NaN where no step passed,
    outside ``mask`` or left out."""
    x, k = _state_steps(state)
    table = np.asarray(list(resolutions) + [np.nan], dtype=np.float64)  # k = -1 -> NaN
    d = np.where((x >= 0) & (k >= 0), table[np.clip(k, -1, len(table) - 2)], np.nan)
    if mask is not None:
        d = np.where(np.asarray(mask) > 0.5, d, np.nan)
    return d.astype(np.float32)


def _state_steps(state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(state as float64, index of the last step passed: -1 where none) of a folded MonoRes state."""
    x = np.asarray(state, dtype=np.float64)
    return x, np.rint(x - np.floor(x / _FAIL_UNIT) * _FAIL_UNIT).astype(np.int64) - 1


def monores_state_counts(state: np.ndarray, *, n_steps: int) -> np.ndarray:
    """Counts (int64, ``n_steps + 1``) of a folded MonoRes state: the analysed voxels whose last passed step
    is ``k`` (``k < n_steps``), then the number of analysed voxels. Summed over blocks they give the exact
    median of the assigned voxels (:func:`median_from_counts`) whatever the chunking."""
    x, k = _state_steps(state)
    passed = k[(x >= 0) & (k >= 0)]
    out = np.zeros(int(n_steps) + 1, dtype=np.int64)
    out[:-1] = np.bincount(passed, minlength=int(n_steps))[:int(n_steps)]
    out[-1] = np.count_nonzero(x >= 0)
    return out


def median_from_counts(values: Sequence[float], counts: np.ndarray) -> float:
    """The median of a multiset given as distinct ``values`` with ``counts`` (``np.median`` of the float32
    values, ties averaged as it does); NaN when empty."""
    v = np.asarray(values, dtype=np.float32)
    c = np.asarray(counts, dtype=np.int64)
    n = int(c.sum())
    if n == 0:
        return float("nan")
    order = np.argsort(v, kind="stable")
    v, cum = v[order], np.cumsum(c[order])
    lo = v[np.searchsorted(cum, (n - 1) // 2, side="right")]
    hi = v[np.searchsorted(cum, n // 2, side="right")]
    return float(np.mean(np.array([lo, hi], dtype=np.float32)))


def sample_radius(sample_shape: Sequence[int], *, stride: int, shape: Sequence[int]) -> np.ndarray:
    """Distance (voxels of the full map) of each point of the strided grid ``[::stride]*3`` of a map of
    ``shape`` from the box centre (index ``n // 2`` per axis)."""
    idx = [(np.arange(k) * int(stride) - n // 2) ** 2 for k, n in zip(sample_shape, shape)]
    return np.sqrt(idx[0][:, None, None] + idx[1][None, :, None] + idx[2][None, None, :])


def _shell_variance(sample: np.ndarray, select: np.ndarray, *, stride: int,
                    shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(count, variance) of ``sample[select]`` per spherical shell ``floor(r / stride)`` about the box centre
    (:func:`sample_radius`); variance NaN in empty shells."""
    r = sample_radius(np.shape(sample), stride=stride, shape=shape)
    sel = np.asarray(select, dtype=bool)
    shell = np.floor(r[sel] / int(stride)).astype(np.int64)
    v = np.asarray(sample, dtype=np.float64)[sel]
    count = np.bincount(shell)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.bincount(shell, v) / count
        var = np.bincount(shell, v * v) / count - mean**2
    return count, var


def monores_noise_radius(
    sample: np.ndarray,
    mask: np.ndarray,
    *,
    stride: int,
    shape: Sequence[int],
    drop: float = 0.01,
    min_count: int = 8,
) -> float:
    """Radius inside which a single map still holds noise: Xmipp MonoRes' "cliff" search.

    Maps are often masked by a sphere (the particle diameter of the
    refinement) smaller than the box; the zeros beyond it are no noise
    sample. The variance of the map is taken in spherical shells about the
    box centre (index ``n // 2`` per axis), one sample step wide, from the
    protein radius (the farthest mask voxel) outwards; the first shell whose
    variance falls below ``drop`` × the previous shell's marks the cliff.

    Parameters
    ----------
    sample, mask
        The map and the mask (``> 0.5`` inside) on the strided grid
        ``[::stride, ::stride, ::stride]`` of the full map.
    stride
        Sampling step (voxels); shells are ``stride`` voxels wide.
    shape
        Shape of the full map.
    drop
        Variance ratio of consecutive shells that marks the cliff (Xmipp: 1 %).
    min_count
        Shells with fewer sample voxels are skipped.

    Returns
    -------
    float
        Radius in voxels of the full map: the inner edge of the cliff shell,
        or ``min(shape) / 2`` (the box sphere) when there is no cliff.
    """
    stride = int(stride)
    limit = min(shape) / 2.0
    inside = np.asarray(mask) > 0.5
    if not inside.any():
        return limit
    count, var = _shell_variance(sample, np.ones(np.shape(sample), bool), stride=stride, shape=shape)
    r = sample_radius(np.shape(sample), stride=stride, shape=shape)
    first = int(np.floor(r[inside].max() / stride)) + 1
    prev = None
    for j in range(first, min(int(np.floor(limit / stride)) + 1, count.size)):
        if count[j] < min_count:
            continue
        if prev is not None and var[j] < drop * prev:
            return float(min(j * stride, limit))
        prev = var[j]
    return limit


def noise_falloff(
    sample: np.ndarray,
    select: np.ndarray,
    *,
    stride: int,
    shape: Sequence[int],
    min_count: int = 8,
) -> tuple[float, float, float]:
    """How much a map's variance falls across its noise region, from the inside out.

    Noise of a reconstruction is about stationary; a map multiplied by a soft
    mask (deposited maps often are) has noise that fades towards the box
    edge, and a single-map noise threshold taken there is too low.

    Parameters
    ----------
    sample, select
        The map and the noise voxels (bool) on the strided grid
        ``[::stride, ::stride, ::stride]`` of the full map.
    stride
        Sampling step (voxels); shells about the box centre (index ``n // 2``)
        are ``stride`` voxels wide.
    shape
        Shape of the full map.
    min_count
        Shells with fewer noise voxels are skipped.

    Returns
    -------
    (ratio, r_inner, r_outer)
        Mean variance of the inner third of the noise shells over that of
        the outer third, and the radii (voxels) of the innermost and outermost
        shells; ``(1.0, r, r)`` with fewer than three shells.
    """
    stride = int(stride)
    if not np.any(select):
        return 1.0, 0.0, 0.0
    count, var = _shell_variance(sample, select, stride=stride, shape=shape)
    nonempty = np.flatnonzero(count)
    used = np.flatnonzero(count >= min_count)
    if used.size < 3:
        return 1.0, float(nonempty[0] * stride), float(nonempty[-1] * stride)
    var = var[used]
    k = used.size // 3
    outer = float(var[-k:].mean())
    ratio = float(var[:k].mean() / outer) if outer > 0 else float("inf")
    return ratio, float(used[0] * stride), float(used[-1] * stride)


def monores_postprocess(
    raw: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    median: float | None = None,
    sigma: float = 3.0,
    best: float,
    fill: float = np.nan,
) -> np.ndarray:
    """MonoRes post-processing: unassigned → ``median``, Gaussian smoothing (σ voxels), keep the finer value.

    Smoothed values larger than the raw value, or below ``best`` (Å,
    Nyquist), are replaced by the raw value; voxels outside ``mask`` get
    ``fill``. Needs a halo of ``ceil(3 sigma)`` voxels.
    """
    from scipy.ndimage import gaussian_filter

    r = np.asarray(raw, dtype=np.float64)
    if median is not None:
        r = np.where(np.isfinite(r), r, median)
    sm = gaussian_filter(r, sigma=sigma, mode="reflect", truncate=3.0)
    out = np.where((sm > r) | (sm < best), r, sm)
    if mask is not None:
        out = np.where(np.asarray(mask) > 0.5, out, fill)
    return out.astype(np.float32)


# --------------------------------------------------------------------------- local filtering


def hann_band(s: np.ndarray, *, centre: float, spacing: float) -> np.ndarray:
    """``cos^2(pi/2 (s - centre) / spacing)`` for ``|s - centre| < spacing``, else 0.

    Bands at ``centre = j * spacing``, ``j = 0, 1, ...`` sum to exactly 1 at
    every ``s >= 0`` (a partition of unity of the spectrum).

    Examples
    --------
    >>> s = np.linspace(0.0, 0.5, 11)
    >>> bool(np.allclose(sum(hann_band(s, centre=j * 0.05, spacing=0.05) for j in range(12)), 1.0))
    True
    """
    t = (np.asarray(s, dtype=np.float64) - centre) / spacing
    return np.where(np.abs(t) < 1.0, np.cos(0.5 * np.pi * t) ** 2, 0.0)


def lowpass_weight(locres: np.ndarray, *, centre: float, spacing: float) -> np.ndarray:
    """Weight of the band at ``centre`` (1/Å) for voxels low-passed at ``locres`` (Å).

    A linear ramp in frequency, 1 for ``centre <= 1/d - spacing/2`` and 0 for
    ``centre >= 1/d + spacing/2``. Voxels without a resolution (NaN or
    ``<= 0``) get 0.
    """
    d = np.asarray(locres, dtype=np.float64)
    ok = np.isfinite(d) & (d > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cut = np.where(ok, 1.0 / np.where(ok, d, 1.0), -np.inf)
    return np.clip((cut - centre) / spacing + 0.5, 0.0, 1.0)


def blend_band(band: np.ndarray, locres: np.ndarray, bmap: np.ndarray | None = None, *, centre: float,
               spacing: float, bfactor: float | None = None) -> np.ndarray:
    """One band's contribution to a locally filtered map: ``band * weight(locres) * exp(-B centre^2 / 4)``.

    ``bmap`` (per voxel) or ``bfactor`` (one number) is a B in Å², RELION
    sign: amplitudes times ``exp(-B s^2 / 4)``, so B < 0 sharpens.
    """
    w = lowpass_weight(locres, centre=centre, spacing=spacing)
    if bmap is not None:
        w = w * np.exp(-np.asarray(bmap, dtype=np.float64) * centre * centre / 4.0)
    elif bfactor is not None:
        w = w * np.exp(-float(bfactor) * centre * centre / 4.0)
    return (np.asarray(band, dtype=np.float64) * w).astype(np.float32)
