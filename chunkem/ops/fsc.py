"""Fourier shell correlation with RELION's mask correction.

``fsc(half1, half2, mask=...)`` computes the unmasked, masked,
phase-randomised-masked and corrected FSC curves (Chen et al. 2013) and the
resolution at FSC = 0.143 and 0.5. All transforms and shell sums go through
:mod:`chunkem.engine.spectral`; the math lives in :mod:`chunkem.kernels.fsc`.
Spec: ``../shared/design/algorithms/01_fsc_global_resolution.md``.

Shells follow the conventions (§2): shell ``i = floor(|s|·L + 0.5)`` with
``L`` the shortest box edge in Å; for cubic boxes this is RELION's indexing
and the numbers match RELION; for non-cubic boxes and anisotropic voxels the
shells are spherical in physical 1/Å.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from ..engine import spectral
from ..errors import DataValueError, ParameterError
from ..kernels import fsc as K
from ..volume import check_aligned, check_independent, like, validate_volume, voxel_size

__all__ = ["FSCResult", "fsc", "demo_stage"]


@dataclass
class FSCResult:
    """FSC curves per shell and the resolutions they give.

    Attributes
    ----------
    frequency
        Shell frequency ``i / L`` in 1/Å.
    resolution
        Shell resolution ``L / i`` in Å (``inf`` for shell 0).
    count
        Fourier voxels per shell (rfft half-space, weighted as the sums).
    fsc_unmasked
        FSC of the raw halves.
    fsc_masked, fsc_randomized, fsc_corrected
        With a mask: FSC of the masked halves, of the masked phase-randomised
        halves, and the corrected curve (``None`` / unmasked without a mask).
    fsc_final
        The curve the resolution comes from (corrected with a mask, unless the
        mask looked wrong and ``force_mask`` was False, see ``warnings``).
    randomize_at
        First phase-randomised shell (``None`` without a mask).
    resolution_0143, resolution_05
        Interpolated resolution (Å) where ``fsc_final`` first drops below
        0.143 / 0.5 (first-crossing rule, see
        :func:`chunkem.kernels.fsc.resolution_crossing`).
    crossing_0143, crossing_05
        Full crossing records (RELION's whole-shell value, shell number...).
    part_fsc
        cisTEM-style part-FSC of ``fsc_final`` (with a mask), else ``None``.
    box_edge
        ``L`` in Å.
    voxel_size
        (vz, vy, vx) Å.
    sums
        The engine's shell sums per curve (``"unmasked"``, ``"masked"``,
        ``"randomized"``), for re-binning onto another program's shells
        (count and the FSC sums; ``sum_abs_f1`` is not computed here and is 0).
    warnings
        Sanity-check messages.
    """

    frequency: np.ndarray
    resolution: np.ndarray
    count: np.ndarray
    fsc_unmasked: np.ndarray
    fsc_masked: np.ndarray | None
    fsc_randomized: np.ndarray | None
    fsc_corrected: np.ndarray
    fsc_final: np.ndarray
    randomize_at: int | None
    resolution_0143: float
    resolution_05: float
    crossing_0143: K.Crossing
    crossing_05: K.Crossing
    part_fsc: np.ndarray | None
    box_edge: float
    voxel_size: tuple[float, float, float]
    sums: dict[str, spectral.ShellSums] = field(default_factory=dict, repr=False)
    warnings: list[str] = field(default_factory=list)

    # -- reports -------------------------------------------------------------
    def columns(self) -> dict[str, np.ndarray]:
        """The per-shell table as named columns (those that exist)."""
        cols: dict[str, np.ndarray] = {
            "shell": np.arange(self.frequency.size),
            "frequency_inv_A": self.frequency,
            "resolution_A": self.resolution,
            "count": self.count,
            "fsc_unmasked": self.fsc_unmasked,
        }
        if self.fsc_masked is not None:
            cols["fsc_masked"] = self.fsc_masked
            cols["fsc_randomized_masked"] = self.fsc_randomized  # type: ignore[assignment]
            cols["fsc_corrected"] = self.fsc_corrected
        if self.part_fsc is not None:
            cols["part_fsc"] = self.part_fsc
        return cols

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary plus the curves."""
        return {
            "resolution_0143_A": self.resolution_0143,
            "resolution_05_A": self.resolution_05,
            "crossing_0143": self.crossing_0143.to_dict(),
            "crossing_05": self.crossing_05.to_dict(),
            "randomize_at_shell": self.randomize_at,
            "randomize_at_A": (self.box_edge / self.randomize_at) if self.randomize_at else None,
            "box_edge_A": self.box_edge,
            "voxel_size_A": list(self.voxel_size),
            "warnings": list(self.warnings),
            "curves": {k: [None if not np.isfinite(x) else float(x) for x in v] for k, v in self.columns().items()},
        }

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """The per-shell table as CSV text; also written (atomically) to ``path`` if given."""
        cols = self.columns()
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(list(cols))
        for row in zip(*cols.values()):
            w.writerow([_fmt(x) for x in row])
        text = buf.getvalue()
        if path is not None:
            from ..cli.common import atomic_write_bytes

            atomic_write_bytes(Path(path), text.encode())
        return text

    def plot(self, path: str | os.PathLike, *, title: str | None = None) -> Path:
        """PNG plot: the curves against 1/Å, the 0.143 line and the resolution marked."""
        # Figure + Agg canvas directly: no pyplot (lighter import, no global state)
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from ..cli.common import atomic_write_bytes

        s = self.frequency
        fig = Figure(figsize=(7, 4.5), dpi=110)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.plot(s, self.fsc_unmasked, label="unmasked", color="tab:blue")
        if self.fsc_masked is not None:
            ax.plot(s, self.fsc_masked, label="masked", color="tab:orange")
            ax.plot(s, self.fsc_randomized, label="phase-randomised masked", color="tab:gray", ls="--")
            ax.plot(s, self.fsc_corrected, label="corrected", color="tab:red", lw=2)
        ax.axhline(0.143, color="k", lw=0.8, ls=":")
        ax.axhline(0.5, color="k", lw=0.6, ls=":", alpha=0.5)
        r = self.resolution_0143
        if np.isfinite(r) and r > 0 and r < 999:
            ax.axvline(1.0 / r, color="tab:red", lw=0.8)
            ax.annotate(f"{r:.2f} Å", (1.0 / r, 0.143), xytext=(5, 10), textcoords="offset points", color="tab:red")
        ax.set_xlabel("spatial frequency (1/Å)")
        ax.set_ylabel("FSC")
        ax.set_ylim(-0.2, 1.05)
        ax.set_xlim(0, s[-1] if s.size else 1)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
        ax.set_title(title or f"FSC: {r:.2f} Å at 0.143")
        top = ax.twiny()
        top.set_xlim(ax.get_xlim())
        ticks = [t for t in ax.get_xticks() if 0 < t <= ax.get_xlim()[1]]
        top.set_xticks(ticks)
        top.set_xticklabels([f"{1.0 / t:.1f}" for t in ticks])
        top.set_xlabel("resolution (Å)")
        # fixed margins (room for the top axis and title) instead of tight_layout,
        # which draws the whole figure once more just to measure it
        fig.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.82)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        atomic_write_bytes(Path(path), buf.getvalue())
        return Path(path)


def _fmt(x: Any) -> str:
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if not np.isfinite(x):
        return "inf" if x > 0 else "nan"
    return f"{x:.6g}"


# ---------------------------------------------------------------------------
# Fourier kernels (module level: picklable)
# ---------------------------------------------------------------------------
def _randomize_kernel(F, *, kz, ky, kx, index, fshape, shape, box_edge, randomize_at, seed, hermitian_consistent):
    return K.phase_randomize_block(
        F, kz=kz, ky=ky, kx=kx, index=index, fshape=fshape, shape=shape, box_edge=box_edge,
        randomize_at=randomize_at, seed=seed, hermitian_consistent=hermitian_consistent,
    )


# ---------------------------------------------------------------------------
# the op
# ---------------------------------------------------------------------------
def _box_edge(shape, vs) -> float:
    return float(min(int(n) * v for n, v in zip(shape, vs)))


def _check_mask(mask: xr.DataArray, name: str = "mask") -> float:
    """Validate mask values in [0, 1]; return the fraction of voxels > 0.5 (computes)."""
    import dask.array as da

    data = da.asarray(mask.data) if not isinstance(mask.data, np.ndarray) else mask.data
    if isinstance(data, np.ndarray):
        mn, mx, frac = float(data.min()), float(data.max()), float((data > 0.5).mean())
        finite = bool(np.isfinite(data).all())
    else:
        from ..engine.cluster import compute

        mn, mx, frac, finite = compute(data.min(), data.max(), (data > 0.5).mean(), da.isfinite(data).all(),
                                       progress=False, label="mask check", **spectral.local_scheduler())
        mn, mx, frac, finite = float(mn), float(mx), float(frac), bool(finite)
    if not finite:
        raise DataValueError(f"{name}: mask holds NaN or Inf values")
    if mn < -1e-6 or mx > 1 + 1e-6:
        raise DataValueError(f"{name}: mask values must lie in [0, 1], found [{mn:.4g}, {mx:.4g}]")
    if mx <= 0:
        raise DataValueError(f"{name}: mask is all zeros")
    return frac


def _masked(vol: xr.DataArray, mask: xr.DataArray) -> xr.DataArray:
    return like(vol, vol.data * mask.data.astype(np.float32))


def fsc(
    half1: xr.DataArray,
    half2: xr.DataArray,
    *,
    mask: xr.DataArray | None = None,
    randomize_at_fsc: float = 0.8,
    randomize_at_resolution: float | None = None,
    seed: int = 0,
    hermitian_weights: bool = False,
    hermitian_consistent: bool = True,
    d_min: float | None = None,
    drop_nyquist_planes: bool = False,
    force_mask: bool = False,
    molweight_kda: float | None = None,
    strategy: str = "auto",
) -> FSCResult:
    """Fourier shell correlation of two half maps (or a map and a model map).

    Parameters
    ----------
    half1, half2
        Aligned Volumes (same shape, voxel size, origin), unfiltered and
        unmasked. Numpy- or dask-backed; the curves are computed (this is a
        reduction).
    mask
        Optional soft mask in [0, 1] on the same grid. With a mask the masked
        FSC is corrected by phase randomisation (RELION / Chen et al. 2013).
    randomize_at_fsc
        Phases are randomised from the first shell ``i > 0`` where the
        unmasked FSC drops below this value.
    randomize_at_resolution
        If given (Å), randomise from shell ``int(L / this)`` instead.
    seed
        Seed of the counter-based (Philox) random phases; results do not
        depend on the chunking.
    hermitian_weights
        False (RELION compat): each rfft half-space voxel counts once. True:
        interior voxels count twice (each stands for a Friedel pair), which
        equals summing over the full sphere or over unique reflections
        (servalcat, gemmi ASU).
    hermitian_consistent
        Keep the randomised spectrum Hermitian on the ``kx = 0`` / Nyquist
        planes (see :func:`chunkem.kernels.fsc.phase_randomize_block`).
    d_min
        Leave out Fourier voxels finer than this resolution (Å), as servalcat
        does at its ``-d`` (Nyquist by default there). Default: none (RELION:
        every voxel of shells ``0 … N/2``).
    drop_nyquist_planes
        Leave out the ``|k| = N/2`` planes of even axes (emda does; their
        coefficients are ill-defined for a real map).
    force_mask
        RELION falls back to the unmasked FSC when the unmasked curve crosses
        0.143 at a finer shell than the corrected one (a suspicious mask);
        ``True`` keeps the corrected curve anyway.
    molweight_kda
        Molecular weight (kDa) for the part-FSC; default: from the mask's
        volume fraction.
    strategy
        FFT strategy for :func:`chunkem.engine.spectral.rfft`.

    Returns
    -------
    FSCResult

    Raises
    ------
    GeometryError
        Half maps (or the mask) on different grids.
    DataValueError
        Mask values outside [0, 1], NaN, or an all-zero mask.
    ParameterError
        The unmasked FSC never drops below ``randomize_at_fsc``; bad options.

    Examples
    --------
    >>> import numpy as np
    >>> from chunkem.volume import make_volume
    >>> rng = np.random.default_rng(0)
    >>> m = make_volume(rng.normal(size=(32, 32, 32)), voxel_size=1.5)
    >>> r = fsc(m, m)
    >>> bool(np.allclose(r.fsc_unmasked, 1)), r.crossing_0143.crossed
    (True, False)
    """
    validate_volume(half1, source="half1")
    validate_volume(half2, source="half2")
    check_aligned(half1, half2, names=["half1", "half2"])
    check_independent(half1, half2)
    if mask is not None:
        validate_volume(mask, source="mask")
        check_aligned(half1, mask, names=["half1", "mask"])
    if not 0 < randomize_at_fsc < 1:
        raise ParameterError(f"randomize_at_fsc must be in (0, 1), got {randomize_at_fsc}")
    vs = voxel_size(half1)
    shape = tuple(int(n) for n in half1.shape)
    L = _box_edge(shape, vs)
    nyq_res = 2.0 * max(vs)
    if d_min is not None and d_min < nyq_res * (1 - 1e-6):
        raise ParameterError(f"d_min={d_min} Å is beyond Nyquist ({nyq_res:.3f} Å for voxel size {vs})")
    if randomize_at_resolution is not None and not (nyq_res * (1 - 1e-6) <= randomize_at_resolution):
        raise ParameterError(
            f"randomize_at_resolution={randomize_at_resolution} Å is beyond Nyquist ({nyq_res:.3f} Å)"
        )
    if seed < 0:
        seed = int(np.random.default_rng().integers(0, 2**31))
    limit = bool(d_min) or drop_nyquist_planes

    def limited(s: spectral.Spectrum) -> spectral.Spectrum:
        if limit:
            s = spectral.apply(_limit_kernel, s, with_index=True, shape=shape, d_min=d_min,
                               drop_nyquist_planes=drop_nyquist_planes)
        return s

    def spec(vol: xr.DataArray) -> spectral.Spectrum:
        return limited(spectral.rfft(vol, strategy=strategy))

    def pair_sums(*pairs) -> list[spectral.ShellSums]:
        return spectral.shell_sums_many(pairs, hermitian_weights=hermitian_weights, amplitudes=False)

    def curve(su: spectral.ShellSums) -> np.ndarray:
        return K.fsc_from_sums(su.sum_f1f2, su.sum_f1sq, su.sum_f2sq)

    sums: dict[str, spectral.ShellSums] = {}
    notes: list[str] = []
    f_m = f_r = None
    rand_at: int | None = None
    part = None
    if mask is None:
        (sums["unmasked"],) = pair_sums((spec(half1), spec(half2)))
        f_un = curve(sums["unmasked"])
        final = corrected = f_un
    else:
        frac = _check_mask(mask)
        # the raw spectra serve the unmasked FSC and the phase randomisation: when
        # they fit in memory (gather strategy) they are transformed once and kept
        R1, R2 = spectral.rfft(half1, strategy=strategy), spectral.rfft(half2, strategy=strategy)
        if R1.is_lazy and spectral.choose_strategy(shape, strategy) == "gather":
            from ..engine.cluster import persist

            d1, d2 = persist(R1.data, R2.data, progress=False, label="half-map FFTs",
                             **spectral.local_scheduler())
            R1, R2 = replace(R1, data=d1), replace(R2, data=d2)
        un_pair = (limited(R1), limited(R2))
        ma_pair = (spec(_masked(half1, mask)), spec(_masked(half2, mask)))

        def randomized_pair(at: int):
            out = []
            for h, (vol, R) in enumerate(((half1, R1), (half2, R2))):
                Q = spectral.apply(_randomize_kernel, R, with_index=True, shape=shape, box_edge=L, randomize_at=at,
                                   seed=2 * int(seed) + h, hermitian_consistent=hermitian_consistent)
                chunks = vol.data.chunks if not isinstance(vol.data, np.ndarray) and hasattr(vol.data, "chunks") \
                    else None
                rv = spectral.irfft(Q, chunks=chunks)
                out.append(spec(_masked(like(vol, rv.data), mask)))
            return tuple(out)

        if randomize_at_resolution is not None:
            rand_at = int(L / randomize_at_resolution)
            sums["unmasked"], sums["masked"], sums["randomized"] = pair_sums(un_pair, ma_pair,
                                                                             randomized_pair(rand_at))
            f_un = curve(sums["unmasked"])
        else:
            sums["unmasked"], sums["masked"] = pair_sums(un_pair, ma_pair)
            f_un = curve(sums["unmasked"])
            rand_at = K.randomize_from_shell(f_un, threshold=randomize_at_fsc)
            if rand_at is None:
                raise ParameterError(
                    f"the unmasked FSC never drops below randomize_at_fsc={randomize_at_fsc}; "
                    "give randomize_at_resolution (Å) instead"
                )
            (sums["randomized"],) = pair_sums(randomized_pair(rand_at))
        f_m = curve(sums["masked"])
        f_r = curve(sums["randomized"])
        corrected = K.corrected_fsc(f_m, f_r, rand_at)
        final = corrected
        c_un = K.resolution_crossing(f_un, box_edge=L, threshold=0.143, nyquist=nyq_res)
        c_co = K.resolution_crossing(corrected, box_edge=L, threshold=0.143, nyquist=nyq_res)
        if c_un.shell > c_co.shell:
            msg = (f"the unmasked FSC reaches a finer resolution ({c_un.resolution:.2f} Å) than the "
                   f"mask-corrected one ({c_co.resolution:.2f} Å): the mask may be wrong")
            if not force_mask:
                msg += "; using the unmasked FSC (force_mask=True keeps the corrected curve)"
                final = f_un
            notes.append(msg)
        i_res = c_co.shell + 1
        if i_res < f_r.size and f_r[i_res] > 0.10:
            notes.append(f"phase-randomised masked FSC is {f_r[i_res]:.3f} at the resolution shell: "
                         "the mask is too sharp or too tight")
        if molweight_kda:
            fpart = 0.476 * L**3 * 0.81 / (molweight_kda * 1000.0)
        else:
            fpart = 0.476 / max(frac, 1e-6)
        part = K.part_fsc(final, fraction=fpart)
    c143 = K.resolution_crossing(final, box_edge=L, threshold=0.143, nyquist=nyq_res)
    c05 = K.resolution_crossing(final, box_edge=L, threshold=0.5, nyquist=nyq_res)
    if not c143.crossed:
        notes.append("the FSC never drops below 0.143: resolution limited by sampling (Nyquist)")
    for n in notes:
        warnings.warn(n, stacklevel=2)
    su = sums["unmasked"]
    return FSCResult(
        frequency=su.frequency,
        resolution=su.resolution,
        count=su.count,
        fsc_unmasked=f_un,
        fsc_masked=f_m,
        fsc_randomized=f_r,
        fsc_corrected=corrected,
        fsc_final=final,
        randomize_at=rand_at,
        resolution_0143=c143.resolution_interp,
        resolution_05=c05.resolution_interp,
        crossing_0143=c143,
        crossing_05=c05,
        part_fsc=part,
        box_edge=L,
        voxel_size=vs,
        sums=sums,
        warnings=notes,
    )


def _limit_kernel(F, *, kz, ky, kx, index, fshape, shape, d_min, drop_nyquist_planes):
    """Zero voxels finer than ``d_min`` Å and/or on the Nyquist planes of even axes."""
    keep = np.ones(F.shape, dtype=bool)
    if d_min:
        keep &= np.broadcast_to((kz * kz + ky * ky + kx * kx) <= (1.0 / d_min) ** 2 * (1 + 1e-9), F.shape)
    if drop_nyquist_planes:
        nz, ny, nx = shape
        iz = np.arange(F.shape[0]) + index[0]
        iy = np.arange(F.shape[1]) + index[1]
        ix = np.arange(F.shape[2]) + index[2]
        if nz % 2 == 0:
            keep &= (iz != nz // 2)[:, None, None]
        if ny % 2 == 0:
            keep &= (iy != ny // 2)[None, :, None]
        if nx % 2 == 0:
            keep &= (ix != nx // 2)[None, None, :]
    return np.where(keep, F, 0).astype(F.dtype, copy=False)


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------
def demo_stage(ctx: dict[str, Any]) -> dict[str, Any]:
    """``chunkem demo`` stage: FSC and postprocess of the phantom half maps.

    Uses the lazily reopened halves (``ctx["half1"]``...) when present, else
    the phantom's in-memory ones; writes ``fsc.csv/json/png`` and the
    postprocessed map into ``ctx["outdir"] / "fsc"``.
    """
    from ..cli.common import write_json
    from .postprocess import postprocess

    ph = ctx["phantom"]
    h1 = ctx.get("half1", ph.half1)
    h2 = ctx.get("half2", ph.half2)
    mask = ctx.get("mask", getattr(ph, "mask", None))
    out = Path(ctx["outdir"]) / "fsc"
    out.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pp = postprocess(h1, h2, mask=mask)
    r = pp.fsc
    r.to_csv(out / "fsc.csv")
    r.plot(out / "fsc.png")
    write_json(out / "fsc.json", r.to_dict())
    pp.plot_guinier(out / "guinier.png")
    write_json(out / "postprocess.json", pp.to_dict())
    try:
        from ..io import save

        save(pp.map, out / "postprocess.mrc")
    except Exception:  # pragma: no cover - io module missing or failing: numbers still reported
        pass
    summary = {
        "resolution_A": round(float(r.resolution_0143), 3),
        "resolution_unmasked_A": round(float(K.resolution_crossing(
            r.fsc_unmasked, box_edge=r.box_edge, threshold=0.143).resolution_interp), 3),
        "bfactor_A2": round(float(pp.bfactor), 2),
    }
    return summary
