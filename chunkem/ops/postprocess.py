"""RELION-style post-processing of two half maps.

Order (as ``relion_postprocess``): FSC with mask correction → average of the
halves → FSC weighting ``sqrt(2 FSC / (1 + FSC))`` → Guinier fit of
``ln(mean |F|)`` against ``s²`` → apply B → optional low-pass → inverse FFT.
The map comes back lazily for dask input; the FSC and the Guinier table are
computed (they are reductions). Spec:
``../shared/design/algorithms/01_fsc_global_resolution.md`` §3.4–3.6.

B-factor sign: **RELION** throughout (``B < 0`` sharpens; a map whose
amplitudes decay as ``exp(-B_decay s²/4)`` has a Guinier ``B = -B_decay``;
applying ``B`` multiplies amplitudes by ``exp(-B s²/4)``).
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

from ..engine import spectral
from ..errors import ParameterError
from ..kernels import filters as KF
from ..kernels import fsc as K
from ..volume import like, voxel_size
from .fsc import FSCResult, _masked, fsc

__all__ = ["PostprocessResult", "postprocess", "demo_stage"]

AUTOB_HIGHRES_PRESETS = ("relion", "to_resolution")


@dataclass
class PostprocessResult:
    """Output of :func:`postprocess`.

    Attributes
    ----------
    map
        Sharpened, FSC-weighted, low-passed full map (Volume; lazy for dask input).
    masked_map
        ``map × mask`` (``None`` without a mask).
    fsc
        The :class:`~chunkem.ops.fsc.FSCResult` used for weighting and resolution.
    resolution
        FSC = 0.143 resolution in Å (interpolated).
    bfactor
        B applied, Å², RELION sign (negative sharpens).
    bfactor_fitted
        Guinier B from the fit (``nan`` when the user forced ``bfactor``).
    guinier
        The :class:`~chunkem.kernels.fsc.GuinierFit` on the weighted average.
    lowpass
        Low-pass resolution in Å (``None`` = off).
    fsc_weights
        Weight per shell (all ones when weighting was skipped).
    guinier_tables
        ``ln(mean |F|)`` per shell: ``"input"`` (average of the halves),
        ``"weighted"`` (after FSC weighting), ``"sharpened"`` (after B and
        low-pass, the multipliers evaluated at the shell frequency).
    frequency
        Shell frequencies (1/Å) of the tables.
    warnings
        Messages (from the FSC and the fit).
    """

    map: xr.DataArray
    masked_map: xr.DataArray | None
    fsc: FSCResult
    resolution: float
    bfactor: float
    bfactor_fitted: float
    guinier: K.GuinierFit
    lowpass: float | None
    fsc_weights: np.ndarray
    guinier_tables: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    frequency: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    autob_lowres: float = 10.0
    autob_highres: float = 0.0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the maps are not included)."""

        def clean(a):
            return [None if not np.isfinite(x) else float(x) for x in np.asarray(a, dtype=np.float64)]

        return {
            "resolution_A": self.resolution,
            "bfactor_relion_A2": self.bfactor,
            "bfactor_fitted_relion_A2": None if not np.isfinite(self.bfactor_fitted) else self.bfactor_fitted,
            "bfactor_sign": "RELION: negative sharpens; amplitudes multiplied by exp(-B s^2/4)",
            "guinier_fit": {
                "intercept": self.guinier.intercept,
                "r2": self.guinier.r2,
                "n_points": self.guinier.n_points,
                "lowres_A": self.autob_lowres,
                "highres_A": self.autob_highres,
            },
            "lowpass_A": self.lowpass,
            "fsc": self.fsc.to_dict(),
            "guinier_table": {
                "frequency_inv_A": clean(self.frequency),
                "fsc_weight": clean(self.fsc_weights),
                **{f"ln_amplitude_{k}": clean(v) for k, v in self.guinier_tables.items()},
            },
            "warnings": list(self.warnings),
        }

    def plot_guinier(self, path: str | os.PathLike) -> Path:
        """PNG Guinier plot: ln(mean |F|) vs s² for each stage, the fit and its range."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from ..cli.common import atomic_write_bytes

        s2 = self.frequency**2
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        styles = {"input": ("tab:blue", "average of halves"), "weighted": ("tab:orange", "FSC-weighted"),
                  "sharpened": ("tab:red", "sharpened")}
        for key, y in self.guinier_tables.items():
            col, lab = styles.get(key, ("k", key))
            ok = np.isfinite(y) & (y > -90)
            ok[0] = False
            ax.plot(s2[ok], y[ok], ".-", color=col, label=lab, ms=3)
        g = self.guinier
        if np.isfinite(g.bfactor):
            xs = g.s2[g.weight > 0]
            if xs.size:
                xx = np.linspace(xs.min(), xs.max(), 20)
                ax.plot(xx, g.intercept + g.bfactor / 4.0 * xx, "k--", lw=1,
                        label=f"fit B = {g.bfactor:.1f} Å² (RELION sign)")
                ax.axvspan(xs.min(), xs.max(), color="0.9", zorder=0)
        ax.set_xlabel("s² (1/Å²)")
        ax.set_ylabel("ln(mean |F|)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"Guinier plot: B = {self.bfactor:.1f} Å², resolution {self.resolution:.2f} Å")
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        plt.close(fig)
        atomic_write_bytes(Path(path), buf.getvalue())
        return Path(path)


def _average_kernel(F1, F2, *, kz, ky, kx):
    return ((F1 + F2) * np.float32(0.5)).astype(np.complex64, copy=False)


def _post_kernel(F, *, kz, ky, kx, box_edge, weights, bfactor, nyquist, lowpass_shell, edge_width):
    """FSC weight (per shell) × exp(-B s²/4) (zero beyond Nyquist) × RELION low-pass."""
    s = KF.radius(kz, ky, kx)
    m = K.shell_lookup(weights, kz, ky, kx, box_edge=box_edge, outside=0.0)
    m = m * KF.bfactor_multiplier(s, bfactor=bfactor, convention="relion")
    m = np.where(s <= nyquist * (1 + 1e-9), m, 0.0)
    if lowpass_shell is not None:
        m = m * _relion_lowpass(s, box_edge=box_edge, ires=lowpass_shell, edge_width=edge_width)
    return (F * m.astype(np.float32)).astype(np.complex64, copy=False)


def _relion_lowpass(s, *, box_edge, ires, edge_width):
    """RELION's raised-cosine low-pass with edges on shell boundaries.

    1 below ``(ires - h)/L``, 0 above ``(ires + h)/L``, ``h = edge_width // 2``;
    :func:`chunkem.kernels.filters.lowpass_multiplier` with the cut-off at
    shell ``ires`` and a width of ``2h`` shells.
    """
    h = int(edge_width) // 2
    lo = max(0.0, (ires - h) / box_edge)
    hi = (ires + h) / box_edge
    if hi <= lo:
        return (s <= hi).astype(np.float64)
    return KF.lowpass_multiplier(s, cutoff=0.5 * (lo + hi), edge="cosine", width=hi - lo)


def postprocess(
    half1: xr.DataArray,
    half2: xr.DataArray,
    *,
    mask: xr.DataArray | None,
    bfactor: float | None = None,
    lowpass: float | None = None,
    autob_lowres: float = 10.0,
    autob_highres: float | str = "relion",
    skip_fsc_weighting: bool = False,
    filter_edge_width: int = 2,
    randomize_at_fsc: float = 0.8,
    seed: int = 0,
    force_mask: bool = False,
    strategy: str = "auto",
    fsc_result: FSCResult | None = None,
) -> PostprocessResult:
    """Sharpen, FSC-weight and low-pass the average of two half maps (RELION style).

    Parameters
    ----------
    half1, half2
        Aligned, unfiltered, unmasked half maps (Volumes).
    mask
        Soft mask in [0, 1] for the FSC (and the masked output), or ``None``.
    bfactor
        Force this B (Å², **RELION sign**: negative sharpens) instead of the
        Guinier fit.
    lowpass
        ``None`` (default): low-pass at the FSC = 0.143 resolution; ``0``:
        no low-pass; a number: low-pass at that resolution (Å).
    autob_lowres
        Low-resolution end of the Guinier fit, Å (default 10).
    autob_highres
        High-resolution end of the fit: ``"relion"`` (no limit; FSC
        weighting drops the shells without signal), ``"to_resolution"`` (the
        FSC = 0.143 resolution, as LocScale and Rosenthal & Henderson
        recommend) or a number in Å.
    skip_fsc_weighting
        Do not multiply by ``sqrt(2 FSC / (1 + FSC))``.
    filter_edge_width
        Width of the low-pass edge in shells (RELION default 2).
    randomize_at_fsc, seed, force_mask, strategy
        Passed to :func:`chunkem.ops.fsc.fsc`.
    fsc_result
        Reuse an already computed FSC of these halves (skips that step).

    Returns
    -------
    PostprocessResult

    Raises
    ------
    ParameterError
        No shell in the Guinier range (low-resolution map: give ``bfactor``),
        low-pass beyond Nyquist, bad preset.

    Examples
    --------
    >>> import numpy as np
    >>> from chunkem.volume import make_volume
    >>> rng = np.random.default_rng(1)
    >>> base = rng.normal(size=(32, 32, 32))
    >>> h1 = make_volume(base + 0.3 * rng.normal(size=base.shape), voxel_size=1.0)
    >>> h2 = make_volume(base + 0.3 * rng.normal(size=base.shape), voxel_size=1.0)
    >>> pp = postprocess(h1, h2, mask=None, bfactor=0.0, lowpass=0)
    >>> pp.map.shape, pp.bfactor
    ((32, 32, 32), 0.0)
    """
    vs = voxel_size(half1)
    shape = tuple(int(n) for n in half1.shape)
    L = min(n * v for n, v in zip(shape, vs))
    nyq_s = 1.0 / (2.0 * max(vs))
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = fsc_result or fsc(half1, half2, mask=mask, randomize_at_fsc=randomize_at_fsc, seed=seed,
                              force_mask=force_mask, strategy=strategy)
    notes.extend(str(w.message) for w in caught)
    res = float(r.resolution_0143)
    curve = r.fsc_final
    weights = np.ones_like(curve) if skip_fsc_weighting else K.fsc_weights(curve)

    S1 = spectral.rfft(half1, strategy=strategy)
    S2 = spectral.rfft(half2, strategy=strategy)
    avg = spectral.apply(_average_kernel, S1, S2)
    prof = spectral.radial_profile(avg)
    mean_in = prof.mean_amplitude()
    mean_w = mean_in * weights

    if isinstance(autob_highres, str):
        if autob_highres not in AUTOB_HIGHRES_PRESETS:
            raise ParameterError(f"autob_highres must be a resolution in Å or one of {AUTOB_HIGHRES_PRESETS}, "
                                 f"got {autob_highres!r}")
        highres = 0.0 if autob_highres == "relion" else res
    else:
        highres = float(autob_highres)
    fit = K.guinier_fit(prof.frequency, mean_w, lowres=autob_lowres, highres=highres,
                        min_resolution=2.0 * max(vs) * (1 - 1e-9))
    if bfactor is None:
        if not np.isfinite(fit.bfactor):
            raise ParameterError(
                f"cannot fit a Guinier B: fewer than 2 shells with signal between {autob_lowres} Å and "
                f"{highres or 2 * max(vs):.2f} Å (resolution {res:.2f} Å); give bfactor= (RELION sign)"
            )
        b_apply = float(fit.bfactor)
        b_fitted = float(fit.bfactor)
    else:
        b_apply = float(bfactor)
        b_fitted = math.nan
        if not np.isfinite(b_apply):
            raise ParameterError(f"bfactor must be finite (Å²), got {bfactor!r}")

    if lowpass is None:
        lp = res if r.crossing_0143.crossed and res < 999 else None
    elif lowpass == 0:
        lp = None
    else:
        lp = float(lowpass)
        if lp < 2.0 * max(vs) * (1 - 1e-6):
            raise ParameterError(f"lowpass={lowpass} Å is beyond Nyquist ({2 * max(vs):.3f} Å)")
    ires = K.relion_fsc_cut_shell(L, lp) if lp else None

    out_spec = spectral.apply(_post_kernel, avg, box_edge=L, weights=weights, bfactor=b_apply, nyquist=nyq_s,
                              lowpass_shell=ires, edge_width=filter_edge_width)
    chunks = None if isinstance(half1.data, np.ndarray) else half1.data.chunks
    out = spectral.irfft(out_spec, chunks=chunks)
    out = like(half1, out.data, name=(half1.name or "postprocess"))
    masked = _masked(out, mask) if mask is not None else None

    freq = prof.frequency
    mult = KF.bfactor_multiplier(freq, bfactor=b_apply, convention="relion")
    mult = np.where(freq <= nyq_s * (1 + 1e-9), mult, 0.0)
    if ires is not None:
        mult = mult * _relion_lowpass(freq, box_edge=L, ires=ires, edge_width=filter_edge_width)

    def ln(a):
        with np.errstate(divide="ignore"):
            return np.where(a > 0, np.log(np.where(a > 0, a, 1.0)), -99.0)

    tables = {"input": ln(mean_in), "weighted": ln(mean_w), "sharpened": ln(mean_w * mult)}
    return PostprocessResult(
        map=out,
        masked_map=masked,
        fsc=r,
        resolution=res,
        bfactor=b_apply,
        bfactor_fitted=b_fitted,
        guinier=fit,
        lowpass=lp,
        fsc_weights=weights,
        guinier_tables=tables,
        frequency=freq,
        autob_lowres=float(autob_lowres),
        autob_highres=float(highres),
        warnings=notes,
    )


def demo_stage(ctx: dict[str, Any]) -> dict[str, Any]:
    """Alias of :func:`chunkem.ops.fsc.demo_stage` (FSC + postprocess on the phantom)."""
    from .fsc import demo_stage as _stage

    return _stage(ctx)
