"""FDR confidence maps: noise control, the phantom's molecule, exact ranks, chunk/scheduler invariance, errors."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage as ndi

from chunkem.errors import DataValueError, ParameterError
from chunkem.kernels import fdr as KF
from chunkem.ops.fdr import fdr_confidence, n_in_sphere
from chunkem.phantoms import make_phantom
from chunkem.volume import make_volume


def _sphere_in_noise(shape=(37, 40, 43), seed=0, snr=4.0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=shape)
    zz, yy, xx = np.indices(shape)
    c = [n // 2 for n in shape]
    ball = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < 36
    a[ball] += snr
    return a, ball


def _full_sort_confidence(a, mean, sigma, method, sphere=True):
    ins = KF.circular_mask_block(a.shape, full_shape=a.shape) if sphere else np.ones(a.shape, bool)
    p = KF.p_values(a, mean=mean, sigma=sigma)
    q = np.ones(a.shape)
    q[ins] = KF.adjust_p(p[ins], method)
    return np.where(ins, 1 - q, 0.0), q


@pytest.mark.parametrize("method", ["BY", "BH"])
def test_pure_noise_has_at_most_one_percent_above_threshold(method):
    v = make_volume(np.random.default_rng(7).normal(size=(64, 64, 64)), voxel_size=1.0)
    r = fdr_confidence(v, method=method)
    frac = float(np.asarray(r.mask.values).sum()) / r.n_tests
    assert frac <= 0.01
    assert r.n_selected == int(np.asarray(r.mask.values).sum())
    assert abs(r.noise_mean) < 0.1 and r.noise_sigma == pytest.approx(1.0, abs=0.1)
    c = np.asarray(r.confidence.values)
    assert c.min() >= 0.0 and c.max() <= 1.0


@pytest.mark.parametrize("method", ["BY", "BH"])
def test_ranking_equals_a_full_sort_on_uneven_chunks(method):
    a, _ = _sphere_in_noise()
    v = make_volume(a, voxel_size=1.2)
    whole = fdr_confidence(v, method=method)
    chunked = fdr_confidence(v.chunk({"z": 10, "y": 13, "x": 16}), method=method)
    assert chunked.confidence.chunks == ((10, 10, 10, 7), (13, 13, 13, 1), (16, 16, 11))
    ref, q = _full_sort_confidence(a, whole.noise_mean, whole.noise_sigma, method)
    np.testing.assert_allclose(np.asarray(whole.confidence.values), ref, atol=1e-6)
    np.testing.assert_array_equal(chunked.confidence.values, whole.confidence.values)
    np.testing.assert_array_equal(chunked.mask.values, whole.mask.values)
    assert whole.n_selected == int((q <= 0.01).sum())
    # out of core (p-values recomputed per pass instead of persisted): the same answer
    import chunkem.ops.fdr as F

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "_hold_locally", lambda nbytes: False)
        ooc = fdr_confidence(v.chunk({"z": 10, "y": 13, "x": 16}), method=method)
    np.testing.assert_array_equal(ooc.confidence.values, whole.confidence.values)
    assert ooc.n_selected == whole.n_selected
    assert whole.n_tests == n_in_sphere(a.shape) == int(KF.circular_mask_block(a.shape, full_shape=a.shape).sum())
    # the reported threshold separates selected from unselected voxels
    sel = np.asarray(whole.mask.values) > 0.5
    assert a[sel].min() >= whole.map_threshold - 1e-6 * whole.noise_sigma


def test_phantom_mask_covers_the_molecule():
    ph = make_phantom(n_residues=120, box=56, resolution=2.6, seed=3)
    full = make_volume((ph.half1.values + ph.half2.values) / 2, voxel_size=ph.half1.attrs["voxel_size"])
    r = fdr_confidence(full)
    sel = np.asarray(r.mask.values) > 0.5
    truth = np.asarray(ph.truth.values)
    molecule = np.asarray(ph.mask.values) > 0.5
    dense = truth > np.percentile(truth[molecule], 90)  # atom centres
    assert sel[dense].mean() > 0.95
    near = truth > np.percentile(truth[molecule], 80)
    assert ndi.binary_dilation(sel, iterations=2)[near].mean() > 0.95
    assert sel[~molecule].sum() < 0.02 * sel.sum()  # few discoveries in the solvent


def test_user_mask_noise_and_box_centre():
    a, ball = _sphere_in_noise(seed=2)
    v = make_volume(a, voxel_size=1.0)
    molmask = make_volume(np.pad(np.ones((17, 20, 23)), ((10, 10), (10, 10), (10, 10))), voxel_size=1.0)
    r = fdr_confidence(v, mask=molmask)
    a = np.asarray(v.values, dtype=np.float64)  # the float32 map
    out = np.asarray(molmask.values) <= 0.5
    assert r.noise_source == "mask" and r.n_noise == int(out.sum())
    assert r.noise_mean == pytest.approx(a[out].mean(), rel=1e-9)
    assert r.noise_sigma == pytest.approx(a[out].std(), rel=1e-9)
    rb = fdr_confidence(v, box_centre=(6, 6, 6), noise_box=10)
    assert rb.noise_source == "box" and rb.n_noise == 1000
    assert rb.noise_mean == pytest.approx(a[1:11, 1:11, 1:11].mean())


def test_lowpass_first_equals_filtering_by_hand():
    a, _ = _sphere_in_noise(seed=4, snr=1.5)
    v = make_volume(a, voxel_size=1.0)
    r = fdr_confidence(v, lowpass=4.0)
    kz = np.fft.fftfreq(a.shape[0])[:, None, None]
    ky = np.fft.fftfreq(a.shape[1])[None, :, None]
    kx = np.fft.rfftfreq(a.shape[2])[None, None, :]
    h = KF.tanh_lowpass_multiplier(np.sqrt(kz**2 + ky**2 + kx**2), cutoff=4.0)
    filt = scipy.fft.irfftn(scipy.fft.rfftn(a) * h, a.shape)
    ref = fdr_confidence(make_volume(filt, voxel_size=1.0))
    np.testing.assert_allclose(r.confidence.values, ref.confidence.values, atol=1e-5)
    assert r.n_selected > 50


def test_errors():
    a = np.zeros((40, 40, 40))
    a[15:25, 15:25, 15:25] = 1.0
    with pytest.raises(DataValueError, match="zero variance"):
        fdr_confidence(make_volume(a, voxel_size=1.0))
    v = make_volume(np.random.default_rng(0).normal(size=(30, 30, 30)), voxel_size=1.0)
    with pytest.raises(ParameterError, match="method"):
        fdr_confidence(v, method="holm")
    with pytest.raises(ParameterError, match="fdr"):
        fdr_confidence(v, fdr=1.5)
    with pytest.raises(ParameterError, match="does not fit"):
        fdr_confidence(v, noise_box=40)
