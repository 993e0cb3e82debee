"""chunkem.ops.postprocess: Guinier B on known-B maps, the full pipeline against numpy, chunking, cluster."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import scipy.fft

from chunkem.engine import spectral
from chunkem.errors import ParameterError
from chunkem.ops.postprocess import postprocess
from chunkem.ops.sharpen import sharpen
from chunkem.volume import is_lazy, make_volume


def _pp(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return postprocess(*args, **kw)


def _s_grid(shape, vs):
    kz = np.fft.fftfreq(shape[0], d=vs[0])[:, None, None]
    ky = np.fft.fftfreq(shape[1], d=vs[1])[None, :, None]
    kx = np.fft.rfftfreq(shape[2], d=vs[2])[None, None, :]
    return np.sqrt(kz**2 + ky**2 + kx**2)


def test_guinier_b_of_random_phase_map_with_known_decay():
    shape, vs, b0 = (64, 64, 64), (1.0, 1.0, 1.0), 80.0
    rng = np.random.default_rng(0)
    s = _s_grid(shape, vs)
    F = np.exp(-b0 * s**2 / 4) * np.exp(2j * np.pi * rng.random(s.shape))
    x = scipy.fft.irfftn(F, s=shape)
    v = make_volume(x / x.std(), voxel_size=vs)
    pp = _pp(v, v, mask=None, skip_fsc_weighting=True, lowpass=0)
    assert pp.bfactor == pytest.approx(-b0, rel=0.02)  # RELION sign
    assert pp.guinier.r2 > 0.99


@pytest.fixture(scope="module")
def rendered():
    """gemmi model maps of one phantom model with a uniform B of 0 and 60 Å², and noisy halves."""
    from chunkem.phantoms import build_model, render_gemmi

    shape, vs = (64, 64, 64), (1.1, 1.1, 1.1)
    m = build_model(200, seed=1)
    centre = np.array(shape) * np.array(vs) / 2
    m = m.with_values(xyz=m.xyz - m.center() + centre[::-1])
    maps = {b: render_gemmi(m.with_values(b_iso=np.full(len(m.b_iso), b)), shape=shape, voxel_size=vs)
            for b in (0.0, 60.0)}
    rng = np.random.default_rng(7)
    sd = maps[60.0].std()
    halves = {b: [make_volume(x + 0.02 * sd * rng.standard_normal(shape), voxel_size=vs) for _ in range(2)]
              for b, x in maps.items()}
    return {"maps": {b: make_volume(x, voxel_size=vs) for b, x in maps.items()}, "halves": halves,
            "shape": shape, "vs": vs}


def test_guinier_recovers_uniform_atomic_b_and_sharpening_restores_profile(rendered):
    fits = {b: _pp(*h, mask=None, skip_fsc_weighting=True, lowpass=0).bfactor for b, h in rendered["halves"].items()}
    # the form factors' own fall-off is common to both maps: the difference is the atomic B (RELION sign)
    recovered = fits[60.0] - fits[0.0]
    assert recovered == pytest.approx(-60.0, rel=0.05)
    # sharpening the B = 60 map by the recovered B restores the B = 0 profile in the Wilson range
    sharp = sharpen(rendered["maps"][60.0], bfactor=recovered)
    prof = {k: spectral.radial_profile(spectral.rfft(v), progress=False).mean_amplitude()
            for k, v in (("sharp", sharp), ("zero", rendered["maps"][0.0]))}
    f = spectral.shell_frequencies(rendered["shape"], rendered["vs"])
    wilson = (f >= 1 / 10.0) & (f <= 1 / 3.0)
    ratio = prof["sharp"][wilson] / prof["zero"][wilson]
    assert np.all(np.abs(ratio - 1) < 0.05)
    # and before sharpening the profile was far off (the test can fail)
    blurred = spectral.radial_profile(spectral.rfft(rendered["maps"][60.0]), progress=False).mean_amplitude()
    assert np.max(np.abs(blurred[wilson] / prof["zero"][wilson] - 1)) > 0.5


@pytest.fixture(scope="module")
def phantom():
    from chunkem.phantoms import make_phantom

    return make_phantom(box=56, n_residues=80, resolution=3.5, seed=3)


def _numpy_postprocess(h1, h2, weights, bfactor, lowpass_res, edge_width=2):
    """Independent numpy version of the Fourier assembly (RELION postprocess order)."""
    shape = h1.shape
    vs = h1.attrs["voxel_size"]
    L = min(n * v for n, v in zip(shape, vs))
    s = _s_grid(shape, vs)
    F = (np.fft.rfftn(h1.values.astype(np.float64)) + np.fft.rfftn(h2.values.astype(np.float64))) / 2
    shell = np.floor(s * L + 0.5).astype(int)
    w = np.where(shell < weights.size, weights[np.minimum(shell, weights.size - 1)], 0.0)
    mult = w * np.exp(-bfactor * s**2 / 4) * (s <= 1 / (2 * max(vs)) + 1e-12)
    if lowpass_res:
        ires = round(L / lowpass_res)
        lo, hi = (ires - edge_width // 2) / L, (ires + edge_width // 2) / L
        lp = np.where(s < lo, 1.0, np.where(s > hi, 0.0, 0.5 + 0.5 * np.cos(np.pi * (s - lo) / (hi - lo))))
        mult = mult * lp
    return np.fft.irfftn(F * mult, s=shape, axes=(0, 1, 2))


def test_postprocess_pipeline_matches_numpy(phantom):
    ph = phantom
    pp = _pp(ph.half1, ph.half2, mask=ph.mask)
    assert pp.bfactor < 0 and pp.lowpass == pytest.approx(pp.resolution)
    np.testing.assert_allclose(pp.fsc_weights, np.where(pp.fsc_weights > 0, pp.fsc_weights, 0))
    want = _numpy_postprocess(ph.half1, ph.half2, pp.fsc_weights, pp.bfactor, pp.lowpass)
    got = pp.map.values
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    np.testing.assert_allclose(pp.masked_map.values, got * ph.mask.values, rtol=1e-6, atol=1e-7)
    # a forced B and low-pass are used as given
    forced = _pp(ph.half1, ph.half2, mask=ph.mask, bfactor=-30.0, lowpass=5.0, fsc_result=pp.fsc)
    assert forced.bfactor == -30.0 and math.isnan(forced.bfactor_fitted) and forced.lowpass == 5.0
    want = _numpy_postprocess(ph.half1, ph.half2, pp.fsc_weights, -30.0, 5.0)
    assert np.abs(forced.map.values - want).max() < 1e-4 * np.abs(want).max()
    d = json.loads(json.dumps(pp.to_dict()))
    assert d["bfactor_relion_A2"] == pytest.approx(pp.bfactor)


def test_autob_highres_presets(phantom):
    ph = phantom
    relion = _pp(ph.half1, ph.half2, mask=ph.mask)
    to_res = _pp(ph.half1, ph.half2, mask=ph.mask, autob_highres="to_resolution", fsc_result=relion.fsc)
    g = to_res.guinier
    assert np.all(g.resolution[g.weight > 0] >= relion.resolution - 1e-9)
    assert np.all(g.resolution[g.weight > 0] <= 10.0)
    assert g.n_points < relion.guinier.n_points
    with pytest.raises(ParameterError, match="autob_highres"):
        _pp(ph.half1, ph.half2, mask=ph.mask, autob_highres="nonsense", fsc_result=relion.fsc)


def test_postprocess_chunk_invariant_and_lazy(phantom):
    ph = phantom
    ref = _pp(ph.half1, ph.half2, mask=ph.mask)
    h1 = ph.half1.chunk({"z": 10, "y": 13, "x": 16})
    h2 = ph.half2.chunk({"z": 17, "y": 48, "x": 20})
    m = ph.mask.chunk({"z": 48, "y": 11, "x": 48})
    pp = _pp(h1, h2, mask=m)
    assert is_lazy(pp.map) and is_lazy(pp.masked_map)
    assert pp.map.data.chunks == h1.data.chunks
    assert pp.bfactor == pytest.approx(ref.bfactor, abs=1e-3)
    scale = np.abs(ref.map.values).max()
    assert np.abs(pp.map.values - ref.map.values).max() < 1e-5 * scale
    assert np.abs(pp.masked_map.values - ref.masked_map.values).max() < 1e-5 * scale


def test_postprocess_errors():
    rng = np.random.default_rng(0)
    lowres = make_volume(rng.normal(size=(24, 24, 24)), voxel_size=6.0)  # Nyquist 12 Å: no shell below 10 Å
    with pytest.raises(ParameterError, match="bfactor"):
        _pp(lowres, lowres, mask=None)
    v = make_volume(rng.normal(size=(24, 24, 24)), voxel_size=1.0)
    with pytest.raises(ParameterError, match="Nyquist"):
        _pp(v, v, mask=None, bfactor=0.0, lowpass=1.5)


@pytest.mark.distributed
def test_fsc_and_postprocess_on_a_two_worker_cluster(phantom, two_worker_client):
    from chunkem.ops.fsc import fsc

    ph = phantom
    ref = _pp(ph.half1, ph.half2, mask=ph.mask)
    h1, h2, m = (v.chunk({"z": 24, "y": 48, "x": 48}) for v in (ph.half1, ph.half2, ph.mask))
    assert len(two_worker_client.scheduler_info()["workers"]) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = fsc(h1, h2, mask=m, strategy="slab")
    pp = _pp(h1, h2, mask=m, fsc_result=r)
    out = pp.map.data.compute()
    np.testing.assert_allclose(r.fsc_corrected, ref.fsc.fsc_corrected, atol=1e-5)
    assert np.abs(out - ref.map.values).max() < 1e-5 * np.abs(ref.map.values).max()


def test_demo_stage_on_the_phantom(phantom, tmp_path):
    from chunkem.ops.fsc import demo_stage

    summary = demo_stage({"phantom": phantom, "outdir": tmp_path})
    # the phantom's noise is tuned so that its unmasked half-map FSC crosses 0.143 at 3.5 Å
    assert summary["resolution_unmasked_A"] == pytest.approx(phantom.params["fsc_resolution"], abs=0.15)
    assert summary["resolution_A"] <= summary["resolution_unmasked_A"] + 1e-6  # the mask helps
    assert summary["bfactor_A2"] < 0
    for name in ("fsc.csv", "fsc.json", "fsc.png", "guinier.png", "postprocess.json"):
        assert (tmp_path / "fsc" / name).exists()
