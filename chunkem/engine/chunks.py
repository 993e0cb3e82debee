"""Chunk choice for Volumes: default chunk edges and halo-safe rechunking.

Graph size depends only on the number of blocks (about 25-30 tasks per block
for a halo stage with ``boundary="none"``), so chunk edges of 128-256 voxels
keep a whole 2048³ computation under 10⁵ tasks while a block (plus halo)
stays small enough for any worker.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .. import config
from ..errors import ParameterError

__all__ = ["auto_chunks", "min_chunk_chunks", "slab_depth", "as_dask"]


def auto_chunks(shape: Sequence[int], *, itemsize: int = 4, edge: int | None = None) -> tuple[int, int, int]:
    """Chunk shape (cz, cy, cx) for a map of ``shape``.

    Parameters
    ----------
    shape
        Array shape (z, y, x) in voxels.
    itemsize
        Bytes per voxel (4 for float32, 8 for complex64). The default edge
        is scaled down by ``cbrt(itemsize / 4)`` so that a chunk of a wider
        dtype holds about as many bytes as a float32 chunk.
    edge
        Chunk edge in voxels; default: the ``chunkem.chunks`` setting (128).

    Returns
    -------
    tuple of int
        Never larger than the shape along any axis.

    Examples
    --------
    >>> auto_chunks((300, 100, 1000), edge=128)
    (128, 100, 128)
    """
    if len(shape) != 3:
        raise ParameterError(f"shape must have 3 axes (z, y, x), got {tuple(shape)}")
    if edge is None:
        edge = int(config.get("chunks", 128))
        if itemsize > 4:
            edge = max(16, int(round(edge / (itemsize / 4) ** (1 / 3))))
    edge = int(edge)
    if edge < 1:
        raise ParameterError(f"chunk edge must be at least 1 voxel, got {edge}")
    return tuple(max(1, min(int(n), edge)) for n in shape)  # type: ignore[return-value]


def min_chunk_chunks(chunks: Sequence[int], depth: int) -> tuple[int, ...]:
    """Re-split one axis's chunk sizes so that every chunk is at least ``depth`` thick.

    The axis keeps its total length; chunks thinner than ``depth`` are merged
    with a neighbour. A single chunk is returned unchanged.

    Examples
    --------
    >>> min_chunk_chunks((10, 10, 3), 4)
    (10, 13)
    >>> min_chunk_chunks((2, 2, 2, 2), 3)
    (4, 4)
    """
    chunks = tuple(int(c) for c in chunks)
    if depth <= 0 or len(chunks) <= 1 or min(chunks) >= depth:
        return chunks
    out: list[int] = []
    acc = 0
    for c in chunks:
        acc += c
        if acc >= depth:
            out.append(acc)
            acc = 0
    if acc:
        if out:
            out[-1] += acc
        else:
            out.append(acc)
    return tuple(out)


def slab_depth(plane_bytes: int, n: int, *, target_bytes: int | None = None) -> int:
    """Number of planes per slab so that a slab holds about ``target_bytes``.

    ``target_bytes`` defaults to the ``chunkem.fft-slab-bytes`` setting.
    """
    if target_bytes is None:
        target_bytes = int(config.get("fft-slab-bytes", 64 * 2**20))
    return int(max(1, min(n, target_bytes // max(1, plane_bytes))))


def as_dask(data, chunks=None):
    """``data`` as a dask array (numpy input is wrapped with :func:`auto_chunks`)."""
    import dask.array as da

    if isinstance(data, da.Array):
        return data
    arr = np.asarray(data)
    return da.from_array(arr, chunks=chunks or auto_chunks(arr.shape, itemsize=arr.dtype.itemsize))
