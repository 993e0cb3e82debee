"""FDR kernels: BH/BY adjustment against its definition, the exact histogram-bounded ranking, boxes, sphere."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkem.errors import ParameterError
from chunkem.kernels import fdr as KF


def _by_definition(p, method):
    """q_i = min(1, min over tests j with p_j >= p_i of p_j n c / rank_j), rank_j = #{p <= p_j}."""
    p = np.asarray(p, dtype=np.float64)
    n = p.size
    c = 1.0 if method == "BH" else KF.harmonic_number(n)  # the reference's expansion of H_n
    rank = np.array([(p <= v).sum() for v in p])
    g = p * n * c / rank
    return np.array([min(1.0, g[p >= v].min()) for v in p])


@pytest.mark.parametrize("method", ["BH", "BY"])
def test_adjust_p_matches_definition_with_ties(method):
    rng = np.random.default_rng(0)
    p = np.round(rng.random(300) ** 3, 3)  # many ties, many small values
    got = KF.adjust_p(p, method)
    ref = _by_definition(p, method)
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def test_harmonic_number_expansion():
    for n in (10, 1000, 10**6):
        exact = math.fsum(1.0 / k for k in range(1, n + 1))
        assert KF.harmonic_number(n) == pytest.approx(exact, abs=1e-4)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 4000), st.sampled_from(["BH", "BY"]), st.integers(0, 10**6), st.floats(0.0, 0.6))
def test_histogram_bounded_ranking_is_exact(n, method, seed, signal):
    rng = np.random.default_rng(seed)
    p = rng.random(n)
    k = int(signal * n)
    p[:k] = rng.random(k) ** 8 * 1e-4  # "signal": tiny p-values, some exactly repeated
    p[: k // 3] = p[0]
    if n > 5:
        p[-3:] = 0.0
    edges = KF.histogram_edges()
    counts = KF.histogram_counts(p, edges)
    assert counts.sum() == n
    bound = KF.candidate_bound(counts, edges, n=n, method=method)
    cand = p[p <= bound]
    upper, q = KF.q_table(cand, n=n, method=method)
    got = KF.q_lookup(p, upper, q)
    np.testing.assert_array_equal(got, KF.adjust_p(p, method))


def test_candidates_are_few_for_by_on_noise():
    p = np.random.default_rng(1).random(200_000)
    edges = KF.histogram_edges()
    bound = KF.candidate_bound(KF.histogram_counts(p, edges), edges, n=p.size, method="BY")
    assert (p <= bound).sum() < 0.01 * p.size


def test_p_values_right_sided():
    x = np.array([-3.0, 0.0, 1.0, 2.5, 40.0])
    p = KF.p_values(x, mean=0.0, sigma=1.0)
    np.testing.assert_allclose(p[1:4], scipy.stats.norm.sf(x[1:4]), rtol=1e-12)
    assert p[0] == 1.0 and 0.0 <= p[4] < 1e-300


def test_noise_boxes_positions():
    boxes = KF.noise_boxes((100, 100, 100), 10)
    assert boxes[0] == (slice(45, 55), slice(2, 12), slice(45, 55))
    assert boxes[1] == (slice(45, 55), slice(88, 98), slice(45, 55))
    assert boxes[2] == (slice(45, 55), slice(45, 55), slice(2, 12))
    assert boxes[3] == (slice(45, 55), slice(45, 55), slice(88, 98))
    assert KF.noise_boxes((31, 40, 50), 10, (5, 20, 25)) == [(slice(0, 10), slice(15, 25), slice(20, 30))]
    assert KF.default_noise_box((400, 10, 10)) == 20 and KF.default_noise_box((64, 64, 64)) == 10
    with pytest.raises(ParameterError, match="does not fit"):
        KF.noise_boxes((20, 100, 100), 30)


def test_circular_mask_blocks_tile_the_sphere():
    shape = (21, 24, 19)
    full = KF.circular_mask_block(shape, full_shape=shape)
    zz, yy, xx = np.indices(shape)
    r = max(shape) // 2
    np.testing.assert_array_equal(full, (zz - 10) ** 2 + (yy - 12) ** 2 + (xx - 9) ** 2 <= r * r)
    part = KF.circular_mask_block((5, 7, 6), full_shape=shape, index=(3, 10, 4))
    np.testing.assert_array_equal(part, full[3:8, 10:17, 4:10])


def test_tanh_lowpass_multiplier():
    s = np.array([0.0, 0.25, 0.5])
    m = KF.tanh_lowpass_multiplier(s, cutoff=4.0)
    assert m[0] == pytest.approx(1.0, abs=1e-6)
    assert m[1] == pytest.approx(0.5, abs=1e-6)
    assert m[2] < 1e-6


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 400), st.floats(-1.0, 1.0), st.floats(0.5, 2.0))
def test_ks_normal_distance_equals_scipy_kstest(n, shift, scale):
    z = np.random.default_rng(n).normal(shift, scale, size=n)
    want = scipy.stats.kstest(z, "norm").statistic
    assert KF.ks_normal_distance(z) == pytest.approx(want, abs=1e-12)
