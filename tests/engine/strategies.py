"""Hypothesis strategies for chunk-invariance tests: odd/even non-cubic shapes,
random uneven chunkings, random anisotropic voxel sizes."""

from __future__ import annotations

import dask
import numpy as np
from hypothesis import strategies as st

from chunkem.volume import make_volume


@st.composite
def partitions(draw, n: int, max_parts: int = 4) -> tuple[int, ...]:
    """A random split of ``n`` into 1..max_parts positive chunk sizes (uneven)."""
    k = draw(st.integers(1, min(max_parts, n)))
    if k == 1:
        return (n,)
    cuts = sorted(draw(st.sets(st.integers(1, n - 1), min_size=k - 1, max_size=k - 1)))
    edges = [0, *cuts, n]
    return tuple(b - a for a, b in zip(edges[:-1], edges[1:]))


@st.composite
def volume_cases(draw, min_side: int = 4, max_side: int = 40, vs_range=(0.6, 2.5)):
    """(numpy data, chunks, voxel size, origin) with random geometry."""
    shape = tuple(draw(st.integers(min_side, max_side)) for _ in range(3))
    chunks = tuple(draw(partitions(n)) for n in shape)
    vs = tuple(round(draw(st.floats(*vs_range)), 3) for _ in range(3))
    org = tuple(round(draw(st.floats(-50, 50)), 2) for _ in range(3))
    seed = draw(st.integers(0, 2**31 - 1))
    data = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return data, chunks, vs, org


def chunked(case):
    """The case as a dask-backed Volume with its uneven chunks."""
    data, chunks, vs, org = case
    return make_volume(data, voxel_size=vs, origin=org).chunk(dict(zip(("z", "y", "x"), chunks)))


def in_memory(case):
    data, _, vs, org = case
    return make_volume(data, voxel_size=vs, origin=org)


class _NoCompute:
    """A dask scheduler that fails: for asserting that lazy APIs compute nothing."""

    def __call__(self, dsk, keys, **kwargs):  # pragma: no cover - only runs on failure
        raise AssertionError("a lazy API call computed something")


def raise_if_computes():
    """Context manager: any dask compute inside raises AssertionError."""
    return dask.config.set(scheduler=_NoCompute())
