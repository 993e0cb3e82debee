"""engine.spectral.shell_sums_many: several pairs in one pass == direct numpy sums per pair."""

from __future__ import annotations

import dask
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkem.engine import spectral as sp
from chunkem.volume import make_volume

from .strategies import chunked, in_memory, volume_cases
from .test_spectral import SMALL_SLABS, _direct_sums


class _CountingScheduler:
    """The synchronous scheduler, counting how many times dask computes."""

    def __init__(self):
        self.calls = 0

    def __call__(self, dsk, keys, **kwargs):
        self.calls += 1
        return dask.get(dsk, keys, **kwargs)


@settings(max_examples=12, deadline=None)
@given(case=volume_cases(min_side=3, max_side=30), hermitian=st.booleans(),
       strategy=st.sampled_from(["gather", "slab"]), min_tasks=st.sampled_from([None, 1, 3]))
def test_many_pairs_equal_direct_numpy_sums(case, hermitian, strategy, min_tasks):
    a = case[0]
    b = np.random.default_rng(1).standard_normal(a.shape).astype(np.float32) + a
    c = np.random.default_rng(2).standard_normal(a.shape).astype(np.float32)
    va = chunked(case)
    vb = make_volume(b, voxel_size=case[2], origin=case[3]).chunk(7)
    vc = make_volume(c, voxel_size=case[2], origin=case[3])  # numpy-backed: aligned to the others' chunks
    counter = _CountingScheduler()
    with dask.config.set(SMALL_SLABS):
        sa, sb, sc = sp.rfft(va, strategy=strategy), sp.rfft(vb, strategy="gather"), sp.rfft(vc)
        with dask.config.set(scheduler=counter):
            got = sp.shell_sums_many([(sa, sb), (sb, sc), (sa, None), (sc, sa)], hermitian_weights=hermitian,
                                     progress=False, min_tasks=min_tasks)
    assert counter.calls == 1  # one compute for every pair
    a64, b64, c64 = (x.astype(np.float64) for x in (a, b, c))
    for res, (x, y) in zip(got, [(a64, b64), (b64, c64), (a64, a64), (c64, a64)]):
        cnt, cross, p1, p2, m1 = _direct_sums(x, y, case[2], hermitian)
        scale = max(1.0, p1.max(), p2.max())
        np.testing.assert_allclose(res.count, cnt)
        np.testing.assert_allclose(res.sum_f1f2, cross, rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_allclose(res.sum_f1sq, p1, rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_allclose(res.sum_f2sq, p2, rtol=1e-5, atol=1e-5 * scale)
        if not hermitian:
            np.testing.assert_allclose(res.sum_abs_f1, m1, rtol=1e-5, atol=1e-5 * np.sqrt(scale))
    np.testing.assert_allclose(got[2].fsc()[got[2].count > 0], 1.0, rtol=1e-6)


def test_many_matches_shell_sums_in_memory_and_amplitudes_flag():
    case = (np.random.default_rng(3).standard_normal((17, 20, 23)).astype(np.float32), None, (1.1, 0.9, 1.3),
            (0.0, 0.0, 0.0))
    b = np.random.default_rng(4).standard_normal((17, 20, 23)).astype(np.float32)
    s1 = sp.rfft(in_memory(case))
    s2 = sp.rfft(make_volume(b, voxel_size=case[2]))
    ref = sp.shell_sums(s1, s2, hermitian_weights=True)
    (got,) = sp.shell_sums_many([(s1, s2)], hermitian_weights=True)
    (noamp,) = sp.shell_sums_many([(s1, s2)], hermitian_weights=True, amplitudes=False)
    for f in ("count", "sum_f1f2", "sum_f1sq", "sum_f2sq", "sum_abs_f1"):
        np.testing.assert_allclose(getattr(got, f), getattr(ref, f), rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(noamp.sum_f1f2, ref.sum_f1f2, rtol=1e-5, atol=1e-3)
    assert not noamp.sum_abs_f1.any()
    assert sp.shell_sums_many([]) == []
