"""Rechunking through scratch files on disk, for out-of-core transposes.

The slab FFT (:mod:`chunkem.engine.spectral`) turns z-slabs into z-pencils
and back: an all-to-all exchange in which every output chunk needs a piece
of every input chunk. When the map is several times larger than the
cluster's memory, dask's in-memory rechunk (``tasks``) has to hold or spill
many small intermediate pieces, and P2P rechunking keeps large transfer
buffers. :func:`disk_rechunk` does the exchange through the file system
instead:

* one task per input chunk writes each of its intersections with the output
  chunks as a ``.npy`` file (temporary name, then rename, so a retried task
  never leaves a torn piece);
* one task per output chunk waits for exactly the writers it needs, then
  reads its pieces into one preallocated array.

No task holds more than one input or one output chunk; the pieces live on
disk (page cache first), not in worker memory. Every task can be retried
(a dead worker only costs its own tasks): the pieces stay until the scratch
folder is removed, which :func:`chunkem.engine.cluster.compute_session` does
when it closes (and :func:`clear_scratch` at process exit otherwise).

The scratch folder (``chunkem.fft-scratch``, default dask's
``temporary-directory`` or the system temp folder) must be visible to every
worker: automatic use is limited to workers on this machine unless the
setting names a shared folder explicitly.
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import dask
import dask.array as da
import numpy as np
from dask.highlevelgraph import HighLevelGraph

from .. import config
from ..errors import ParameterError

__all__ = ["disk_rechunk", "scratch_root", "clear_scratch", "scratch_dirs"]

_DIRS: list[str] = []


def scratch_root() -> Path:
    """Folder under which transposes put their pieces (``chunkem.fft-scratch``)."""
    root = config.get("fft-scratch", None) or dask.config.get("temporary-directory", None) or tempfile.gettempdir()
    return Path(root)


def scratch_dirs() -> list[str]:
    """Scratch folders created by this process and not yet removed."""
    return [d for d in _DIRS if os.path.isdir(d)]


def clear_scratch(keep: int = 0) -> None:
    """Remove the scratch folders created after the first ``keep`` ones."""
    while len(_DIRS) > keep:
        shutil.rmtree(_DIRS.pop(), ignore_errors=True)


atexit.register(clear_scratch)


def _bounds(chunks: tuple[int, ...]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)


def _overlaps(b_from: np.ndarray, b_to: np.ndarray, i: int) -> range:
    """Indices of the chunks of ``b_to`` overlapping chunk ``i`` of ``b_from``."""
    lo, hi = b_from[i], b_from[i + 1]
    first = int(np.searchsorted(b_to, lo, side="right") - 1)
    last = int(np.searchsorted(b_to, hi, side="left") - 1)
    return range(first, last + 1)


def _piece(path: str, i: tuple[int, ...], o: tuple[int, ...]) -> str:
    return os.path.join(path, "_".join(map(str, i)) + "-" + "_".join(map(str, o)) + ".npy")


class _Writer:
    """Picklable: write one input chunk's pieces; returns a one-element marker."""

    def __init__(self, path: str, b_in, b_out):
        self.path, self.b_in, self.b_out = path, b_in, b_out

    def __call__(self, block: np.ndarray, block_info=None) -> np.ndarray:
        loc = tuple(block_info[0]["chunk-location"])
        ranges = [_overlaps(bi, bo, i) for bi, bo, i in zip(self.b_in, self.b_out, loc)]
        for o in itertools.product(*ranges):
            sl = tuple(slice(max(bo[j], bi[i]) - bi[i], min(bo[j + 1], bi[i + 1]) - bi[i])
                       for bi, bo, i, j in zip(self.b_in, self.b_out, loc, o))
            final = _piece(self.path, loc, o)
            tmp = f"{final}.{uuid.uuid4().hex}.tmp.npy"
            np.save(tmp, np.ascontiguousarray(block[sl]))
            os.replace(tmp, final)
        return np.zeros((1,) * block.ndim, dtype=np.int8)


class _Reader:
    """Picklable: assemble one output chunk from its pieces (after its writers ran)."""

    def __init__(self, path: str, b_in, b_out, dtype):
        self.path, self.b_in, self.b_out, self.dtype = path, b_in, b_out, np.dtype(dtype)

    def __call__(self, o: tuple[int, ...], _markers) -> np.ndarray:
        shape = tuple(int(bo[j + 1] - bo[j]) for bo, j in zip(self.b_out, o))
        out = np.empty(shape, dtype=self.dtype)
        ranges = [_overlaps(bo, bi, j) for bi, bo, j in zip(self.b_in, self.b_out, o)]
        for i in itertools.product(*ranges):
            sl = tuple(slice(max(bo[j], bi[k]) - bo[j], min(bo[j + 1], bi[k + 1]) - bo[j])
                       for bi, bo, k, j in zip(self.b_in, self.b_out, i, o))
            out[sl] = np.load(_piece(self.path, i, o))
        return out


def disk_rechunk(x: da.Array, chunks, *, scratch: str | os.PathLike | None = None) -> da.Array:
    """``x.rechunk(chunks)`` through scratch files (same values, new chunks).

    Parameters
    ----------
    x
        Dask array (any dimensionality).
    chunks
        Target chunks (anything :meth:`dask.array.Array.rechunk` accepts).
    scratch
        Parent folder of the scratch files (default :func:`scratch_root`).

    Returns
    -------
    dask.array.Array
        Lazy: the writes happen when it is computed. The pieces stay on disk
        until :func:`clear_scratch` (or the enclosing compute session ends),
        so recomputing or retrying any task works.
    """
    if not isinstance(x, da.Array):
        raise ParameterError(f"disk_rechunk: expected a dask array, got {type(x).__name__}")
    target = da.core.normalize_chunks(chunks, x.shape, dtype=x.dtype, previous_chunks=x.chunks)
    if target == x.chunks:
        return x
    root = Path(scratch) if scratch is not None else scratch_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = tempfile.mkdtemp(prefix="chunkem-transpose-", dir=root)
    except OSError as exc:
        raise ParameterError(f"fft scratch folder {root}: cannot create a scratch folder there ({exc})") from None
    _DIRS.append(path)
    b_in = [_bounds(c) for c in x.chunks]
    b_out = [_bounds(c) for c in target]
    marks = x.map_blocks(_Writer(path, b_in, b_out), chunks=tuple((1,) * len(c) for c in x.chunks),
                         dtype=np.int8, meta=np.empty((0,) * x.ndim, np.int8))
    reader = _Reader(path, b_in, b_out, x.dtype)
    name = "disk-rechunk-" + dask.base.tokenize(marks.name, target)
    dsk = {}
    for o in itertools.product(*(range(len(c)) for c in target)):
        ranges = [_overlaps(bo, bi, j) for bi, bo, j in zip(b_in, b_out, o)]
        deps = [(marks.name, *i) for i in itertools.product(*ranges)]
        dsk[(name, *o)] = (reader, o, deps)
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[marks])
    return da.Array(graph, name, target, dtype=x.dtype, meta=np.empty((0,) * x.ndim, x.dtype))
