"""LocScale kernels: rolling-window radial amplitude scaling (pure numpy/scipy).

For every selected voxel ``p`` a cubic window ``[p - wn/2, p + wn/2)`` of the
experimental map and of a reference is Fourier transformed, both radially
averaged amplitude profiles are taken, the experimental window's amplitudes
are scaled by ``k(s) = |P_ref(s)| / |P_em(s)|`` (0 where that is not finite),
and the central voxel ``wn/2`` of the inverse transform is kept. Spec:
``05_locscale_and_fdr.md`` §A.

Profiles (``profile=``)
-----------------------
``"locscale2"``
    LocScale 2's binning, reproduced quirk for quirk: the bin of an rfft
    coefficient is ``floor(sqrt(i² + j² + k²))`` of its *raw array indices*
    (so negative frequencies, stored at large indices, fall beyond the last
    bin and only the positive octant is averaged), the mean ``|F|`` per bin
    is kept for bins ``0 … wn/2``. Cubic windows only.
``"exact"``
    Bins by the true spatial frequency ``|s|``: bin ``b`` holds
    ``b/L <= |s| < (b+1)/L`` with ``L`` the shortest window edge in Å;
    frequencies beyond the last bin edge (the corners) are pooled into the
    last bin (LocScale 1's ``digitize`` convention).

Both modes apply the scale factors by linear interpolation in ``|s|`` between
the bin frequencies ``s_b = b / L`` (clamped beyond the ends), as LocScale
does; transforms use ``norm="ortho"``.

Speed
-----
The per-window math is not changed, only batched: inside a block the 3-D DFT
of every window is done separably. A real FFT along x of every length-``wn``
run (all runs of the block, shared by all windows containing them), an FFT
along y of those (again shared), and only the last FFT along z is done per
selected voxel. The inverse transform is never formed: the centre voxel is a
linear function of the window's spectrum, ``Σ_b k_b G_b`` with
``G_b = Σ_s L_b(|s|) w_s (-1)^{m_z+m_y+m_x} Re F(s) / N`` (``L_b`` the linear
interpolation hat of bin ``b``, ``w_s`` the Hermitian half-space weight), so
it costs one small matrix product.

Model-free reference
--------------------
:func:`model_free_reference` builds a reference profile without a model:
the expected (Wilson) amplitude fall-off of protein from summed electron form
factors, ``T(s) = sqrt(Σ_e n_e f_e(s)²)``, times a Guinier factor whose
amplitude and local B are fitted to the window's own profile between the
Wilson cut-off (10 Å) and the resolution; the target is that curve with
``B = target_bfactor``, blended at low resolution with the window's own
profile and rolled off above the resolution (logistic blends as LocScale's
``merge_two_profiles``). B convention: **decay B** (``|F| ∝ exp(-B s²/4)``).
No trained network is involved (none is available here).

Pure numpy/scipy; no dask.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import scipy.fft
import scipy.ndimage as ndi
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import ParameterError
from .scattering import element_coefficients

__all__ = [
    "PROFILES",
    "MIN_WINDOW_VOXELS",
    "PROTEIN_COMPOSITION",
    "round_up_to_even",
    "window_voxels",
    "WindowPlan",
    "window_plan",
    "window_profiles",
    "scale_factors",
    "apply_scale_factors",
    "locscale_block",
    "expected_amplitude",
    "guinier_fit",
    "merge_profiles",
    "model_free_reference",
    "band_centres",
    "hat_multiplier",
    "band_norms",
    "fast_block",
    "fast_band_block",
]

PROFILES = ("exact", "locscale2")
MIN_WINDOW_VOXELS = 5

#: Mean atoms per residue of proteins (elements whose electron form factors
#: are summed for the expected Wilson fall-off). Hydrogens included.
PROTEIN_COMPOSITION: dict[str, float] = {"C": 5.0, "N": 1.35, "O": 1.5, "S": 0.04, "H": 7.8}


def round_up_to_even(x: float) -> int:
    """Smallest even integer ``>= x`` (``x`` rounded to 1e-6 first).

    Examples
    --------
    >>> round_up_to_even(23.8), round_up_to_even(25.0), round_up_to_even(24.0)
    (24, 26, 24)
    """
    v = round(float(x), 6)
    return int(2 * math.ceil(v / 2.0))


def window_voxels(window: float, voxel_size: float | Sequence[float]) -> tuple[int, int, int]:
    """Window edge in voxels per axis: ``window / voxel_size`` rounded up to even.

    Parameters
    ----------
    window
        Window edge in Å (LocScale default 25 Å).
    voxel_size
        Å, one number or (vz, vy, vx).

    Raises
    ------
    ParameterError
        A window of fewer than 5 voxels along an axis.

    Examples
    --------
    >>> window_voxels(25.0, 1.05)
    (24, 24, 24)
    """
    w = float(window)
    if not math.isfinite(w) or w <= 0:
        raise ParameterError(f"window must be a positive size in Å, got {window!r}")
    vs = np.broadcast_to(np.asarray(voxel_size, dtype=np.float64), (3,))
    out = tuple(round_up_to_even(w / v) for v in vs)
    if min(w / v for v in vs) < MIN_WINDOW_VOXELS:
        raise ParameterError(
            f"window {w:g} Å is smaller than {MIN_WINDOW_VOXELS} voxels at voxel size "
            f"{tuple(float(v) for v in vs)} Å; use a window of at least {MIN_WINDOW_VOXELS * float(max(vs)):.3g} Å"
        )
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------------------
# window plan: bins, interpolation hats and the centre-voxel functional


@dataclass(frozen=True, eq=False)
class WindowPlan:
    """Precomputed per-window-shape arrays (see :func:`window_plan`).

    Attributes
    ----------
    wn
        Window edge in voxels (z, y, x), even.
    voxel_size
        Å (z, y, x).
    profile
        ``"exact"`` or ``"locscale2"``.
    n_bins
        Number of profile bins.
    bin_frequency
        (n_bins,) bin frequencies in 1/Å (``b / L``; for ``"locscale2"``
        ``rfftfreq(wn) / voxel_size``).
    bin_index
        (wz, wy, wx//2+1) bin of every rfft coefficient, -1 = not used.
    frequency
        (wz, wy, wx//2+1) ``|s|`` of every coefficient in the units of
        ``bin_frequency`` used for interpolation.
    interp
        (wz, wy, wx//2+1, n_bins) linear-interpolation hats ``L_b(|s|)``
        (they sum to 1 at every coefficient).
    mean_matrix
        (ncoef, n_bins) float32: ``|F| @ mean_matrix`` = mean per bin, rows in
        the (mz, mx, my) order of the separable block transform.
    centre_matrix
        (2·ncoef, n_bins) float32: ``F.view(float32) @ centre_matrix`` = the
        per-bin parts ``G_b`` of the centre voxel, same row order.
    """

    wn: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    profile: str
    n_bins: int
    bin_frequency: np.ndarray
    bin_index: np.ndarray
    frequency: np.ndarray
    interp: np.ndarray
    mean_matrix: np.ndarray
    centre_matrix: np.ndarray

    @property
    def fshape(self) -> tuple[int, int, int]:
        """Shape of one window's rfft."""
        return (self.wn[0], self.wn[1], self.wn[2] // 2 + 1)


def _hats(x: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """Linear-interpolation weights of ``x`` on ``nodes`` (clamped): shape x.shape + (n,)."""
    n = nodes.size
    out = np.zeros(x.shape + (n,), dtype=np.float64)
    eye = np.eye(n)
    for b in range(n):
        out[..., b] = np.interp(x, nodes, eye[b])
    return out


@lru_cache(maxsize=16)
def _plan_cached(wn: tuple[int, int, int], vs: tuple[float, float, float], profile: str) -> WindowPlan:
    wz, wy, wx = wn
    fshape = (wz, wy, wx // 2 + 1)
    if profile == "locscale2":
        if not (wz == wy == wx):
            raise ParameterError(f"profile='locscale2' needs a cubic window, got {wn} voxels (use profile='exact')")
        i, j, k = np.indices(fshape)
        bins = np.floor(np.sqrt(i * i + j * j + k * k)).astype(np.int64)
        nb = wz // 2 + 1
        bins[bins >= nb] = -1
        a = float(np.mean(vs))
        # LocScale works in cycles/voxel; keep its numbers exactly, then express in 1/Å
        fz = np.fft.fftfreq(wz)
        fy = np.fft.fftfreq(wy)
        fx = np.fft.rfftfreq(wx)
        freq = np.sqrt(fz[:, None, None] ** 2 + fy[None, :, None] ** 2 + fx[None, None, :] ** 2)
        nodes = np.fft.rfftfreq(wz)
        bin_frequency = nodes / a
        interp = _hats(freq, nodes)
        freq_out = freq / a
    elif profile == "exact":
        fz = np.fft.fftfreq(wz, d=vs[0])
        fy = np.fft.fftfreq(wy, d=vs[1])
        fx = np.fft.rfftfreq(wx, d=vs[2])
        freq = np.sqrt(fz[:, None, None] ** 2 + fy[None, :, None] ** 2 + fx[None, None, :] ** 2)
        L = min(n * v for n, v in zip(wn, vs))
        nb = min(wn) // 2 + 1
        nodes = np.arange(nb) / L
        bins = np.minimum(np.floor(freq * L + 1e-9).astype(np.int64), nb - 1)
        bin_frequency = nodes
        interp = _hats(freq, nodes)
        freq_out = freq
    else:
        raise ParameterError(f"profile must be one of {PROFILES}, got {profile!r}")
    counts = np.bincount(bins[bins >= 0].ravel(), minlength=nb).astype(np.float64)
    # mean matrix in (mz, mx, my) order
    onehot = np.zeros(fshape + (nb,), dtype=np.float64)
    zz, yy, xx = np.nonzero(bins >= 0)
    onehot[zz, yy, xx, bins[zz, yy, xx]] = 1.0
    onehot /= np.where(counts > 0, counts, 1.0)
    mean_matrix = onehot.transpose(0, 2, 1, 3).reshape(-1, nb).astype(np.float32)
    # centre voxel functional: Hermitian half-space weights and the (-1)^m phase of index wn/2
    w = np.full(fshape, 2.0)
    w[:, :, 0] = 1.0
    if wx % 2 == 0:
        w[:, :, -1] = 1.0
    i, j, k = np.indices(fshape)
    sign = np.where((i + j + k) % 2 == 0, 1.0, -1.0)
    c = interp * (w * sign / float(wz * wy * wx))[..., None]
    c = c.transpose(0, 2, 1, 3).reshape(-1, nb)
    centre = np.zeros((c.shape[0], 2, nb), dtype=np.float32)
    centre[:, 0] = c  # only Re F contributes
    centre_matrix = centre.reshape(-1, nb)
    for arr in (bins, freq_out, interp, mean_matrix, centre_matrix, bin_frequency):
        arr.setflags(write=False)
    return WindowPlan(
        wn=wn,
        voxel_size=vs,
        profile=profile,
        n_bins=nb,
        bin_frequency=bin_frequency,
        bin_index=bins,
        frequency=freq_out,
        interp=interp,
        mean_matrix=mean_matrix,
        centre_matrix=centre_matrix,
    )


def window_plan(
    wn: int | Sequence[int], voxel_size: float | Sequence[float], profile: str = "exact"
) -> WindowPlan:
    """Bins, interpolation hats and the centre-voxel functional of one window shape (cached).

    Parameters
    ----------
    wn
        Window edge in voxels (one even number or (wz, wy, wx)).
    voxel_size
        Å, one number or (vz, vy, vx).
    profile
        ``"exact"`` or ``"locscale2"`` (see the module notes).
    """
    w = tuple(int(n) for n in np.broadcast_to(np.asarray(wn), (3,)))
    if any(n % 2 for n in w) or min(w) < 6:
        raise ParameterError(f"window must be an even number of voxels >= 6 per axis, got {w}")
    vs = tuple(float(v) for v in np.broadcast_to(np.asarray(voxel_size, dtype=np.float64), (3,)))
    return _plan_cached(w, vs, str(profile))  # type: ignore[arg-type]


def window_profiles(windows: np.ndarray, plan: WindowPlan) -> np.ndarray:
    """Radial mean-amplitude profiles of a stack of windows (reference path, one rfftn each).

    Parameters
    ----------
    windows
        (n, wz, wy, wx) or (wz, wy, wx) real array.
    plan
        From :func:`window_plan`.

    Returns
    -------
    ndarray
        (n, n_bins) (or (n_bins,)) mean ``|F|`` per bin, ``norm="ortho"``.
    """
    w = np.asarray(windows)
    single = w.ndim == 3
    if single:
        w = w[None]
    F = np.abs(scipy.fft.rfftn(np.asarray(w, dtype=np.float64), axes=(1, 2, 3), norm="ortho"))
    bins = plan.bin_index.ravel()
    use = bins >= 0
    counts = np.bincount(bins[use], minlength=plan.n_bins)
    sums = np.stack([np.bincount(bins[use], weights=f.ravel()[use], minlength=plan.n_bins) for f in F])
    prof = sums / np.where(counts > 0, counts, 1)
    return prof[0] if single else prof


def scale_factors(em_profile: np.ndarray, ref_profile: np.ndarray) -> np.ndarray:
    """``|ref| / |em|`` per bin; 0 where the ratio is not finite (``em = 0``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.abs(np.asarray(ref_profile)) / np.abs(np.asarray(em_profile))
    return np.where(np.isfinite(k), k, 0.0)


def apply_scale_factors(window: np.ndarray, scale: np.ndarray, plan: WindowPlan) -> np.ndarray:
    """Scale one window's amplitudes by interpolated ``scale`` (n_bins,) and transform back."""
    F = scipy.fft.rfftn(np.asarray(window, dtype=np.float64), norm="ortho")
    k = plan.interp @ np.asarray(scale, dtype=np.float64)
    return scipy.fft.irfftn(F * k, s=plan.wn, norm="ortho")


# --------------------------------------------------------------------------------------
# batched block kernel


def _stage_xy(block: np.ndarray, wn: tuple[int, int, int], ny: int, nx: int) -> np.ndarray:
    """DFT along x then y of every window-row of ``block``: (Z, ny, nx, wx//2+1, wy) complex64."""
    wz, wy, wx = wn
    a = scipy.fft.rfft(sliding_window_view(block, wx, axis=2)[:, :, :nx], axis=-1)  # Z, Y, nx, kx
    return scipy.fft.fft(sliding_window_view(a, wy, axis=1)[:, :ny], axis=-1)  # Z, ny, nx, kx, ky


def _window_spectra(stage: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray,
                    wn: tuple[int, int, int]) -> np.ndarray:
    """Full window spectra (n, ncoef) in (mz, mx, my) order (unnormalised) from the x/y stage."""
    g = stage[z[:, None] + np.arange(wn[0]), y[:, None], x[:, None]]  # n, dz, kx, ky
    return scipy.fft.fft(g, axis=1, overwrite_x=True).reshape(len(z), -1)


def _direct_spectra(region: np.ndarray, z: np.ndarray, y: np.ndarray, x: np.ndarray,
                    wn: tuple[int, int, int]) -> np.ndarray:
    """Window spectra by one rfftn per window, in the layout of :func:`_window_spectra`.

    ``region`` is the tile plus its halo; ``z, y, x`` are the window corners in it.
    """
    wins = sliding_window_view(region, wn)[z, y, x]  # n, wz, wy, wx
    F = scipy.fft.rfftn(wins, axes=(1, 2, 3))  # n, mz, my, mx
    return np.ascontiguousarray(F.transpose(0, 1, 3, 2)).reshape(len(z), -1)


def _selected(mask: np.ndarray, wn: tuple[int, int, int], threshold: float) -> np.ndarray:
    """Boolean map of the voxels to process: mask > threshold and the window inside the block."""
    sel = np.asarray(mask) > threshold
    out = np.zeros_like(sel)
    h = [n // 2 for n in wn]
    inner = tuple(slice(hh, s - hh + 1) for hh, s in zip(h, sel.shape))
    if all(sl.start < sl.stop for sl in inner):
        out[inner] = sel[inner]
    return out


def locscale_block(
    em: np.ndarray,
    ref: np.ndarray | None,
    mask: np.ndarray,
    *,
    wn: Sequence[int],
    voxel_size: Sequence[float],
    profile: str = "exact",
    mask_threshold: float = 0.5,
    model_free: dict | None = None,
    tile: Sequence[int] = (32, 24, 24),
    batch: int = 512,
    bfactor_out: np.ndarray | None = None,
) -> np.ndarray:
    """Windowed amplitude scaling of every selected voxel of a block.

    Parameters
    ----------
    em
        Experimental map block (halo included).
    ref
        Reference map block of the same shape, or ``None`` with ``model_free``.
    mask
        Mask block; voxels with ``mask > mask_threshold`` whose whole window
        ``[p - wn/2, p + wn/2)`` lies inside the block are processed.
    wn
        Window edge in voxels (z, y, x), even.
    voxel_size
        Å (z, y, x).
    profile
        ``"exact"`` or ``"locscale2"``.
    mask_threshold
        See ``mask``.
    model_free
        Keyword arguments of :func:`model_free_reference` (``resolution``,
        ``target_bfactor`` ...): build the reference profile of each window
        from its own profile instead of from ``ref``.
    tile
        Sub-block edge (z, y, x) of the separable transform (memory control:
        about ``(tz + wz)·ty·tx·wy·(wx/2+1)·8`` bytes per map).
    batch
        Windows transformed at once.
    bfactor_out
        Optional float32 array of the block's shape receiving the fitted local
        B (decay, Å²) in model-free mode.

    Returns
    -------
    ndarray
        float32 block: scaled centre values at processed voxels, 0 elsewhere.
    """
    wn_t = tuple(int(n) for n in np.broadcast_to(np.asarray(wn), (3,)))
    plan = window_plan(wn_t, voxel_size, profile)
    em = np.asarray(em, dtype=np.float32)
    if ref is None and model_free is None:
        raise ParameterError("locscale_block: give a reference block or model_free parameters")
    refa = None if ref is None else np.asarray(ref, dtype=np.float32)
    out = np.zeros(em.shape, dtype=np.float32)
    sel = _selected(mask, wn_t, mask_threshold)
    if not sel.any():
        return out
    wz, wy, wx = wn_t
    h = (wz // 2, wy // 2, wx // 2)
    zc, yc, xc = np.nonzero(sel)
    lo = (zc.min(), yc.min(), xc.min())
    hi = (zc.max() + 1, yc.max() + 1, xc.max() + 1)
    tz, ty, tx = (int(t) for t in tile)
    norm = np.float32(1.0 / math.sqrt(wz * wy * wx))
    for z0 in range(lo[0], hi[0], tz):
        for y0 in range(lo[1], hi[1], ty):
            for x0 in range(lo[2], hi[2], tx):
                sub = sel[z0 : z0 + tz, y0 : y0 + ty, x0 : x0 + tx]
                if not sub.any():
                    continue
                nz_, ny_, nx_ = sub.shape
                region = (
                    slice(z0 - h[0], z0 + nz_ + h[0] - 1),
                    slice(y0 - h[1], y0 + ny_ + h[1] - 1),
                    slice(x0 - h[2], x0 + nx_ + h[2] - 1),
                )
                zs, ys, xs = np.nonzero(sub)
                # shared x/y passes pay off when enough windows share them; else transform each window
                shared = (nz_ + wz) * nx_ * (0.5 * (ny_ + wy) + ny_ * (wx // 2 + 1))
                direct = len(zs) * wz * wy < shared
                if direct:
                    src_em, src_ref = em[region], (None if refa is None else refa[region])
                else:
                    src_em = _stage_xy(em[region], wn_t, ny_, nx_)
                    src_ref = None if refa is None else _stage_xy(refa[region], wn_t, ny_, nx_)
                spectra = _direct_spectra if direct else _window_spectra
                for s in range(0, len(zs), batch):
                    z, y, x = zs[s : s + batch], ys[s : s + batch], xs[s : s + batch]
                    Fe = spectra(src_em, z, y, x, wn_t)
                    pe = (np.abs(Fe) @ plan.mean_matrix) * norm
                    if src_ref is not None:
                        Fr = spectra(src_ref, z, y, x, wn_t)
                        pr = (np.abs(Fr) @ plan.mean_matrix) * norm
                    else:
                        pr, bloc = model_free_reference(pe, plan.bin_frequency, **(model_free or {}))
                        if bfactor_out is not None:
                            bfactor_out[z + z0, y + y0, x + x0] = bloc
                    k = scale_factors(pe, pr).astype(np.float32)
                    g = Fe.view(np.float32) @ plan.centre_matrix
                    out[z + z0, y + y0, x + x0] = np.sum(k * g, axis=1)
    return out


# --------------------------------------------------------------------------------------
# model-free reference


@lru_cache(maxsize=8)
def _composition_coefficients(items: tuple[tuple[str, float], ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n, a, b = [], [], []
    for el, count in items:
        ca, cb = element_coefficients(el, "electron")
        n.append(float(count))
        a.append(ca)
        b.append(cb)
    return np.asarray(n), np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)


def expected_amplitude(
    s: np.ndarray, *, composition: dict[str, float] | None = None
) -> np.ndarray:
    """Expected (Wilson) amplitude of protein at spatial frequency ``s`` (1/Å), per residue.

    ``T(s) = sqrt(Σ_e n_e f_e(s)²)`` with the electron form factors
    ``f_e`` (C4322 table via gemmi, ``f(s) = Σ a_i exp(-b_i s²/4)`` in terms of
    the spatial frequency) and ``n_e`` atoms of element ``e`` per residue
    (:data:`PROTEIN_COMPOSITION`). Atoms at B = 0.
    """
    comp = composition or PROTEIN_COMPOSITION
    n, a, b = _composition_coefficients(tuple(sorted(comp.items())))
    s2 = np.asarray(s, dtype=np.float64)[..., None, None] ** 2
    f = np.sum(a * np.exp(-b * s2 / 4.0), axis=-1)  # (..., elements)
    return np.sqrt(np.sum(n * f * f, axis=-1))


def guinier_fit(
    profiles: np.ndarray,
    frequency: np.ndarray,
    *,
    d_max: float,
    d_min: float,
    theory: np.ndarray | None = None,
    valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares fit ``ln P(s) - ln T(s) = ln A - B s²/4`` over ``d_min <= 1/s <= d_max``.

    Parameters
    ----------
    profiles
        (n, n_bins) amplitude profiles.
    frequency
        (n_bins,) 1/Å.
    d_max, d_min
        Fit range in Å (``d_max`` the low-resolution end, e.g. the 10 Å Wilson
        cut-off; ``d_min`` the resolution).
    theory
        (n_bins,) expected shape ``T(s)`` (default 1: a plain Guinier fit).
    valid
        Optional (n, n_bins) boolean: bins each profile may use (with the
        range; non-positive values are always skipped).

    Returns
    -------
    (B, lnA)
        Arrays of shape (n,): decay B in Å² and the log amplitude; NaN where
        fewer than 2 usable bins remain.

    Raises
    ------
    ParameterError
        Fewer than 2 bins in the range at all.
    """
    f = np.asarray(frequency, dtype=np.float64)
    with np.errstate(divide="ignore"):
        d = np.where(f > 0, 1.0 / np.where(f > 0, f, 1.0), np.inf)
    sel = (d >= d_min - 1e-9) & (d <= d_max + 1e-9)
    if sel.sum() < 2:
        raise ParameterError(
            f"the Guinier fit between {d_max:g} and {d_min:g} Å has {int(sel.sum())} profile bin(s) "
            f"(bin spacing {f[1] if f.size > 1 else float('nan'):.3g} 1/Å); use a larger window or a finer resolution"
        )
    P = np.atleast_2d(np.asarray(profiles, dtype=np.float64))[:, sel]
    t = np.ones(sel.sum()) if theory is None else np.asarray(theory, dtype=np.float64)[sel]
    w = P > 0
    if valid is not None:
        w &= np.atleast_2d(np.asarray(valid, dtype=bool))[:, sel]
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(w, np.log(np.where(w, P, 1.0)) - np.log(t), 0.0)
    x = f[sel] ** 2
    wf = w.astype(np.float64)
    n = wf.sum(axis=1)
    sx = wf @ x
    sy = (wf * y).sum(axis=1)
    sxx = wf @ (x * x)
    sxy = (wf * y) @ x
    den = n * sxx - sx * sx
    ok = (n >= 2) & (den > 1e-12 * np.maximum(n * sxx, 1e-300))
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(ok, (n * sxy - sx * sy) / np.where(ok, den, 1.0), np.nan)
        lnA = np.where(ok, (sy - slope * sx) / np.where(ok, n, 1.0), np.nan)
    return -4.0 * slope, lnA


def merge_profiles(p_low: np.ndarray, p_high: np.ndarray, frequency: np.ndarray, *, d_cut: float,
                   smooth: float) -> np.ndarray:
    """Logistic blend: ``w p_low + (1 - w) p_high``, ``w = 1 / (1 + exp(smooth (d_cut - d)))``.

    ``d = 1/s`` in Å; ``p_low`` dominates at resolutions coarser than
    ``d_cut`` (LocScale's ``merge_two_profiles``).
    """
    f = np.asarray(frequency, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore"):
        d = np.where(f > 0, 1.0 / np.where(f > 0, f, 1.0), np.inf)
        w = 1.0 / (1.0 + np.exp(np.clip(smooth * (d_cut - d), -700, 700)))
    return w * p_low + (1.0 - w) * p_high


def model_free_reference(
    profiles: np.ndarray,
    frequency: np.ndarray,
    *,
    resolution: float,
    target_bfactor: float = 20.0,
    wilson_cutoff: float = 10.0,
    noise: np.ndarray | None = None,
    smooth_low: float = 1.0,
    smooth_high: float = 10.0,
    composition: dict[str, float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference profiles from expected scattering with a locally fitted B (no model).

    For each profile ``P``:

    1. signal ``S = sqrt(max(P² - N², 0))`` with ``N`` the noise profile
       (``S = P`` without one);
    2. fit ``ln S - ln T = ln A - B_loc s²/4`` between ``wilson_cutoff`` and
       ``resolution`` over the bins where ``S > N`` (all bins without noise)
       (:func:`guinier_fit`, ``T`` from :func:`expected_amplitude`);
    3. target ``A T(s) exp(-target_bfactor s²/4) · W(s)``, with the local
       Wiener factor ``W = SNR / (1 + SNR)`` of the *fitted* signal,
       ``SNR = (A T(s) exp(-B_loc s²/4))² / N²`` (1 without a noise profile),
       so that shells where the window's signal has faded are not amplified;
    4. blended with ``P`` itself at resolutions coarser than
       ``wilson_cutoff`` (logistic steepness ``smooth_low``) and rolled off to
       0 above ``resolution`` (steepness ``smooth_high``), as LocScale's
       ``merge_two_profiles``.

    Parameters
    ----------
    profiles
        (n, n_bins) amplitude profiles (any common scale).
    frequency
        (n_bins,) bin frequencies, 1/Å.
    resolution
        Å; the fit's high-resolution end and the roll-off point.
    target_bfactor
        Decay B (Å²) of the reference; each window is sharpened by
        ``B_loc - target_bfactor``.
    wilson_cutoff
        Å, the fit's low-resolution end (Wilson regime starts near 10 Å).
    noise
        (n_bins,) noise amplitude profile on the same scale (e.g. from solvent
        windows), or None.

    Returns
    -------
    (reference, B_loc)
        (n, n_bins) reference profiles and (n,) local decay B (Å², NaN where
        the fit had fewer than 2 usable bins: those windows keep their own
        profile, times the Wiener factor).
    """
    P = np.atleast_2d(np.asarray(profiles, dtype=np.float64))
    f = np.asarray(frequency, dtype=np.float64)
    T = expected_amplitude(f, composition=composition)
    if noise is not None:
        N2 = np.asarray(noise, dtype=np.float64)[None, :] ** 2
        S2 = P * P - N2
        # fit only the shells where the window clearly has signal (SNR > 1)
        B, lnA = guinier_fit(np.sqrt(np.maximum(S2, 0.0)), f, d_max=wilson_cutoff, d_min=resolution, theory=T,
                             valid=S2 > N2)
    else:
        N2 = None
        B, lnA = guinier_fit(P, f, d_max=wilson_cutoff, d_min=resolution, theory=T)
    ok = np.isfinite(B)
    la = np.where(ok, lnA, 0.0)
    Bs = np.where(ok, B, 0.0)
    lnT = np.log(T)[None, :]
    target = np.exp(la[:, None] + lnT - float(target_bfactor) * f[None, :] ** 2 / 4.0)
    if N2 is not None:
        # Wiener factor from the fitted (smooth) signal model, not the noisy per-shell difference
        sig2 = np.exp(2.0 * (la[:, None] + lnT - Bs[:, None] * f[None, :] ** 2 / 4.0))
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.where(N2 > 0, sig2 / np.where(N2 > 0, N2, 1.0), np.inf)
        W = np.where(np.isfinite(snr), snr / (1.0 + snr), 1.0)
    else:
        W = np.ones_like(P)
    target = np.where(ok[:, None], target * W, P)
    ref = merge_profiles(P, target, f, d_cut=wilson_cutoff, smooth=smooth_low)
    ref = merge_profiles(ref, np.zeros_like(ref), f, d_cut=resolution, smooth=smooth_high)
    return ref, np.where(ok, B, np.nan)


# --------------------------------------------------------------------------------------
# fast formulation: band-pass maps + windowed band energies


def band_centres(wn: Sequence[int], voxel_size: Sequence[float]) -> np.ndarray:
    """Frequencies (1/Å) of the ``min(wn)//2 + 1`` bands of the fast mode: ``b / L``, ``L`` the shortest window edge (Å)."""
    w = np.broadcast_to(np.asarray(wn), (3,))
    v = np.broadcast_to(np.asarray(voxel_size, dtype=np.float64), (3,))
    L = float(np.min(w * v))
    return np.arange(int(np.min(w)) // 2 + 1) / L


def band_norms(wn: Sequence[int], voxel_size: Sequence[float]) -> np.ndarray:
    """Per-band normalisation of the fast mode: ``Σ_s L_b(|s|)² / N`` over one window's DFT grid.

    A window's band energy ``mean(band_b²)`` divided by it is the mean
    ``|F|²`` (``norm="ortho"``) of the window's coefficients in band ``b``, so
    ``sqrt(E_b / norm_b)`` is on the scale of the exact mode's profiles.
    """
    w = tuple(int(n) for n in np.broadcast_to(np.asarray(wn), (3,)))
    v = tuple(float(x) for x in np.broadcast_to(np.asarray(voxel_size, dtype=np.float64), (3,)))
    centres = band_centres(w, v)
    kz = np.fft.fftfreq(w[0], d=v[0])[:, None, None]
    ky = np.fft.fftfreq(w[1], d=v[1])[None, :, None]
    kx = np.fft.fftfreq(w[2], d=v[2])[None, None, :]
    srad = np.sqrt(kz * kz + ky * ky + kx * kx)
    n = float(np.prod(w))
    return np.array([np.sum(hat_multiplier(srad, centres, b) ** 2) / n for b in range(len(centres))])


def window_band_amplitudes(windows: np.ndarray, wn: Sequence[int], voxel_size: Sequence[float]) -> np.ndarray:
    """Fast-mode amplitude per band of a stack of (noise) windows.

    The square root of the band energy ``mean(band_b²)`` that each hat band
    would have, averaged over the windows, divided by :func:`band_norms`:
    the ``sqrt(E_b / norm_b)`` scale of the fast mode's local profiles.

    Parameters
    ----------
    windows
        ``(n, wz, wy, wx)`` real windows (``wn`` voxels each).
    wn, voxel_size
        Window edge in voxels and voxel size (Å), per axis.
    """
    w = tuple(int(n) for n in np.broadcast_to(np.asarray(wn), (3,)))
    v = tuple(float(x) for x in np.broadcast_to(np.asarray(voxel_size, dtype=np.float64), (3,)))
    centres = band_centres(w, v)
    F = scipy.fft.rfftn(np.asarray(windows, dtype=np.float64), axes=(1, 2, 3))
    kz = np.fft.fftfreq(w[0], d=v[0])[:, None, None]
    ky = np.fft.fftfreq(w[1], d=v[1])[None, :, None]
    kx = np.fft.rfftfreq(w[2], d=v[2])[None, None, :]
    srad = np.sqrt(kz * kz + ky * ky + kx * kx)
    hw = np.full(srad.shape, 2.0)  # half-space: count each Friedel pair twice …
    hw[:, :, 0] = 1.0  # … except the self-conjugate planes
    if w[2] % 2 == 0:
        hw[:, :, -1] = 1.0
    nw = float(np.prod(w))
    power = np.mean(np.abs(F) ** 2, axis=0) * hw / (nw * nw)
    e = np.array([np.sum(power * hat_multiplier(srad, centres, k) ** 2) for k in range(len(centres))])
    return np.sqrt(e / band_norms(w, v))


def hat_multiplier(s: np.ndarray, centres: np.ndarray, band: int) -> np.ndarray:
    """Linear-interpolation hat of ``band`` on equally spaced ``centres`` (``b·Δ``) at ``|s|``.

    ``max(0, 1 - |s/Δ - b|)``, with the last band held at 1 beyond its centre
    (clamped ends, as ``numpy.interp``); the hats sum to 1 everywhere.
    """
    n = len(centres)
    step = float(centres[1] - centres[0]) if n > 1 else 1.0
    t = np.asarray(s, dtype=np.float64) / step - band
    out = np.clip(1.0 - np.abs(t), 0.0, 1.0)
    if band == n - 1:
        out = np.where(t > 0, 1.0, out)
    return out


def fast_block(
    *bands: np.ndarray,
    n_bins: int,
    wn: Sequence[int],
    voxel_size: Sequence[float],
    frequency: np.ndarray,
    mask_threshold: float = 0.5,
    model_free: dict | None = None,
) -> np.ndarray:
    """Combine band-pass maps with windowed band energies (the ``fast`` mode kernel).

    Parameters
    ----------
    bands
        ``n_bins`` band maps of the experimental map (hat band-passes, they sum
        to the map), then ``n_bins`` band maps of the reference (absent with
        ``model_free``), then the mask block.
    n_bins
        Number of bands.
    wn
        Window edge in voxels (z, y, x), even: local band energies are
        ``mean(band²)`` over the same cube ``[p - wn/2, p + wn/2)`` as the
        exact mode's window.
    voxel_size
        Å (z, y, x).
    frequency
        (n_bins,) band centre frequencies, 1/Å.
    mask_threshold
        Voxels with mask above it whose window lies inside the block are
        processed; others are 0.
    model_free
        Keyword arguments of :func:`model_free_reference`: the reference
        profile comes from the local em profile itself.

    Returns
    -------
    ndarray
        float32 ``Σ_b k_b · band_em,b`` at processed voxels, with
        ``k_b = P_ref,b / P_em,b`` and ``P_b = sqrt(E_b / norm_b)``
        (:func:`band_norms`; ``P_ref`` from :func:`model_free_reference` in
        model-free mode).
    """
    wn_t = tuple(int(n) for n in np.broadcast_to(np.asarray(wn), (3,)))
    nref = 0 if model_free is not None else n_bins
    if len(bands) != n_bins + nref + 1:
        raise ParameterError(f"fast_block: expected {n_bins + nref + 1} blocks, got {len(bands)}")
    mask = bands[-1]
    out = np.zeros(mask.shape, dtype=np.float32)
    sel = _selected(mask, wn_t, mask_threshold)
    if not sel.any():
        return out
    # work on the bounding box of the selected voxels plus half a window
    zc, yc, xc = np.nonzero(sel)
    box = tuple(
        slice(max(0, int(c.min()) - w // 2), min(n, int(c.max()) + w // 2 + 1))
        for c, w, n in zip((zc, yc, xc), wn_t, sel.shape)
    )
    idx_box = (zc - box[0].start, yc - box[1].start, xc - box[2].start)
    idx = (zc, yc, xc)
    # even-size uniform filter: output i averages input[i - w//2 : i + w//2], the exact window
    em_e = np.empty((len(zc), n_bins), dtype=np.float64)
    ref_e = np.empty_like(em_e) if nref else None
    em_b = np.empty((len(zc), n_bins), dtype=np.float64)
    for b in range(n_bins):
        band = np.asarray(bands[b][box], dtype=np.float32)
        em_b[:, b] = band[idx_box]
        em_e[:, b] = ndi.uniform_filter(band * band, size=wn_t, mode="constant")[idx_box]
        if nref:
            rb = np.asarray(bands[n_bins + b][box], dtype=np.float32)
            ref_e[:, b] = ndi.uniform_filter(rb * rb, size=wn_t, mode="constant")[idx_box]  # type: ignore[index]
    norms = band_norms(wn_t, voxel_size)[None, :]
    pe = np.sqrt(np.maximum(em_e, 0.0) / norms)
    if nref:
        pr = np.sqrt(np.maximum(ref_e, 0.0) / norms)  # type: ignore[operator]
    else:
        pr, _ = model_free_reference(pe, frequency, **(model_free or {}))
    k = scale_factors(pe, pr)
    acc = np.sum(k * em_b, axis=1)
    out[idx] = acc.astype(np.float32)
    return out


def fast_band_block(
    em_band: np.ndarray,
    ref_band: np.ndarray,
    mask: np.ndarray,
    *,
    wn: Sequence[int],
    mask_threshold: float = 0.5,
) -> np.ndarray:
    """One band of the fast mode with a reference: ``sqrt(E_ref / E_em) · band_em`` at processed voxels.

    With a reference map the scale of band ``b`` depends on band ``b`` alone,
    so the bands can be processed one at a time and summed
    (``Σ_b fast_band_block(em_b, ref_b, mask) == fast_block(*em, *ref, mask)``);
    peak memory then holds a few band maps instead of all of them.
    """
    wn_t = tuple(int(n) for n in np.broadcast_to(np.asarray(wn), (3,)))
    out = np.zeros(np.shape(mask), dtype=np.float32)
    sel = _selected(mask, wn_t, mask_threshold)
    if not sel.any():
        return out
    zc, yc, xc = np.nonzero(sel)
    box = tuple(
        slice(max(0, int(c.min()) - w // 2), min(n, int(c.max()) + w // 2 + 1))
        for c, w, n in zip((zc, yc, xc), wn_t, sel.shape)
    )
    idx_box = (zc - box[0].start, yc - box[1].start, xc - box[2].start)
    e = np.asarray(em_band[box], dtype=np.float32)
    r = np.asarray(ref_band[box], dtype=np.float32)
    ee = ndi.uniform_filter(e * e, size=wn_t, mode="constant")[idx_box].astype(np.float64)
    er = ndi.uniform_filter(r * r, size=wn_t, mode="constant")[idx_box].astype(np.float64)
    k = scale_factors(np.sqrt(np.maximum(ee, 0.0)), np.sqrt(np.maximum(er, 0.0)))
    out[zc, yc, xc] = (k * e[idx_box]).astype(np.float32)
    return out
