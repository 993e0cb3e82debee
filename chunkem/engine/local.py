"""LOCAL stages: a numpy kernel run over the chunks of one or more Volumes with a halo.

The op states how far its output depends on its input (``reach``, in Å, from
the physics: a smoothing width, a window radius, an atom's reach); this
module turns it into a halo per axis, ``ceil(reach / voxel_size)``, and runs
the kernel with :func:`dask.array.map_overlap`.

With ``boundary="none"`` (the default) a block at the true edge of the map is
simply truncated there, and the kernel's own edge mode (e.g. scipy.ndimage's
``mode="reflect"``) handles the edge exactly as it would on the whole array:
when the halo covers the kernel's reach the chunked result is bit-identical
to one whole-array call, and the graph has about 4x fewer tasks than with a
padding boundary.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr

from ..errors import GeometryError, ParameterError
from ..volume import as_triple, check_aligned, like, make_volume, origin, voxel_size
from .chunks import min_chunk_chunks

__all__ = ["halo_voxels", "run_local", "BOUNDARIES", "pad_array", "extend", "crop", "fft_widths"]

BOUNDARIES = ("none", "periodic", "reflect", "nearest")
# numpy.pad modes equivalent to dask's overlap boundaries (dask "reflect"
# repeats the edge voxel, which is numpy's "symmetric")
_NP_PAD = {"periodic": "wrap", "reflect": "symmetric", "nearest": "edge"}


def halo_voxels(reach: float | Sequence[float], voxel_size: float | Sequence[float]) -> tuple[int, int, int]:
    """Halo depth per axis (z, y, x) in voxels for a reach in Å.

    ``ceil(reach / voxel_size)`` per axis (a reach that is an exact multiple
    of the voxel size, up to 1e-9 relative, is not rounded up).

    Examples
    --------
    >>> halo_voxels(10.0, (2.0, 3.0, 4.0))
    (5, 4, 3)
    """
    r = as_triple(reach, "reach")
    v = as_triple(voxel_size, "voxel_size")
    out = []
    for ri, vi in zip(r, v):
        if not math.isfinite(ri) or ri < 0:
            raise ParameterError(f"reach must be a finite distance >= 0 Å, got {reach!r}")
        if vi <= 0:
            raise ParameterError(f"voxel size must be positive, got {voxel_size!r}")
        q = ri / vi
        out.append(int(math.ceil(q - 1e-9 * max(1.0, q))))
    return tuple(out)  # type: ignore[return-value]


def _wants(kernel: Callable, name: str) -> bool:
    try:
        params = inspect.signature(kernel).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _check_boundary(boundary: Any) -> Any:
    if isinstance(boundary, str):
        if boundary not in BOUNDARIES:
            raise ParameterError(
                f"boundary must be one of {', '.join(BOUNDARIES)} or a number, got {boundary!r}"
            )
        return boundary
    if np.ndim(boundary) == 0:
        return float(boundary)
    raise ParameterError(f"boundary must be one of {', '.join(BOUNDARIES)} or a number, got {boundary!r}")


class _BlockKernel:
    """Picklable wrapper calling the kernel on one overlapped block."""

    def __init__(self, kernel, dtype, starts, depth, boundary, org, vs, with_offset, kwargs, outputs=None,
                 trim=None):
        self.kernel = kernel
        self.outputs = outputs  # None: one output of the block's shape; n: (n, *block) stacked
        self.trim = trim  # per axis (number of chunks): the wrapper trims the halo itself (stacked outputs)
        self.dtype = np.dtype(dtype)
        self.starts = starts  # per axis: chunk start indices (original array)
        self.depth = depth
        self.boundary = boundary
        self.origin = org
        self.vs = vs
        self.with_offset = with_offset
        self.kwargs = kwargs

    def __call__(self, *blocks: np.ndarray, block_id: tuple[int, ...] | None = None) -> np.ndarray:
        kw = dict(self.kwargs)
        bid = tuple(block_id[-3:]) if block_id is not None else (0, 0, 0)  # stacked outputs: (0, z, y, x)
        if self.with_offset:
            first = []
            for ax in range(3):
                s = self.starts[ax][bid[ax]] - self.depth[ax]
                if self.boundary == "none":
                    s = max(0, s)
                first.append(s)
            kw["offset"] = tuple(o + i * v for o, i, v in zip(self.origin, first, self.vs))
            kw["voxel_size"] = self.vs
        out = np.asarray(self.kernel(*blocks, **kw))
        want = blocks[0].shape if self.outputs is None else (self.outputs,) + blocks[0].shape
        if out.shape != want:
            raise GeometryError(
                f"kernel {getattr(self.kernel, '__name__', self.kernel)!r} returned shape {out.shape} "
                f"for a block of shape {blocks[0].shape} (expected {want})"
            )
        if self.trim is not None:  # the halo map_overlap added on each side of this block
            sl = []
            for ax in range(3):
                d = self.depth[ax]
                lo = d if (bid[ax] > 0 or self.boundary != "none") else 0
                hi = d if (bid[ax] < self.trim[ax] - 1 or self.boundary != "none") else 0
                sl.append(slice(lo, out.shape[ax + 1] - hi))
            out = out[(slice(None),) + tuple(sl)]
        return out.astype(self.dtype, copy=False)


def _numpy_call(kernel, arrays, depth, boundary, org, vs, with_offset, dtype, kwargs, outputs=None) -> np.ndarray:
    kw = dict(kwargs)
    lead = () if outputs is None else (outputs,)
    if boundary == "none":
        if with_offset:
            kw["offset"] = tuple(org)
            kw["voxel_size"] = tuple(vs)
        out = np.asarray(kernel(*arrays, **kw))
        if out.shape != lead + arrays[0].shape:
            raise GeometryError(f"kernel returned shape {out.shape} for an array of shape {arrays[0].shape}"
                                + ("" if outputs is None else f" (expected {lead + arrays[0].shape})"))
        return out.astype(dtype, copy=False)
    pad = [(d, d) for d in depth]
    if isinstance(boundary, str):
        padded = [np.pad(a, pad, mode=_NP_PAD[boundary]) for a in arrays]
    else:
        padded = [np.pad(a, pad, mode="constant", constant_values=boundary) for a in arrays]
    if with_offset:
        kw["offset"] = tuple(o - d * v for o, d, v in zip(org, depth, vs))
        kw["voxel_size"] = tuple(vs)
    out = np.asarray(kernel(*padded, **kw))
    if out.shape != lead + padded[0].shape:
        raise GeometryError(f"kernel returned shape {out.shape} for an array of shape {padded[0].shape}"
                            + ("" if outputs is None else f" (expected {lead + padded[0].shape})"))
    sl = tuple(slice(None) for _ in lead) + tuple(slice(d, d + n) for d, n in zip(depth, arrays[0].shape))
    return out[sl].astype(dtype, copy=False)


def run_local(
    kernel: Callable[..., np.ndarray],
    *volumes: xr.DataArray,
    reach: float | Sequence[float],
    boundary: Any = "none",
    with_offset: bool = False,
    dtype: Any = np.float32,
    name: str | None = None,
    outputs: int | None = None,
    **kernel_kwargs: Any,
) -> Any:
    """Run a numpy kernel over aligned Volumes with a halo of ``reach`` Å.

    Parameters
    ----------
    kernel
        ``kernel(*blocks, **kernel_kwargs) -> ndarray`` of the shape of
        ``blocks[0]``. Pure numpy/scipy; it sees plain in-memory blocks that
        include the halo, and must handle the true map edge itself (its own
        edge mode) when ``boundary="none"``.
    volumes
        One or more Volumes with the same shape, voxel size and origin.
        Dask-backed inputs are aligned to the chunks of the first dask one.
    reach
        Distance in Å (one number or (z, y, x)) over which an output voxel
        depends on the input; the halo per axis is ``ceil(reach / voxel_size)``.
    boundary
        ``"none"`` (default: blocks truncated at the map edge, the kernel's
        own edge mode applies), ``"periodic"``, ``"reflect"`` (numpy's
        ``symmetric``), ``"nearest"`` or a constant value for padding.
    with_offset
        Also pass ``offset=(oz, oy, ox)``: the position in Å of the block's
        first voxel (halo included), and ``voxel_size=(vz, vy, vx)`` Å.
    dtype
        Output dtype of the kernel: float32, the dtype of every Volume
        (anything else is refused rather than silently cast).
    name
        Name of the output Volume (default: the first input's name).
    outputs
        ``None`` (default): the kernel returns one array of the block's
        shape. ``n``: it returns ``n`` of them stacked, shape
        ``(n, *block.shape)`` (several results from one pass, e.g. one per
        FSC cutoff), and a list of ``n`` Volumes is returned; lazily they
        share the kernel's tasks (computed together, the kernel runs once
        per block).
    kernel_kwargs
        Passed to the kernel unchanged.

    Returns
    -------
    xarray.DataArray or list of xarray.DataArray
        Volume with the geometry of ``volumes[0]`` (a list of ``outputs``
        of them); lazy (dask) when any input is dask-backed, else numpy (the
        kernel is then called once on the whole arrays).

    Notes
    -----
    Chunks thinner than the halo are merged with a neighbour first, so the
    halo never needs data beyond the adjacent block. Along an axis held in
    one chunk no halo is needed with ``boundary="none"``.

    Examples
    --------
    >>> import numpy as np, scipy.ndimage as ndi
    >>> from chunkem.volume import make_volume
    >>> v = make_volume(np.random.default_rng(0).random((20, 21, 22)), voxel_size=2.0).chunk(7)
    >>> out = run_local(ndi.uniform_filter, v, reach=2.0, size=3)
    >>> bool(np.array_equal(out.values, ndi.uniform_filter(v.values, size=3)))
    True
    """
    if not volumes:
        raise ParameterError("run_local needs at least one Volume")
    if np.dtype(dtype) != np.float32:
        raise ParameterError(f"run_local: dtype={np.dtype(dtype)}, but a Volume holds float32 and the result would "
                             "be cast; encode the kernel's output in float32 (e.g. small integers)")
    for v in volumes:
        if not isinstance(v, xr.DataArray):
            raise GeometryError(f"run_local: expected Volumes (xarray.DataArray), got {type(v).__name__}")
    check_aligned(*volumes)
    boundary = _check_boundary(boundary)
    ref = volumes[0]
    vs = voxel_size(ref)
    org = origin(ref)
    depth = list(halo_voxels(reach, vs))
    shape = tuple(int(n) for n in ref.shape)
    if with_offset and not _wants(kernel, "offset"):
        raise ParameterError(f"with_offset=True but kernel {getattr(kernel, '__name__', kernel)!r} takes no 'offset'")
    out_name = name if name is not None else ref.name
    if outputs is not None and (isinstance(outputs, bool) or int(outputs) != outputs or outputs < 1):
        raise ParameterError(f"run_local: outputs must be a positive integer or None, got {outputs!r}")

    def result(out):
        if outputs is None:
            return like(ref, out, name=out_name)
        return [like(ref, out[i], name=out_name) for i in range(int(outputs))]

    lazy = [isinstance(v.data, da.Array) for v in volumes]
    if not any(lazy):
        arrays = [np.asarray(v.data) for v in volumes]
        if boundary != "none" and any(d > n for d, n in zip(depth, shape)):
            raise ParameterError(f"reach {reach} Å is larger than the map {shape} for boundary={boundary!r}")
        out = _numpy_call(kernel, arrays, depth, boundary, org, vs, with_offset, dtype, kernel_kwargs, outputs)
        return result(out)

    first = volumes[lazy.index(True)].data
    chunks = list(first.chunks)
    for ax in range(3):
        if len(chunks[ax]) == 1:
            if boundary == "none":
                depth[ax] = 0
            elif depth[ax] > shape[ax]:
                raise ParameterError(
                    f"reach {reach} Å is larger than the map along {'zyx'[ax]} ({shape[ax]} voxels) "
                    f"for boundary={boundary!r}"
                )
        else:
            depth[ax] = min(depth[ax], shape[ax])
            chunks[ax] = min_chunk_chunks(chunks[ax], depth[ax])
    chunks_t = tuple(tuple(c) for c in chunks)
    arrays = []
    for v in volumes:
        a = v.data if isinstance(v.data, da.Array) else da.from_array(np.asarray(v.data), chunks=chunks_t)
        if a.chunks != chunks_t:
            a = a.rechunk(chunks_t)
        arrays.append(a)
    starts = tuple(tuple(int(s) for s in np.cumsum((0,) + c[:-1])) for c in chunks_t)
    depth_d = {ax: int(d) for ax, d in enumerate(depth)}
    if outputs is not None:  # stacked along a new first axis; the wrapper trims the halo itself
        nblocks = tuple(len(c) for c in chunks_t)
        func = _BlockKernel(kernel, dtype, starts, tuple(depth), boundary, org, vs, with_offset, kernel_kwargs,
                            outputs=int(outputs), trim=nblocks if any(depth) else None)
        stacked = dict(new_axis=[0], chunks=((int(outputs),),) + chunks_t, dtype=np.dtype(dtype),
                       meta=np.empty((0, 0, 0, 0), dtype=dtype))
        if not any(depth):
            return result(da.map_blocks(func, *arrays, **stacked))
        return result(da.map_overlap(func, *arrays, depth=depth_d, boundary=boundary, trim=False,
                                     align_arrays=False, allow_rechunk=False, **stacked))
    func = _BlockKernel(kernel, dtype, starts, tuple(depth), boundary, org, vs, with_offset, kernel_kwargs)
    if all(d == 0 for d in depth):
        out = da.map_blocks(func, *arrays, dtype=np.dtype(dtype), meta=np.empty((0, 0, 0), dtype=dtype))
    else:
        out = da.map_overlap(
            func,
            *arrays,
            depth=depth_d,
            boundary=boundary,
            trim=True,
            align_arrays=False,
            allow_rechunk=False,
            dtype=np.dtype(dtype),
            meta=np.empty((0, 0, 0), dtype=dtype),
        )
    return result(out)


# --------------------------------------------------------------------------- extending a map beyond its faces

_PAD_MODES = ("symmetric", "constant")


class _PadBlock:
    """Picklable: pad one block on the sides where it touches the array edge."""

    def __init__(self, widths, numblocks, mode):
        self.widths = widths
        self.numblocks = numblocks
        self.mode = mode

    def __call__(self, block: np.ndarray, value: Any = 0.0, block_info=None) -> np.ndarray:
        idx = block_info[0]["chunk-location"] if block_info else (0,) * block.ndim
        pads = [((a if i == 0 else 0), (b if i == n - 1 else 0))
                for (a, b), i, n in zip(self.widths, idx, self.numblocks)]
        if self.mode == "symmetric":
            return np.pad(block, pads, mode="symmetric")
        return np.pad(block, pads, mode="constant", constant_values=np.asarray(value, dtype=block.dtype).item())


def pad_array(x: Any, widths: Sequence[tuple[int, int]], *, mode: str = "symmetric", value: Any = 0.0) -> Any:
    """Pad a 3-D numpy or dask array by ``widths`` ((before, after) voxels per axis).

    ``mode="symmetric"``: mirrored at each face, the face voxel repeated
    (numpy's ``symmetric``, dask's ``reflect``); ``"constant"``: ``value``
    (a number or a lazy 0-d array). Dask arrays keep their block grid: the
    pads join the first / last chunk of each axis (one task per block; edge
    chunks thinner than a mirrored pad are merged with their neighbour
    first), so the result does not depend on the chunking.
    """
    if mode not in _PAD_MODES:
        raise ParameterError(f"pad mode must be one of {', '.join(_PAD_MODES)}, got {mode!r}")
    widths = [(int(a), int(b)) for a, b in widths]
    if any(a < 0 or b < 0 for a, b in widths):
        raise ParameterError(f"pad widths must be >= 0 voxels, got {widths}")
    if not any(a or b for a, b in widths):
        return x
    if not isinstance(x, da.Array):
        if mode == "symmetric":
            return np.pad(np.asarray(x), widths, mode="symmetric")
        return np.pad(np.asarray(x), widths, mode="constant", constant_values=np.asarray(value).item())
    if mode == "symmetric":  # a mirrored pad comes from the edge chunk itself: at least as thick as the pad
        want = tuple(min_chunk_chunks(c, max(a, b)) if len(c) > 1 else c for c, (a, b) in zip(x.chunks, widths))
        if want != x.chunks:
            x = x.rechunk(want)
    chunks = []
    for c, (a, b) in zip(x.chunks, widths):
        c = list(c)
        c[0] += a
        c[-1] += b
        chunks.append(tuple(c))
    fn = _PadBlock(widths, x.numblocks, mode)
    if mode == "constant" and isinstance(value, da.Array):
        return da.map_blocks(fn, x, value, chunks=tuple(chunks), dtype=x.dtype)
    return da.map_blocks(fn, x, float(value) if mode == "constant" else 0.0, chunks=tuple(chunks), dtype=x.dtype)


def extend(vol: xr.DataArray, widths: Sequence[tuple[int, int]], *, mode: str = "symmetric",
           value: Any = 0.0) -> xr.DataArray:
    """The Volume extended beyond its faces by ``widths`` ((before, after) voxels per axis), as
    :func:`pad_array` does; the origin moves by ``-before`` voxels, so every voxel keeps its position in Å.
    Lazy in, lazy out. :func:`crop` with the same widths gives the Volume back; zero widths give ``vol``."""
    if not any(int(a) or int(b) for a, b in widths):
        return vol
    data = pad_array(vol.data, widths, mode=mode, value=value)
    org = tuple(o - int(a) * v for o, (a, _), v in zip(origin(vol), widths, voxel_size(vol)))
    return make_volume(data, voxel_size=voxel_size(vol), origin=org, name=vol.name,
                       header=(vol.attrs.get("header") or None))


def crop(vol: xr.DataArray, widths: Sequence[tuple[int, int]]) -> xr.DataArray:
    """The Volume without ``widths`` ((before, after) voxels per axis) at its faces (origin moved to match):
    the inverse of :func:`extend`."""
    widths = [(int(a), int(b)) for a, b in widths]
    if not any(a or b for a, b in widths):
        return vol
    sl = tuple(slice(a, n - b) for (a, b), n in zip(widths, vol.shape))
    if any(s.stop <= s.start for s in sl):
        raise ParameterError(f"crop: widths {widths} leave nothing of a Volume of shape {tuple(vol.shape)}")
    org = tuple(o + a * v for o, (a, _), v in zip(origin(vol), widths, voxel_size(vol)))
    return make_volume(vol.data[sl], voxel_size=voxel_size(vol), origin=org, name=vol.name,
                       header=(vol.attrs.get("header") or None))


def fft_widths(before: Sequence[int], shape: Sequence[int]) -> list[tuple[int, int]]:
    """Pad widths ``(before, after)`` per axis for a map about to be Fourier transformed: ``before`` voxels on
    the low side, at least as many on the high side, up to an FFT-friendly length
    (``scipy.fft.next_fast_len``, real transforms); ``(0, 0)`` where ``before`` is 0."""
    import scipy.fft

    out = []
    for b, n in zip(before, shape):
        b, n = int(b), int(n)
        out.append((b, scipy.fft.next_fast_len(n + 2 * b, real=True) - n - b) if b > 0 else (0, 0))
    return out
