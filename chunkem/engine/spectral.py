"""GLOBAL-FFT stages: the only place in chunkem where whole-map FFTs happen.

Forward and inverse real FFTs of Volumes, pointwise Fourier-space kernels run
chunk-locally with their frequencies in 1/Å, and shell reductions (radial
profiles, the per-shell sums of FSC) as per-chunk bincounts summed.

Strategies (``rfft(vol, strategy=...)``)
----------------------------------------
``"gather"``
    rechunk the map to a single chunk and call ``scipy.fft.rfftn`` on it
    (all cores of that worker). Fastest whenever the map fits one worker.
``"slab"``
    real-to-complex slab decomposition: ``rfft2`` over (y, x) on z-slabs,
    one all-to-all transpose by rechunking to z-pencils, then ``fft`` along z.
    No task ever holds more than one slab or one pencil block, so maps far
    larger than a worker's memory transform. The spectrum stays in z-pencil
    chunks; :func:`irfft` runs the same steps in reverse.
``"auto"`` (default)
    ``gather`` when 3x the complex spectrum fits under the
    ``chunkem.fft-gather-limit`` setting (bytes) and, on a distributed
    cluster, under 40% of the smallest worker memory limit; else ``slab``.
    The choice is made when the graph is built, so build it inside the
    compute session.

Frequencies follow ``00_conventions`` §2: ``k_axis = fftfreq(N_axis, d=a_axis)``
(``rfftfreq`` along x), in cycles/Å. Transforms are unnormalised forward
(``scipy.fft`` ``norm="backward"``), so ``irfft(rfft(v)) == v``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import dask.array as da
import numpy as np
import scipy.fft
import xarray as xr
from dask.base import tokenize
from dask.core import flatten
from dask.highlevelgraph import HighLevelGraph

from .. import config
from ..errors import GeometryError, ParameterError
from ..volume import as_triple, computed_header, like, make_volume, origin, voxel_size
from .chunks import auto_chunks, slab_depth
from .cluster import worker_info

__all__ = [
    "Spectrum",
    "rfft",
    "irfft",
    "apply",
    "fourier_filter",
    "crop",
    "window",
    "frequencies",
    "shell_index",
    "n_shells",
    "shell_frequencies",
    "ShellSums",
    "shell_sums",
    "shell_sums_many",
    "local_scheduler",
    "radial_profile",
    "choose_strategy",
    "slab_read_chunks",
    "after",
    "done",
    "worker_memory_limit",
]

STRATEGIES = ("auto", "gather", "slab")


@dataclass
class Spectrum:
    """The real FFT (half-space along x) of a Volume.

    Attributes
    ----------
    data
        complex64 dask (or numpy) array, shape ``(nz, ny, nx // 2 + 1)``.
    shape
        Real-space shape ``(nz, ny, nx)``.
    voxel_size
        (vz, vy, vx) in Å.
    origin
        (oz, oy, ox) in Å, carried so that :func:`irfft` restores the geometry.
    name
        Name of the source Volume.
    chunks
        Real-space chunks of the source Volume (``irfft`` restores them).
    attrs
        Attributes of the source Volume (header...).
    embed
        ``None`` for the spectrum of a whole grid. For a low-frequency
        *window* (:func:`window`, ``rfft(..., limit=)``): the real-space
        shape of the full grid the window was cut from; ``shape`` and
        ``voxel_size`` then describe the window as a smaller grid with the
        same physical frequencies, and :func:`irfft` zero-pads it back to
        ``embed`` (frequencies outside the window are known to be zero).
    embed_voxel_size
        Voxel size (Å) of that full grid (``None`` unless ``embed`` is set).
    """

    data: Any
    shape: tuple[int, int, int]
    voxel_size: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    name: str | None = None
    chunks: tuple | None = None
    attrs: dict = field(default_factory=dict)
    embed: tuple[int, int, int] | None = None
    embed_voxel_size: tuple[float, float, float] | None = None

    @property
    def real_shape(self) -> tuple[int, int, int]:
        """Real-space shape that :func:`irfft` returns (``embed`` for a window, else ``shape``)."""
        return tuple(self.embed) if self.embed is not None else tuple(self.shape)

    @property
    def real_voxel_size(self) -> tuple[float, float, float]:
        """Voxel size (Å) of the grid that :func:`irfft` returns."""
        return tuple(self.embed_voxel_size) if self.embed is not None else tuple(self.voxel_size)

    @property
    def fshape(self) -> tuple[int, int, int]:
        """Shape of the half-space spectrum ``(nz, ny, nx // 2 + 1)``."""
        nz, ny, nx = self.shape
        return (nz, ny, nx // 2 + 1)

    @property
    def is_lazy(self) -> bool:
        return isinstance(self.data, da.Array)

    def frequencies(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (kz, ky, kx) arrays of the whole spectrum, 1/Å."""
        return frequencies(self.shape, self.voxel_size)


def frequencies(shape, voxel_size, *, index=(0, 0, 0), block_shape=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable frequency arrays (kz, ky, kx) in 1/Å of an rfft half-space block.

    Parameters
    ----------
    shape
        Real-space shape (nz, ny, nx).
    voxel_size
        (vz, vy, vx) Å.
    index
        Global index of the block's first element in the half-space spectrum.
    block_shape
        Shape of the block (default: the whole half-space).

    Returns
    -------
    kz, ky, kx
        float64 arrays of shapes (bz, 1, 1), (1, by, 1), (1, 1, bx).
    """
    nz, ny, nx = (int(n) for n in shape)
    vz, vy, vx = as_triple(voxel_size, "voxel_size")
    if block_shape is None:
        block_shape = (nz, ny, nx // 2 + 1)
    iz, iy, ix = index
    bz, by, bx = block_shape
    kz = scipy.fft.fftfreq(nz, d=vz)[iz : iz + bz]
    ky = scipy.fft.fftfreq(ny, d=vy)[iy : iy + by]
    kx = scipy.fft.rfftfreq(nx, d=vx)[ix : ix + bx]
    return kz[:, None, None], ky[None, :, None], kx[None, None, :]


def worker_memory_limit() -> int | None:
    """Smallest memory limit (bytes) of the active distributed workers, or None.

    None on the threaded scheduler, when no worker has a limit, or when the
    scheduler cannot be asked.
    """
    limits = [int(w.get("memory_limit") or 0) for w in worker_info()]
    limits = [m for m in limits if m > 0]
    return min(limits) if limits else None


TRANSPOSES = ("auto", "rechunk", "disk")


def transpose_method(nbytes: int) -> str:
    """How the slab FFT exchanges slabs and pencils: ``"rechunk"`` or ``"disk"``.

    The ``chunkem.fft-transpose`` setting, or for ``"auto"`` (default):
    ``"disk"`` (:func:`chunkem.engine.transpose.disk_rechunk`) on a
    distributed cluster whose total worker memory is less than twice the
    ``nbytes`` of spectrum exchanged, when the workers run on this machine
    or ``chunkem.fft-scratch`` names a (shared) folder; else dask's rechunk.
    """
    method = config.get("fft-transpose", "auto") or "auto"
    if method not in TRANSPOSES:
        raise ParameterError(f"chunkem.fft-transpose must be one of {', '.join(TRANSPOSES)}, got {method!r}")
    if method != "auto":
        return method
    workers = worker_info()
    total = sum(int(w.get("memory_limit") or 0) for w in workers)
    if not workers or total <= 0 or nbytes < 0.5 * total:
        return "rechunk"
    if config.get("fft-scratch", None):
        return "disk"
    import socket

    here = {"127.0.0.1", "localhost", "::1", socket.gethostname()}
    try:
        here.add(socket.gethostbyname(socket.gethostname()))
    except OSError:  # pragma: no cover
        pass
    return "disk" if all(str(w.get("host", "")) in here for w in workers) else "rechunk"


def _transpose(x: da.Array, chunks, method: str) -> da.Array:
    if method == "disk":
        from .transpose import disk_rechunk

        return disk_rechunk(x, chunks)
    return x.rechunk(chunks)


def choose_strategy(shape, strategy: str = "auto") -> str:
    """The FFT strategy ``"gather"`` or ``"slab"`` for a map of ``shape``.

    ``"auto"`` gathers when 3x the complex spectrum fits under the
    ``chunkem.fft-gather-limit`` setting and, on a distributed cluster, under
    40% of the smallest worker memory limit (a worker needs ~200 MB for
    itself); otherwise ``"slab"``.
    """
    if strategy not in STRATEGIES:
        raise ParameterError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy != "auto":
        return strategy
    nz, ny, nx = shape
    need = 3 * nz * ny * (nx // 2 + 1) * 8
    if need > int(config.get("fft-gather-limit")):
        return "slab"
    mem = worker_memory_limit()
    if mem is not None and need > 0.4 * mem:
        return "slab"
    return "gather"


# --- block functions (module level: picklable for distributed workers) ------


def _rfftn_block(x: np.ndarray) -> np.ndarray:
    return scipy.fft.rfftn(np.asarray(x, dtype=np.float32), workers=-1).astype(np.complex64, copy=False)


def _irfftn_block(f: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    return scipy.fft.irfftn(np.asarray(f, dtype=np.complex64), s=shape, workers=-1).astype(np.float32, copy=False)


def _rfft2_block(x: np.ndarray) -> np.ndarray:
    return scipy.fft.rfft2(np.asarray(x, dtype=np.float32), axes=(1, 2)).astype(np.complex64, copy=False)


def _irfft2_block(f: np.ndarray, s: tuple[int, int]) -> np.ndarray:
    return scipy.fft.irfft2(np.asarray(f, dtype=np.complex64), s=s, axes=(1, 2)).astype(np.float32, copy=False)


def _fft_z_block(f: np.ndarray) -> np.ndarray:
    return scipy.fft.fft(np.asarray(f, dtype=np.complex64), axis=0).astype(np.complex64, copy=False)


def _ifft_z_block(f: np.ndarray) -> np.ndarray:
    return scipy.fft.ifft(np.asarray(f, dtype=np.complex64), axis=0).astype(np.complex64, copy=False)


# --- band-limited windows (pruned transforms) --------------------------------


def _window_length(n: int, d: float, limit: float, real: bool = False) -> int:
    """Length ``m`` of the window of an axis (``n`` voxels of ``d`` Å) keeping ``|k| <= limit`` 1/Å.

    The window keeps indices ``0..a`` and (complex axes) ``n-a..n-1`` with
    ``a = floor(limit n d)``: an odd length ``m = 2a + 1``, or ``n`` (the
    whole axis) once that reaches the axis' own extent.
    """
    a = int(np.floor(limit * n * d * (1.0 + 1e-12)))
    if real:
        return n if a >= n // 2 else 2 * a + 1
    return n if 2 * a + 1 >= n else 2 * a + 1


def _pad_axis(w: np.ndarray, axis: int, n: int) -> np.ndarray:
    """Zero-pad a window (length ``m``, FFT order) along ``axis`` back to ``n`` (FFT order)."""
    m = w.shape[axis]
    if m == n:
        return w
    shape = list(w.shape)
    shape[axis] = n
    out = np.zeros(shape, dtype=w.dtype)
    h, t = (m + 1) // 2, m // 2
    lo, hi, src = [slice(None)] * 3, [slice(None)] * 3, [slice(None)] * 3
    lo[axis] = slice(0, h)
    out[tuple(lo)] = w[tuple(lo)]
    if t:
        hi[axis], src[axis] = slice(n - t, n), slice(h, m)
        out[tuple(hi)] = w[tuple(src)]
    return out


def _take_axis(f: np.ndarray, axis: int, m: int) -> np.ndarray:
    """The window of length ``m`` (FFT order) of ``f`` along ``axis`` (inverse of :func:`_pad_axis`)."""
    n = f.shape[axis]
    if m == n:
        return f
    h, t = (m + 1) // 2, m // 2
    lo, hi = [slice(None)] * 3, [slice(None)] * 3
    lo[axis], hi[axis] = slice(0, h), slice(n - t, n)
    return np.concatenate([f[tuple(lo)], f[tuple(hi)]], axis=axis) if t else f[tuple(lo)].copy()


def _z_steps(nz: int, plane_bytes: int, target: int = 32 * 2**20):
    step = max(1, min(nz, target // max(1, plane_bytes)))
    return [(z0, min(nz, z0 + step)) for z0 in range(0, nz, step)]


def _rfft2_window_block(x: np.ndarray, my: int, mxh: int, workers: int | None = None) -> np.ndarray:
    """rfft over x keeping ``mxh`` columns, fft over y keeping the ``my``-row window (z-slab)."""
    a = scipy.fft.rfft(np.asarray(x, dtype=np.float32), axis=2, workers=workers)[:, :, :mxh]
    b = scipy.fft.fft(a, axis=1, workers=workers)
    return _take_axis(b, 1, my).astype(np.complex64, copy=False)


def _fft_z_window_block(f: np.ndarray, mz: int) -> np.ndarray:
    return _take_axis(scipy.fft.fft(np.asarray(f, dtype=np.complex64), axis=0), 0, mz).astype(np.complex64,
                                                                                                copy=False)


def _rfftn_window_block(x: np.ndarray, window: tuple[int, int, int]) -> np.ndarray:
    """Window ``(mz, my, mx)`` of the rfftn of a whole block, transforming only what the window needs."""
    x = np.asarray(x, dtype=np.float32)
    nz, ny, nx = x.shape
    mz, my, mx = window
    mxh = mx // 2 + 1
    part = np.empty((nz, my, mxh), dtype=np.complex64)
    for z0, z1 in _z_steps(nz, ny * (nx // 2 + 1) * 8):
        part[z0:z1] = _rfft2_window_block(x[z0:z1], my, mxh, workers=-1)
    f = scipy.fft.fft(part, axis=0, workers=-1, overwrite_x=True)
    return _take_axis(f, 0, mz).astype(np.complex64, copy=False)


def _ifft_z_window_block(f: np.ndarray, nz: int) -> np.ndarray:
    return scipy.fft.ifft(_pad_axis(np.asarray(f, dtype=np.complex64), 0, nz), axis=0).astype(np.complex64,
                                                                                                copy=False)


def _irfft2_window_block(f: np.ndarray, s: tuple[int, int]) -> np.ndarray:
    """Slab path: zero-pad a z-slab of a window along y to ``ny``, ifft over y, irfft over x to ``nx``
    (the x padding is irfft's). The gathered inverse (:func:`_irfftn_window_block`) reuses its buffers instead."""
    ny, nx = s
    f = np.asarray(f, dtype=np.complex64)
    p = _pad_axis(f, 1, ny)  # overwrite only a buffer of our own: f may be a block dask shares
    h = scipy.fft.ifft(p, axis=1, overwrite_x=p is not f)
    return scipy.fft.irfft(h, n=nx, axis=2).astype(np.float32, copy=False)


def _irfftn_window_block(f: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Inverse of :func:`_rfftn_window_block`: only the lines the window touches are transformed.

    z first (the window's own lines), then per z-slab y (the window's
    columns) and x (every line; irfft's own zero padding of the columns is
    done once into a reused buffer whose padding stays zero).
    """
    nz, ny, nx = shape
    nxh = nx // 2 + 1
    f = np.asarray(f, dtype=np.complex64)
    _, my, mxh = f.shape
    p = _pad_axis(f, 0, nz)  # overwrite only a buffer of our own: f may be a block dask shares
    g = scipy.fft.ifft(p, axis=0, workers=-1, overwrite_x=p is not f)
    out = np.empty(shape, dtype=np.float32)
    steps = _z_steps(nz, ny * nxh * 8)
    depth = steps[0][1] - steps[0][0]
    ybuf = np.zeros((depth, ny, mxh), dtype=np.complex64)
    xbuf = np.zeros((depth, ny, nxh), dtype=np.complex64) if mxh < nxh else None
    h, t = (my + 1) // 2, my // 2
    for z0, z1 in steps:
        y = ybuf[: z1 - z0]
        y[:, :h] = g[z0:z1, :h]
        y[:, h : ny - t] = 0  # the previous slab's transform left values there
        if t:
            y[:, ny - t :] = g[z0:z1, h:]
        y = scipy.fft.ifft(y, axis=1, workers=-1, overwrite_x=True)
        if xbuf is not None:
            xbuf[: z1 - z0, :, :mxh] = y
            y = xbuf[: z1 - z0]
        out[z0:z1] = scipy.fft.irfft(y, n=nx, axis=2, workers=-1)
    return out


def _window_shape(shape, voxel_size, limit: float) -> tuple[int, int, int]:
    nz, ny, nx = (int(n) for n in shape)
    vz, vy, vx = as_triple(voxel_size, "voxel_size")
    return (_window_length(nz, vz, limit), _window_length(ny, vy, limit), _window_length(nx, vx, limit, real=True))


def _check_limit(limit: float) -> float:
    lim = float(limit)
    if not (np.isfinite(lim) and lim > 0):
        raise ParameterError(f"limit must be a positive frequency in 1/Å, got {limit!r}")
    return lim


def _take_window_dask(x: da.Array, mz: int, my: int, mxh: int) -> da.Array:
    """Lazy window of a half-space array in FFT order (slices and one concatenate per axis)."""
    for axis, m in ((0, mz), (1, my)):
        n = x.shape[axis]
        if m == n:
            continue
        if x.numblocks[axis] == 1:  # one block along the axis (a gathered spectrum): stays one block
            chunks = tuple((m,) if ax == axis else c for ax, c in enumerate(x.chunks))
            x = x.map_blocks(_take_axis, axis, m, dtype=x.dtype, chunks=chunks, meta=np.empty((0, 0, 0), x.dtype))
            continue
        h, t = (m + 1) // 2, m // 2
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[axis], hi[axis] = slice(0, h), slice(n - t, n)
        x = da.concatenate([x[tuple(lo)], x[tuple(hi)]], axis=axis) if t else x[tuple(lo)]
    return x[:, :, :mxh] if mxh < x.shape[2] else x


def window(spec: Spectrum, limit: float) -> Spectrum:
    """The low-frequency window ``|k_z|, |k_y|, |k_x| <= limit`` (1/Å) of a spectrum (lazy).

    For band-limited work: a kernel whose output is zero beyond ``limit``
    runs on the window only, and :func:`irfft` of the window zero-pads it
    back to the full grid while transforming only the lines the window
    touches (about ``(f² + f + 1) / 3`` of a full inverse for a window that
    keeps a fraction ``f`` of each axis). The window is a Spectrum of a
    smaller grid with the same physical frequencies (voxel size ``a N / M``
    per axis), so :func:`apply` passes kernels the right ``kz, ky, kx``;
    its ``embed`` is the full grid. Values outside the window are dropped:
    use it only where they are (numerically) zero.

    Parameters
    ----------
    spec
        Spectrum (or a window of one).
    limit
        Highest frequency kept along each axis, 1/Å.

    Examples
    --------
    >>> import numpy as np
    >>> from chunkem.volume import make_volume
    >>> v = make_volume(np.random.default_rng(0).random((20, 20, 20)), voxel_size=1.0)
    >>> w = window(rfft(v), 0.2)
    >>> w.shape, w.real_shape
    ((9, 9, 9), (20, 20, 20))
    """
    lim = _check_limit(limit)
    mz, my, mx = _window_shape(spec.shape, spec.voxel_size, lim)
    if (mz, my, mx) == tuple(spec.shape):
        return spec
    mxh = mx // 2 + 1
    x = spec.data
    if isinstance(x, da.Array):
        data = _take_window_dask(x, mz, my, mxh)
    else:
        data = _take_axis(_take_axis(np.asarray(x), 0, mz), 1, my)[:, :, :mxh]
    vs = tuple(v * n / m for v, n, m in zip(spec.voxel_size, spec.shape, (mz, my, mx)))
    return replace(spec, data=data, shape=(mz, my, mx), voxel_size=vs, embed=spec.real_shape,
                   embed_voxel_size=spec.real_voxel_size)


def _slab_bytes(method: str = "rechunk") -> int:
    """Bytes per slab / pencil: the ``chunkem.fft-slab-bytes`` setting, at most 1/32
    of the smallest worker memory limit on a distributed cluster (a task holds a few
    slab-sized arrays at once, next to the worker's own ~250 MB and its transfer buffers).
    Through disk (``method="disk"``) no transfer buffers exist and fewer, larger pieces
    pay: ``chunkem.fft-disk-slab-bytes``, at most 1/6 of the worker memory limit (a slab task
    holds its input, the x-transform and its piece, ~3x the slab's complex plane bytes)."""
    if method == "disk":
        target, share = int(config.get("fft-disk-slab-bytes", 256 * 2**20)), 6
    else:
        target, share = int(config.get("fft-slab-bytes", 64 * 2**20)), 32
    mem = worker_memory_limit()
    if mem is not None:
        target = min(target, mem // share)
    return max(1, target)


def _balanced(n: int, size: int) -> int:
    """Chunk size <= ``size`` splitting ``n`` into equal-as-possible pieces."""
    size = max(1, min(n, size))
    k = -(-n // size)
    return -(-n // k)


def _axis_chunks(chunks, axis: int, n: int) -> tuple[int, ...]:
    """Chunk sizes along ``axis`` from any dask-style chunks spec (ints, tuples, dict)."""
    if chunks is None:
        return (n,)
    if isinstance(chunks, dict):
        c = chunks.get(axis, n)
    elif isinstance(chunks, (int, np.integer)):
        c = chunks
    else:
        c = tuple(chunks)[axis]
    if isinstance(c, (tuple, list)):
        return tuple(int(v) for v in c)
    c = n if c in (None, -1) else int(c)
    return (min(c, n),)


def _common(sizes) -> int | None:
    """The most common chunk size (None for an empty sequence)."""
    sizes = [int(v) for v in sizes]
    if not sizes:
        return None
    vals, counts = np.unique(sizes, return_counts=True)
    return int(vals[np.argmax(counts)])


def _pencil_chunks(nz: int, ny: int, nxh: int, target: int | None = None) -> tuple[int, int, int]:
    """Chunks (nz, cy, cx) of z-pencils holding about ``target`` bytes each."""
    target = _slab_bytes() if target is None else target
    cols = max(1, target // (nz * 8))
    cx = min(nxh, max(1, int(np.sqrt(cols))))
    cy = min(ny, max(1, cols // cx))
    return (nz, _balanced(ny, cy), _balanced(nxh, cx))


def _slab_z(nz: int, plane_bytes: int, target: int | None = None, align: int | None = None) -> int:
    """Planes per z-slab: about ``target`` bytes, aligned with z-chunks of ``align`` planes.

    Alignment (a divisor or a multiple of ``align``) keeps each input chunk
    feeding whole slabs, so the rechunk to slabs moves fewer pieces.
    """
    target = _slab_bytes() if target is None else target
    cz = slab_depth(plane_bytes, nz, target_bytes=target)
    if align and 1 < align < nz:
        if cz < align:
            cz = max(d for d in range(1, cz + 1) if align % d == 0)
        else:
            cz = (cz // align) * align
        return cz
    return _balanced(nz, cz)


def slab_read_chunks(shape, stored_z: int | None = None, strategy: str = "auto") -> tuple[int, int, int] | None:
    """Chunks ``(cz, ny, nx)`` in which to read a map whose first stage is a slab FFT, or None.

    Whole-plane z-slabs of the slab transform's depth (aligned with ``stored_z``,
    the z-chunk depth of the file, when given): the transform then starts from
    the chunks as read, with no all-to-all merge of small chunks into slabs
    (nor, on a cluster, their transfers between workers). None when the map
    is gathered (:func:`choose_strategy` says ``"gather"``): any chunks do.
    """
    if choose_strategy(shape, strategy) != "slab":
        return None
    nz, ny, nx = (int(n) for n in shape)
    method = transpose_method(nz * ny * (nx // 2 + 1) * 8)
    return (_slab_z(nz, ny * (nx // 2 + 1) * 8, _slab_bytes(method), align=stored_z), ny, nx)


def rfft(vol: xr.DataArray, *, strategy: str = "auto", limit: float | None = None) -> Spectrum:
    """Real FFT of a Volume (half-space along x), lazily for dask input.

    Parameters
    ----------
    vol
        Volume (numpy- or dask-backed).
    strategy
        ``"auto"`` | ``"gather"`` | ``"slab"`` (see the module notes). Ignored
        for numpy input (one ``scipy.fft.rfftn`` call).
    limit
        Only the frequencies ``|k_axis| <= limit`` (1/Å) are needed: return
        :func:`window` ``(rfft(vol), limit)``, computed without transforming
        the lines the window drops (and, on the slab path, exchanging only
        the window between slabs and pencils).

    Returns
    -------
    Spectrum
        complex64 data of shape ``(nz, ny, nx // 2 + 1)`` (the window's with
        ``limit``); one chunk after a gather, z-pencil chunks ``(nz, cy, cx)``
        after a slab transform.

    Examples
    --------
    >>> import numpy as np
    >>> from chunkem.volume import make_volume
    >>> v = make_volume(np.arange(60.0).reshape(3, 4, 5), voxel_size=1.0)
    >>> s = rfft(v.chunk(2), strategy="slab")
    >>> bool(np.allclose(s.data.compute(), np.fft.rfftn(v.values), atol=1e-3))
    True
    """
    if not isinstance(vol, xr.DataArray):
        raise GeometryError(f"rfft: expected a Volume (xarray.DataArray), got {type(vol).__name__}")
    shape = tuple(int(n) for n in vol.shape)
    if len(shape) != 3:
        raise GeometryError(f"rfft: a Volume must be 3-D, got shape {shape}")
    choice = choose_strategy(shape, strategy)
    vs, org = voxel_size(vol), origin(vol)
    attrs = {k: v for k, v in vol.attrs.items() if k not in ("voxel_size", "origin")}
    x = vol.data
    nz, ny, nx = shape
    nxh = nx // 2 + 1
    wshape = _window_shape(shape, vs, _check_limit(limit)) if limit is not None else shape
    if wshape == shape:
        limit = None
    mz, my, mx = wshape
    mxh = mx // 2 + 1
    meta = np.empty((0, 0, 0), np.complex64)
    chunks = x.chunks if isinstance(x, da.Array) else None
    if not isinstance(x, da.Array):
        data = _rfftn_block(np.asarray(x)) if limit is None else _rfftn_window_block(np.asarray(x), wshape)
    elif choice == "gather":
        one = x.rechunk(shape) if x.npartitions > 1 else x
        if limit is None:
            data = one.map_blocks(_rfftn_block, dtype=np.complex64, chunks=((nz,), (ny,), (nxh,)), meta=meta)
        else:
            data = one.map_blocks(_rfftn_window_block, wshape, dtype=np.complex64, chunks=((mz,), (my,), (mxh,)),
                                  meta=meta)
    else:
        method = transpose_method(nz * my * mxh * 8)
        target = _slab_bytes(method)
        cz = _slab_z(nz, ny * nxh * 8, target, align=_common(x.chunks[0]))
        slabs = x.rechunk((cz, ny, nx))
        if limit is None:
            half = slabs.map_blocks(_rfft2_block, dtype=np.complex64, chunks=(slabs.chunks[0], (ny,), (nxh,)),
                                    meta=meta)
        else:
            half = slabs.map_blocks(_rfft2_window_block, my, mxh, dtype=np.complex64,
                                    chunks=(slabs.chunks[0], (my,), (mxh,)), meta=meta)
        pencils = _transpose(half, _pencil_chunks(nz, my, mxh, target), method)
        if limit is None:
            data = pencils.map_blocks(_fft_z_block, dtype=np.complex64, meta=meta)
        else:
            data = pencils.map_blocks(_fft_z_window_block, mz, dtype=np.complex64,
                                      chunks=((mz,),) + pencils.chunks[1:], meta=meta)
    spec = Spectrum(data, shape, vs, org, vol.name, chunks, attrs)
    if limit is None:
        return spec
    wvs = tuple(v * n / m for v, n, m in zip(vs, shape, wshape))
    return replace(spec, shape=wshape, voxel_size=wvs, embed=shape, embed_voxel_size=vs)


def irfft(spec: Spectrum, *, chunks=None, name: str | None = None, strategy: str = "auto") -> xr.DataArray:
    """Inverse of :func:`rfft`: a float32 Volume with the spectrum's geometry.

    Parameters
    ----------
    spec
        Spectrum (half-space along x).
    chunks
        Real-space chunks of the result (default: those of the Volume the
        spectrum came from, else :func:`~chunkem.engine.chunks.auto_chunks`).
    name
        Name of the result (default: ``spec.name``).
    strategy
        ``"auto"`` (a single-chunk spectrum is inverted in one call; a
        chunked one by ``gather`` when it fits, else ``slab``), ``"gather"``
        or ``"slab"``.
    """
    wshape = tuple(int(n) for n in spec.shape)
    shape = spec.real_shape
    nz, ny, nx = shape
    mz, my, mx = wshape
    mxh = mx // 2 + 1
    windowed = spec.embed is not None
    if tuple(spec.data.shape) != (mz, my, mxh):
        raise GeometryError(f"irfft: spectrum shape {tuple(spec.data.shape)} does not match real shape {wshape}")
    header = computed_header(spec.attrs.get("header"))  # new values: float32, not the source's integer mode
    out_name = name if name is not None else spec.name
    vs = spec.real_voxel_size
    x = spec.data
    if not isinstance(x, da.Array):
        data = _irfftn_window_block(np.asarray(x), shape) if windowed else _irfftn_block(np.asarray(x), shape)
        return make_volume(data, voxel_size=vs, origin=spec.origin, name=out_name, header=header)
    if strategy == "auto":
        choice = "gather" if x.npartitions == 1 else choose_strategy(shape, "auto")
    else:
        choice = choose_strategy(shape, strategy)
    meta_c, meta_r = np.empty((0, 0, 0), np.complex64), np.empty((0, 0, 0), np.float32)
    if choice == "gather":
        one = x.rechunk((mz, my, mxh)) if x.npartitions > 1 else x
        real = one.map_blocks(_irfftn_window_block if windowed else _irfftn_block, shape, dtype=np.float32,
                              chunks=((nz,), (ny,), (nx,)), meta=meta_r)
    else:
        pencils = x.rechunk({0: mz}) if len(x.chunks[0]) > 1 else x
        if windowed:
            zinv = pencils.map_blocks(_ifft_z_window_block, nz, dtype=np.complex64,
                                      chunks=((nz,),) + pencils.chunks[1:], meta=meta_c)
        else:
            zinv = pencils.map_blocks(_ifft_z_block, dtype=np.complex64, meta=meta_c)
    target_chunks = chunks if chunks is not None else (spec.chunks or auto_chunks(shape))
    if choice != "gather":
        method = transpose_method(nz * my * mxh * 8)
        cz = _slab_z(nz, ny * (nx // 2 + 1) * 8, _slab_bytes(method),
                     align=_common(_axis_chunks(target_chunks, 0, nz)))
        slabs = _transpose(zinv, (cz, my, mxh), method)
        block = _irfft2_window_block if windowed else _irfft2_block
        real = slabs.map_blocks(block, (ny, nx), dtype=np.float32, chunks=(slabs.chunks[0], (ny,), (nx,)),
                                meta=meta_r)
    real = real.rechunk(target_chunks)
    return make_volume(real, voxel_size=vs, origin=spec.origin, name=out_name, header=header)


def crop(spec: Spectrum, shape, *, origin=None, chunks=None) -> Spectrum:
    """Fourier-crop a spectrum to a smaller real-space ``shape`` (lazy).

    Keeps the frequencies of the smaller grid (see
    :func:`chunkem.kernels.filters.fourier_crop`), scaled so that
    :func:`irfft` returns values on the same scale. The physical box is kept:
    the new voxel size is ``voxel_size * N / M`` per axis. ``origin`` (Å) and
    ``chunks`` (real-space chunks for :func:`irfft`) of the result default to
    the spectrum's origin and to automatic chunks.
    """
    nz, ny, nx = (int(n) for n in spec.shape)
    mz, my, mx = (int(n) for n in shape)
    if not (0 < mz <= nz and 0 < my <= ny and 0 < mx <= nx):
        raise ParameterError(f"crop: new shape {tuple(shape)} must be positive and within {spec.shape}")
    zi = np.r_[0 : (mz + 1) // 2, nz - mz // 2 : nz]
    yi = np.r_[0 : (my + 1) // 2, ny - my // 2 : ny]
    scale = np.float32((mz * my * mx) / float(np.prod(spec.real_shape)))  # raw coefficients of the full grid
    x = spec.data
    if isinstance(x, da.Array):
        data = x[zi][:, yi][:, :, : mx // 2 + 1] * scale
    else:
        data = (np.asarray(x)[zi][:, yi][:, :, : mx // 2 + 1] * scale).astype(np.complex64)
    vs = tuple(v * n / m for v, n, m in zip(spec.voxel_size, spec.shape, (mz, my, mx)))
    return Spectrum(data, (mz, my, mx), vs, tuple(origin) if origin is not None else spec.origin, spec.name,
                    chunks, dict(spec.attrs))


class _BlockApply:
    """Picklable wrapper running a Fourier kernel on one spectrum block."""

    def __init__(self, kernel, shape, vs, starts, with_index, kwargs):
        self.kernel = kernel
        self.shape = shape
        self.vs = vs
        self.starts = starts
        self.with_index = with_index
        self.kwargs = kwargs

    def __call__(self, *blocks: np.ndarray, block_id=None) -> np.ndarray:
        index = tuple(self.starts[ax][block_id[ax]] for ax in range(3)) if block_id is not None else (0, 0, 0)
        return _call_kernel(self.kernel, blocks, self.shape, self.vs, index, self.with_index, self.kwargs)


def _z_pieces(block_shape, itemsize: int = 8):
    """z-ranges splitting a block into pieces of about ``chunkem.fft-kernel-bytes``.

    Pointwise kernels and shell sums run piece by piece so that their float64
    temporaries stay small even on a gathered (single-chunk) spectrum.
    """
    target = int(config.get("fft-kernel-bytes", 16 * 2**20))
    nz = int(block_shape[0])
    plane = max(1, int(np.prod(block_shape[1:])) * itemsize)
    step = max(1, min(nz, target // plane))
    return [(z0, min(nz, z0 + step)) for z0 in range(0, nz, step)] or [(0, 0)]


def _call_kernel(kernel, blocks, shape, vs, index, with_index, kwargs) -> np.ndarray:
    bshape = blocks[0].shape
    out = None
    for z0, z1 in _z_pieces(bshape):
        sub = [b[z0:z1] for b in blocks]
        sub_index = (index[0] + z0, index[1], index[2])
        kz, ky, kx = frequencies(shape, vs, index=sub_index, block_shape=sub[0].shape)
        kw = dict(kwargs)
        if with_index:
            nz, ny, nx = shape
            kw["index"] = tuple(int(i) for i in sub_index)
            kw["fshape"] = (nz, ny, nx // 2 + 1)
        res = np.asarray(kernel(*sub, kz=kz, ky=ky, kx=kx, **kw))
        if res.shape != sub[0].shape:
            raise GeometryError(f"Fourier kernel returned shape {res.shape} for a block of shape {sub[0].shape}")
        if z0 == 0 and z1 == bshape[0]:
            return res.astype(np.complex64, copy=False)
        if out is None:
            out = np.empty(bshape, dtype=np.complex64)
        out[z0:z1] = res
    return out


def _starts(chunks) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(int(s) for s in np.cumsum((0,) + tuple(c[:-1]))) for c in chunks)


def _check_same(spec: Spectrum, others: tuple[Spectrum, ...]) -> None:
    for o in others:
        if tuple(o.shape) != tuple(spec.shape):
            raise GeometryError(f"spectra differ in shape: {tuple(o.shape)} vs {tuple(spec.shape)}")
        if not np.allclose(o.voxel_size, spec.voxel_size, rtol=0, atol=1e-4):
            raise GeometryError(f"spectra differ in voxel size: {o.voxel_size} vs {spec.voxel_size} Å")


def _aligned_data(spec: Spectrum, others: tuple[Spectrum, ...]) -> list:
    if not spec.is_lazy and all(not o.is_lazy for o in others):
        return [np.asarray(spec.data)] + [np.asarray(o.data) for o in others]
    ref = spec.data if spec.is_lazy else next(o.data for o in others if o.is_lazy)
    out = []
    for s in (spec, *others):
        d = s.data if s.is_lazy else da.from_array(np.asarray(s.data), chunks=ref.chunks)
        if d.chunks != ref.chunks:
            d = d.rechunk(ref.chunks)
        out.append(d)
    return out


# --- ordering of lazy stages ------------------------------------------------------


def _token_block(a: np.ndarray) -> np.ndarray:
    return np.zeros((1,) * a.ndim, dtype=np.int8)


def _join_tokens(*tokens: Any) -> np.ndarray:
    return np.zeros((), dtype=np.int8)


def done(*arrs: da.Array) -> da.Array:
    """0-d dask array that exists once every block of each of ``arrs`` is computed (one graph layer).

    A tiny token per block (blocks stay where they are on a cluster), then
    one task joining the tokens; no value is reduced. Pass it to
    :func:`after` to order a per-band (per-step) loop: the next band's FFTs
    wait for this band's results (every one of them: a result left out
    could lag behind, holding each band's inputs until it catches up), so
    one band's maps are in memory at a time, and the band updates are not
    fused into one final task.
    """
    name = "done-" + tokenize(*[a.name for a in arrs])
    tname = "done-token-" + name[len("done-"):]
    keys = [k for a in arrs for k in flatten(a.__dask_keys__())]
    dsk: dict = {(tname, i): (_token_block, k) for i, k in enumerate(keys)}
    dsk[(name,)] = (_join_tokens, *[(tname, i) for i in range(len(keys))])
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=list(arrs))
    return da.Array(graph, name, chunks=(), dtype=np.int8, meta=np.empty((), np.int8))


def _passthrough(block: np.ndarray, dep: Any) -> np.ndarray:
    return block


def after(spec: Spectrum, dep: da.Array | None) -> Spectrum:
    """``spec`` unchanged, but (lazily) computed only once the 0-d dask array ``dep`` exists (see :func:`done`).

    Orders stages in any scheduler; a no-op for ``dep=None`` or an in-memory spectrum.
    """
    if dep is None or not isinstance(spec.data, da.Array):
        return spec
    data = da.blockwise(_passthrough, "zyx", spec.data, "zyx", dep, "", dtype=spec.data.dtype,
                        meta=np.empty((0, 0, 0), spec.data.dtype))
    return replace(spec, data=data)


def apply(kernel: Callable[..., np.ndarray], spec: Spectrum, *others: Spectrum, with_index: bool = False,
          **kw: Any) -> Spectrum:
    """Run a pointwise Fourier-space kernel chunk-locally.

    Parameters
    ----------
    kernel
        ``kernel(F_block, *other_blocks, kz=..., ky=..., kx=..., **kw) ->
        complex block``; ``kz, ky, kx`` are broadcastable float64 arrays of
        the block's frequencies in 1/Å (``fftfreq`` / ``rfftfreq`` with
        ``d`` = voxel size).
    spec, others
        Spectra of the same shape; the others are rechunked like ``spec``.
    with_index
        Also pass ``index=(iz0, iy0, ix0)`` (global index of the block's first
        element) and ``fshape=(nz, ny, nx // 2 + 1)``, so that random numbers
        can be keyed by global index (chunk-invariant RNG).
    kw
        Passed to the kernel.

    Returns
    -------
    Spectrum
        Same geometry and chunks as ``spec``; lazy for dask input.
    """
    _check_same(spec, others)
    blocks = _aligned_data(spec, others)
    if not isinstance(blocks[0], da.Array):
        data = _call_kernel(kernel, blocks, spec.shape, spec.voxel_size, (0, 0, 0), with_index, kw)
        return replace(spec, data=data)
    func = _BlockApply(kernel, tuple(spec.shape), tuple(spec.voxel_size), _starts(blocks[0].chunks), with_index, kw)
    data = da.map_blocks(func, *blocks, dtype=np.complex64, meta=np.empty((0, 0, 0), np.complex64))
    return replace(spec, data=data)


def fourier_filter(vol: xr.DataArray, kernel: Callable[..., np.ndarray], *, strategy: str = "auto",
                   with_index: bool = False, name: str | None = None, support: float | None = None,
                   **kw: Any) -> xr.DataArray:
    """``irfft(apply(kernel, rfft(vol)))``: a Fourier-space filter of a Volume, lazy.

    The result has ``vol``'s geometry, chunks and header. ``support`` (1/Å):
    the kernel's output is zero wherever some ``|k_axis| > support`` (e.g. a
    low-pass); the transforms then run on that window only
    (:func:`window`), which is exact for such kernels and much cheaper for
    a low cut-off.
    """
    spec = apply(kernel, rfft(vol, strategy=strategy, limit=support), with_index=with_index, **kw)
    out = irfft(spec, chunks=vol.data.chunks if isinstance(vol.data, da.Array) else None,
                strategy="auto" if strategy == "auto" else strategy)
    return like(vol, out.data, name=name if name is not None else vol.name)


# --- shells ---------------------------------------------------------------------


def _box_length(shape, voxel_size) -> float:
    vs = as_triple(voxel_size, "voxel_size")
    return float(min(int(n) * v for n, v in zip(shape, vs)))


def n_shells(shape, voxel_size) -> int:
    """Number of Fourier shells, ``floor(N_min / 2) + 1`` (00_conventions §2)."""
    return int(min(int(n) for n in shape)) // 2 + 1


def shell_frequencies(shape, voxel_size) -> np.ndarray:
    """Frequency of each shell, ``s_i = i / L`` in 1/Å, ``L = min_axis(N_axis a_axis)``."""
    return np.arange(n_shells(shape, voxel_size), dtype=np.float64) / _box_length(shape, voxel_size)


def shell_index(kz, ky, kx, *, shape, voxel_size) -> np.ndarray:
    """Shell index of each frequency (00_conventions §2, RELION indexing generalised).

    ``i = round(|s| * L)`` with ``L = min_axis(N_axis * a_axis)`` Å, rounding
    halves up (``floor(x + 0.5)``, as RELION's ``ROUND``); frequencies beyond
    the last shell (``n_shells - 1``, the corners) get ``-1``.

    Parameters
    ----------
    kz, ky, kx
        Broadcastable frequency arrays in 1/Å.
    shape, voxel_size
        Real-space shape and voxel size (Å) of the map.

    Returns
    -------
    numpy.ndarray of int64
        Broadcast shape of the inputs.
    """
    L = _box_length(shape, voxel_size)
    s = np.sqrt(np.asarray(kz) ** 2 + np.asarray(ky) ** 2 + np.asarray(kx) ** 2)
    idx = np.floor(s * L + 0.5).astype(np.int64)
    idx[idx > n_shells(shape, voxel_size) - 1] = -1
    return idx


@dataclass
class ShellSums:
    """Per-shell sums over the rfft half-space (REDUCE stage).

    Attributes
    ----------
    index
        Shell numbers 0 … n-1.
    frequency
        Shell frequency ``i / L`` in 1/Å.
    resolution
        ``1 / frequency`` in Å (inf for shell 0).
    count
        Number of (weighted) Fourier voxels per shell.
    sum_f1f2
        Σ Re(F1 F2*).
    sum_f1sq, sum_f2sq
        Σ |F1|², Σ |F2|².
    sum_abs_f1
        Σ |F1| (for mean amplitudes).
    hermitian_weights
        Whether interior half-space voxels were counted twice.
    """

    index: np.ndarray
    frequency: np.ndarray
    resolution: np.ndarray
    count: np.ndarray
    sum_f1f2: np.ndarray
    sum_f1sq: np.ndarray
    sum_f2sq: np.ndarray
    sum_abs_f1: np.ndarray
    hermitian_weights: bool = False

    def fsc(self) -> np.ndarray:
        """Fourier shell correlation Σ Re(F1F2*) / sqrt(Σ|F1|² Σ|F2|²); 0 where undefined."""
        den = np.sqrt(self.sum_f1sq * self.sum_f2sq)
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.where(den > 0, self.sum_f1f2 / np.where(den > 0, den, 1.0), 0.0)
        return out

    def mean_amplitude(self) -> np.ndarray:
        """Mean |F1| per shell (0 for empty shells)."""
        return np.where(self.count > 0, self.sum_abs_f1 / np.maximum(self.count, 1e-300), 0.0)

    def mean_power(self) -> np.ndarray:
        """Mean |F1|² per shell (0 for empty shells)."""
        return np.where(self.count > 0, self.sum_f1sq / np.maximum(self.count, 1e-300), 0.0)

    def to_dict(self) -> dict:
        return {
            "index": self.index.tolist(),
            "frequency": self.frequency.tolist(),
            "resolution": [float(r) if np.isfinite(r) else None for r in self.resolution],
            "count": self.count.tolist(),
            "sum_f1f2": self.sum_f1f2.tolist(),
            "sum_f1sq": self.sum_f1sq.tolist(),
            "sum_f2sq": self.sum_f2sq.tolist(),
            "sum_abs_f1": self.sum_abs_f1.tolist(),
            "hermitian_weights": self.hermitian_weights,
        }


def _block_shell_sums(f1, f2, *, shape, vs, index, hermitian, nshell, two) -> np.ndarray:
    out = np.zeros((6, nshell), dtype=np.float64)
    for z0, z1 in _z_pieces(f1.shape, itemsize=16):
        out += _piece_shell_sums(f1[z0:z1], None if f2 is None else f2[z0:z1], shape=shape, vs=vs,
                                 index=(index[0] + z0, index[1], index[2]), hermitian=hermitian,
                                 nshell=nshell, two=two)
    return out


def _piece_shell_sums(f1, f2, *, shape, vs, index, hermitian, nshell, two) -> np.ndarray:
    kz, ky, kx = frequencies(shape, vs, index=index, block_shape=f1.shape)
    idx = shell_index(kz, ky, kx, shape=shape, voxel_size=vs)
    idx = np.broadcast_to(idx, f1.shape).ravel()
    keep = idx >= 0
    idx = idx[keep]
    a = np.asarray(f1).ravel()[keep].astype(np.complex128)
    if hermitian:
        nx = shape[2]
        ix = np.arange(index[2], index[2] + f1.shape[2])
        wx = np.where((ix == 0) | ((nx % 2 == 0) & (ix == nx // 2)), 1.0, 2.0)
        w = np.broadcast_to(wx[None, None, :], f1.shape).ravel()[keep]
    else:
        w = None
    out = np.zeros((6, nshell), dtype=np.float64)
    a2 = a.real**2 + a.imag**2
    out[0] = np.bincount(idx, weights=w, minlength=nshell)
    out[2] = np.bincount(idx, weights=a2 if w is None else a2 * w, minlength=nshell)
    absa = np.sqrt(a2)
    out[4] = np.bincount(idx, weights=absa if w is None else absa * w, minlength=nshell)
    if two:
        b = np.asarray(f2).ravel()[keep].astype(np.complex128)
        cross = a.real * b.real + a.imag * b.imag
        b2 = b.real**2 + b.imag**2
        out[1] = np.bincount(idx, weights=cross if w is None else cross * w, minlength=nshell)
        out[3] = np.bincount(idx, weights=b2 if w is None else b2 * w, minlength=nshell)
    else:
        out[1] = out[2]
        out[3] = out[2]
    return out


class _BlockShells:
    def __init__(self, shape, vs, starts, hermitian, nshell, two):
        self.shape, self.vs, self.starts = shape, vs, starts
        self.hermitian, self.nshell, self.two = hermitian, nshell, two

    def __call__(self, f1, f2=None, block_id=None):
        index = tuple(self.starts[ax][block_id[ax]] for ax in range(3))
        out = _block_shell_sums(f1, f2, shape=self.shape, vs=self.vs, index=index, hermitian=self.hermitian,
                                nshell=self.nshell, two=self.two)
        return out[None, None, None]


def _shell_arrays(spec1: Spectrum, spec2: Spectrum | None, hermitian_weights: bool):
    """Lazy (dask) or eager (numpy) (6, n_shells) array of shell sums."""
    others = (spec2,) if spec2 is not None else ()
    _check_same(spec1, others)
    blocks = _aligned_data(spec1, others)
    shape = tuple(spec1.shape)
    nshell = n_shells(shape, spec1.voxel_size)
    two = spec2 is not None
    if not isinstance(blocks[0], da.Array):
        return _block_shell_sums(blocks[0], blocks[1] if two else None, shape=shape, vs=spec1.voxel_size,
                                 index=(0, 0, 0), hermitian=hermitian_weights, nshell=nshell, two=two)
    func = _BlockShells(shape, tuple(spec1.voxel_size), _starts(blocks[0].chunks), hermitian_weights, nshell, two)
    per = da.map_blocks(func, *blocks, dtype=np.float64, new_axis=[3, 4],
                        chunks=((1,) * len(blocks[0].chunks[0]), (1,) * len(blocks[0].chunks[1]),
                                (1,) * len(blocks[0].chunks[2]), (6,), (nshell,)),
                        meta=np.empty((0, 0, 0, 0, 0), np.float64))
    return per.sum(axis=(0, 1, 2))


def _make_sums(arr: np.ndarray, spec: Spectrum, hermitian_weights: bool) -> ShellSums:
    freq = shell_frequencies(spec.shape, spec.voxel_size)
    with np.errstate(divide="ignore"):
        res = np.where(freq > 0, 1.0 / np.where(freq > 0, freq, 1.0), np.inf)
    return ShellSums(
        index=np.arange(freq.size),
        frequency=freq,
        resolution=res,
        count=arr[0].copy(),
        sum_f1f2=arr[1].copy(),
        sum_f1sq=arr[2].copy(),
        sum_f2sq=arr[3].copy(),
        sum_abs_f1=arr[4].copy(),
        hermitian_weights=hermitian_weights,
    )


def shell_sums(spec1: Spectrum, spec2: Spectrum | None = None, *, hermitian_weights: bool = False,
               progress: bool | None = None) -> ShellSums:
    """Per-shell sums of two spectra (FSC ingredients); computes.

    Parameters
    ----------
    spec1, spec2
        Spectra of the same shape and voxel size. Without ``spec2`` the
        cross and second sums equal ``Σ|F1|²`` (FSC 1).
    hermitian_weights
        False (compat default, RELION): every half-space voxel counted once.
        True: interior voxels weighted 2 (each stands for a Friedel pair),
        the ``k_x = 0`` and (even ``nx``) Nyquist planes weighted 1.
    progress
        Progress bar (default: ``chunkem.progress`` setting).

    Returns
    -------
    ShellSums
        numpy arrays of length :func:`n_shells`.
    """
    arr = _shell_arrays(spec1, spec2, hermitian_weights)
    if isinstance(arr, da.Array):
        from .cluster import compute

        (arr,) = compute(arr, progress=progress, label="shell sums")
    return _make_sums(np.asarray(arr), spec1, hermitian_weights)


def radial_profile(spec: Spectrum, *, hermitian_weights: bool = False, progress: bool | None = None) -> ShellSums:
    """Rotationally averaged profile of a spectrum: use ``.mean_amplitude()`` / ``.mean_power()``."""
    return shell_sums(spec, None, hermitian_weights=hermitian_weights, progress=progress)


# --- several pairs in one pass ---------------------------------------------------


def _piece_sums_many(fs, pairs, *, shape, vs, index, hermitian, nshell, amplitudes) -> np.ndarray:
    """(len(pairs), 6, nshell) sums of one piece; products in float32, sums in float64.

    The shell index, the voxel count and each spectrum's ``|F|²`` are worked
    out once and shared by every pair; corner voxels (index -1) go to a dump
    bin that is dropped, so no masked copies are made.
    """
    kz, ky, kx = frequencies(shape, vs, index=index, block_shape=fs[0].shape)
    idx = shell_index(kz, ky, kx, shape=shape, voxel_size=vs)
    idx = np.broadcast_to(idx, fs[0].shape).ravel()
    idx = np.where(idx < 0, nshell, idx)
    nb = nshell + 1
    if hermitian:
        nx = shape[2]
        ix = np.arange(index[2], index[2] + fs[0].shape[2])
        wx = np.where((ix == 0) | ((nx % 2 == 0) & (ix == nx // 2)), 1.0, 2.0).astype(np.float32)[None, None, :]
    else:
        wx = None

    def weighted(x):
        return (x if wx is None else x * wx).ravel()

    count = np.bincount(idx, weights=None if wx is None else np.broadcast_to(wx, fs[0].shape).ravel(),
                        minlength=nb)[:nshell]
    power: dict[int, np.ndarray] = {}

    def sq(i):
        if i not in power:
            power[i] = np.square(np.abs(fs[i]))
        return power[i]

    out = np.zeros((len(pairs), 6, nshell), dtype=np.float64)
    for p, (i, j) in enumerate(pairs):
        out[p, 0] = count
        a2 = np.bincount(idx, weights=weighted(sq(i)), minlength=nb)[:nshell]
        out[p, 2] = a2
        if amplitudes:
            out[p, 4] = np.bincount(idx, weights=weighted(np.abs(fs[i])), minlength=nb)[:nshell]
        if j is None:
            out[p, 1] = a2
            out[p, 3] = a2
        else:
            cross = (fs[i] * fs[j].conj()).real  # Re(F1 F2*)
            out[p, 1] = np.bincount(idx, weights=weighted(cross), minlength=nb)[:nshell]
            out[p, 3] = np.bincount(idx, weights=weighted(sq(j)), minlength=nb)[:nshell]
    return out


class _BlockShellsMany:
    def __init__(self, shape, vs, starts, hermitian, nshell, pairs, amplitudes):
        self.shape, self.vs, self.starts = shape, vs, starts
        self.hermitian, self.nshell, self.pairs, self.amplitudes = hermitian, nshell, pairs, amplitudes

    def __call__(self, *blocks, block_id=None):
        index = tuple(self.starts[ax][block_id[ax]] for ax in range(3)) if block_id is not None else (0, 0, 0)
        out = np.zeros((len(self.pairs), 6, self.nshell), dtype=np.float64)
        _, by, bx = blocks[0].shape
        for z0, z1 in _z_pieces(blocks[0].shape, itemsize=8 * max(1, len(blocks))):
            at = (index[0] + z0, index[1], index[2])
            for (y0, y1), (x0, x1) in _inside_ranges(self.shape, self.vs, at, (z1 - z0, by, bx), self.nshell):
                sub = [np.ascontiguousarray(b[z0:z1, y0:y1, x0:x1], dtype=np.complex64) for b in blocks]
                out += _piece_sums_many(sub, self.pairs, shape=self.shape, vs=self.vs,
                                        index=(at[0], at[1] + y0, at[2] + x0), hermitian=self.hermitian,
                                        nshell=self.nshell, amplitudes=self.amplitudes)
        return out[None, None, None]


def _runs(ok: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous ``[start, stop)`` runs of True in a 1-D boolean array."""
    d = np.diff(np.concatenate(([0], ok.astype(np.int8), [0])))
    return list(zip(np.nonzero(d == 1)[0].tolist(), np.nonzero(d == -1)[0].tolist()))


def _inside_ranges(shape, vs, index, bshape, nshell) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(y, x) slices of a block piece that can hold voxels of shells ``0 … nshell-1``.

    A voxel is in a shell when ``|s| < (nshell - 0.5) / L``; so its ``ky²``
    and ``kx²`` are below that bound squared minus the piece's smallest
    ``kz²``. The slices are a superset (the exact shell index is still
    worked out per voxel): they only spare the corners beyond the last shell
    (about half the rfft half-space of a cube) the products and bincounts.
    """
    kz, ky, kx = frequencies(shape, vs, index=index, block_shape=bshape)
    smax2 = ((nshell - 0.5) / _box_length(shape, vs)) ** 2 * (1 + 1e-9)
    rem = smax2 - float((kz**2).min())
    if rem < 0:
        return []
    return [(y, x) for y in _runs(ky.ravel() ** 2 <= rem) for x in _runs(kx.ravel() ** 2 <= rem)]


def shell_sums_many(pairs, *, hermitian_weights: bool = False, amplitudes: bool = True,
                    progress: bool | None = None, min_tasks: int | None = None) -> list[ShellSums]:
    """Per-shell sums of several spectrum pairs in one pass (one dask compute).

    Like calling :func:`shell_sums` on each pair, but each distinct spectrum
    (by identity) is computed once even when it appears in several pairs,
    and the shell index and voxel count are shared. Products are formed in
    float32 from the complex64 spectra and summed in float64 (relative
    error ~1e-7, well below any FSC use).

    Parameters
    ----------
    pairs
        Sequence of ``(spec1, spec2)``; ``spec2`` may be None (as in
        :func:`shell_sums`). All spectra must share shape and voxel size.
    hermitian_weights
        As in :func:`shell_sums`.
    amplitudes
        Also sum ``|F1|`` (``ShellSums.sum_abs_f1``); False leaves it zero
        and saves one pass per pair.
    progress
        Progress bar (default: ``chunkem.progress`` setting).
    min_tasks
        Split single-chunk (gathered) spectra along z into at least this many
        blocks so that the sums run on several threads/workers (default: the
        number of dask workers/threads, at most 8).

    Returns
    -------
    list of ShellSums, one per pair, in order.
    """
    pairs = [(a, b) for a, b in pairs]
    if not pairs:
        return []
    uniq: list[Spectrum] = []
    ids: dict[int, int] = {}
    for a, b in pairs:
        for s in (a, b):
            if s is not None and id(s) not in ids:
                ids[id(s)] = len(uniq)
                uniq.append(s)
    ref = uniq[0]
    _check_same(ref, tuple(uniq[1:]))
    ipairs = tuple((ids[id(a)], None if b is None else ids[id(b)]) for a, b in pairs)
    blocks = _aligned_data(ref, tuple(uniq[1:]))
    shape = tuple(ref.shape)
    vs = tuple(ref.voxel_size)
    nshell = n_shells(shape, vs)
    if not isinstance(blocks[0], da.Array):
        func = _BlockShellsMany(shape, vs, ((0,), (0,), (0,)), hermitian_weights, nshell, ipairs, amplitudes)
        arr = func(*blocks, block_id=(0, 0, 0))[0, 0, 0]
    else:
        if min_tasks is None:
            import dask

            min_tasks = min(8, int(dask.config.get("num_workers", None) or _n_threads()))
        if blocks[0].npartitions < min_tasks and blocks[0].shape[0] >= 2 * min_tasks:
            cz = -(-blocks[0].shape[0] // max(1, min_tasks))
            blocks = [b.rechunk({0: cz}) for b in blocks]
        func = _BlockShellsMany(shape, vs, _starts(blocks[0].chunks), hermitian_weights, nshell, ipairs, amplitudes)
        c = blocks[0].chunks
        per = da.map_blocks(func, *blocks, dtype=np.float64, new_axis=[3, 4, 5],
                            chunks=((1,) * len(c[0]), (1,) * len(c[1]), (1,) * len(c[2]), (len(ipairs),), (6,),
                                    (nshell,)),
                            meta=np.empty((0, 0, 0, 0, 0, 0), np.float64))
        from .cluster import compute

        (arr,) = compute(per.sum(axis=(0, 1, 2)), progress=progress, label="shell sums", **local_scheduler())
    arr = np.asarray(arr)
    return [_make_sums(arr[p], ref, hermitian_weights) for p in range(len(ipairs))]


def _n_threads() -> int:
    import os

    from .cluster import active_client

    client = active_client()
    if client is not None:
        try:
            return max(1, sum(w.get("nthreads", 1) for w in client.scheduler_info()["workers"].values()))
        except Exception:  # pragma: no cover
            return 1
    return os.cpu_count() or 1


def local_scheduler() -> dict:
    """``{"scheduler": dask.threaded.get}`` when the threaded scheduler would run anyway, else ``{}``.

    Passed to ``dask.compute``/``persist``: naming the threaded scheduler by
    its function skips dask's look-up of a distributed Client, which imports
    ``distributed`` (~0.5 s of a short command-line run).
    """
    import dask

    from .cluster import active_client

    if active_client() is None and dask.config.get("scheduler", None) in (None, "threads", "threading"):
        import dask.threaded

        return {"scheduler": dask.threaded.get}
    return {}
