"""chunkem.ops.sharpen: fixed-B sharpening and phenix-style auto-sharpening."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from chunkem.errors import ParameterError
from chunkem.kernels.sharpening import b_iso_to_d_cut_multiplier
from chunkem.ops.sharpen import auto_sharpen, estimate_solvent_fraction, sharpen
from chunkem.volume import is_lazy, make_volume


def _s_grid(shape, vs):
    kz = np.fft.fftfreq(shape[0], d=vs[0])[:, None, None]
    ky = np.fft.fftfreq(shape[1], d=vs[1])[None, :, None]
    kx = np.fft.rfftfreq(shape[2], d=vs[2])[None, None, :]
    return np.sqrt(kz**2 + ky**2 + kx**2)


def _auto(*a, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto_sharpen(*a, **kw)


def test_sharpen_relion_sign_matches_numpy_and_is_chunk_invariant():
    rng = np.random.default_rng(0)
    shape, vs = (37, 37, 37), (1.2, 1.0, 1.1)
    x = rng.normal(size=shape).astype(np.float32)
    v = make_volume(x, voxel_size=vs).chunk({"z": 10, "y": 13, "x": 16})
    out = sharpen(v, bfactor=-50.0)  # negative sharpens
    assert is_lazy(out) and out.data.chunks == v.data.chunks
    s = _s_grid(shape, vs)
    want = np.fft.irfftn(np.fft.rfftn(x) * np.exp(50.0 * s**2 / 4), s=shape, axes=(0, 1, 2))
    np.testing.assert_allclose(out.values, want, atol=2e-4 * np.abs(want).max())
    blurred = sharpen(make_volume(x, voxel_size=vs), bfactor=80.0)
    assert blurred.values.std() < x.std()


@pytest.fixture(scope="module")
def truth():
    from chunkem.phantoms import make_phantom

    ph = make_phantom(box=56, n_residues=80, resolution=3.5, b_range=(30.0, 30.0), seed=3)
    return ph.truth


def _blur_with_noise(vol, b, seed):
    rng = np.random.default_rng(seed)
    out = sharpen(vol, bfactor=b) if b else vol
    x = np.asarray(out.values, dtype=np.float64)
    return make_volume(x + 0.02 * x.std() * rng.standard_normal(x.shape), voxel_size=vol.attrs["voxel_size"])


@pytest.mark.parametrize("method", ["adjusted_sa", "kurtosis"])
def test_auto_sharpen_undoes_a_known_blur(truth, method):
    # The search picks the target b_iso (absolute decay of the result); an extra blur B0 raises the map's
    # own b_iso by B0, so the chosen sharpening must grow by B0. Tolerance ±25 Å²: one 20 Å² grid step
    # plus the scatter of the Wilson estimate of original_b_iso under noise.
    b0 = 80.0
    ref = _auto(_blur_with_noise(truth, 0.0, 1), resolution=3.0, method=method, solvent_fraction=0.8)
    blur = _auto(_blur_with_noise(truth, b0, 2), resolution=3.0, method=method, solvent_fraction=0.8)
    assert blur.original_b_iso - ref.original_b_iso == pytest.approx(b0, abs=10)
    assert blur.b_sharpen - ref.b_sharpen == pytest.approx(b0, abs=25)
    assert blur.bfactor_relion == pytest.approx(-blur.b_sharpen)


def test_auto_sharpen_table_choice_and_applied_multiplier(truth):
    v = _blur_with_noise(truth, 40.0, 3)
    r = _auto(v, resolution=3.0, region_weight=20.0, solvent_fraction=0.8)
    t = r.table
    np.testing.assert_allclose(t["adjusted_sa"], t["sa_ratio"] - 20.0 * t["normalized_regions"])
    np.testing.assert_allclose(t["score"], t["adjusted_sa"])
    assert r.b_iso == t["b_iso"][int(np.nanargmax(t["score"]))]
    assert r.b_sharpen == pytest.approx(r.original_b_iso - r.b_iso)
    assert t["b_iso"].size == 21 and r.region_weight == 20.0
    # the output is the input times the b_iso_to_d_cut multiplier, cut at 0.833 d
    shape, vs = v.shape, v.attrs["voxel_size"]
    s = _s_grid(shape, vs)
    m = b_iso_to_d_cut_multiplier(s, b_sharpen=r.b_sharpen, d_cut=3.0) * (s <= 1 / (0.833 * 3.0))
    want = np.fft.irfftn(np.fft.rfftn(v.values) * m, s=shape, axes=(0, 1, 2))
    np.testing.assert_allclose(r.map.values, want, atol=1e-4 * np.abs(want).max())
    d = json.loads(json.dumps(r.to_dict()))
    assert d["b_sharpen_A2"] == pytest.approx(r.b_sharpen)


def test_auto_sharpen_box_selects_the_molecule_and_lazy(truth):
    v = _blur_with_noise(truth, 0.0, 4).chunk({"z": 20, "y": 17, "x": 56})
    r = _auto(v, resolution=3.0, box=28, solvent_fraction=0.6)
    z0, z1, y0, y1, x0, x1 = r.box
    assert (z1 - z0, y1 - y0, x1 - x0) == (28, 28, 28)
    w = np.clip(truth.values, 0, None)
    com = [float((w.sum(axis=tuple(j for j in range(3) if j != i)) * np.arange(w.shape[i])).sum() / w.sum())
           for i in range(3)]
    for c, lo, hi in zip(com, (z0, y0, x0), (z1, y1, x1)):
        assert lo + 4 <= c <= hi - 4
    assert is_lazy(r.map) and r.map.data.chunks == v.data.chunks


def test_estimate_solvent_fraction_matches_the_phantom_mask():
    # averaged noisy half maps of a phantom whose mask (> 0.5: atoms + 3 Å + half the 3 Å edge) is known
    from chunkem.phantoms import make_phantom
    from chunkem.volume import like

    ph = make_phantom(box=56, n_residues=80, resolution=3.5, voxel_size=1.0, b_range=(30.0, 30.0), seed=3)
    full = like(ph.half1, (np.asarray(ph.half1.values) + np.asarray(ph.half2.values)) / 2)
    want = 1.0 - float((np.asarray(ph.mask.values) > 0.5).mean())
    got = estimate_solvent_fraction(full, resolution=3.5)
    assert got == pytest.approx(want, abs=0.02)
    # a ratio to the envelope's peak: scale, offset and chunking do not matter
    scaled = like(full, 3.0 * np.asarray(full.values) + 5.0).chunk({"z": 10, "y": 13, "x": 16})
    assert estimate_solvent_fraction(scaled, resolution=3.5) == pytest.approx(got, abs=1e-3)
    # auto_sharpen uses it when no solvent fraction is given
    r = _auto(full, resolution=3.5, search_b_n=5)
    assert r.solvent_fraction == pytest.approx(got)
    assert r.wilson is not None and r.original_b_iso == r.wilson.b_iso


def test_auto_sharpen_errors(truth):
    with pytest.raises(ParameterError, match="Nyquist"):
        auto_sharpen(truth, resolution=1.5)
    with pytest.raises(ParameterError, match="method"):
        auto_sharpen(truth, resolution=3.0, method="entropy")
    with pytest.raises(ParameterError, match="bfactor"):
        sharpen(truth, bfactor=float("nan"))
