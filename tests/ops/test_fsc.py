"""chunkem.ops.fsc against peer outputs (emda, servalcat), analytic cases and phantoms."""

from __future__ import annotations

import csv
import io
import json
import math
import warnings

import dask.array as da
import numpy as np
import pytest
from scipy import ndimage

from chunkem.errors import DataValueError, GeometryError, ParameterError
from chunkem.kernels.fsc import fsc_from_sums, merge_shells, resolution_crossing
from chunkem.ops.fsc import fsc
from chunkem.volume import like, make_volume

NPC = "npc_sta_halfmaps"


# --------------------------------------------------------------------------- helpers
def _quiet(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fsc(*args, **kw)


def _rebin(sums, groups):
    parts = (merge_shells(x, groups) for x in (sums.sum_f1f2, sums.sum_f1sq, sums.sum_f2sq))
    return fsc_from_sums(*parts, dc_rule=False)


def _read_servalcat(path):
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    head = lines[0].split()
    rows = np.array([[float(v) for v in ln.split()] for ln in lines[1:]])
    return {h: rows[:, i] for i, h in enumerate(head)}


def _read_emda(path):
    rows = [ln.split() for ln in path.read_text().splitlines() if ln.split() and ln.split()[0].isdigit()]
    a = np.array(rows, dtype=float)
    # columns: bin, resolution, signal var, noise var, total var, halfmap fsc, #reflx
    return {"fsc": a[:, 5], "count": a[:, 6]}


def _last_passing(curve, threshold=0.143):
    """Index of the last bin before the curve first drops below threshold (first-crossing rule)."""
    below = np.nonzero(np.asarray(curve) < threshold)[0]
    return (int(below[0]) - 1) if below.size else len(curve) - 1


# servalcat: shells round(|k|), DC ignored, a shell with < 10 unique reflections merged into the next
# (shell 1 -> 2 for this 32³ box); Fourier voxels beyond Nyquist (|s| > 1/(2a)) left out; Friedel pairs once.
SV_GROUPS = [[1, 2]] + [[i] for i in range(3, 17)]
# emda (halffsc): its bin j is shell j + 2, bin 0 holding shells 0-2; Nyquist planes left out; rfft half-space.
EMDA_GROUPS = [[0, 1, 2]] + [[i] for i in range(3, 17)]


@pytest.fixture(scope="module")
def npc(shared_data, shared_reference):
    from chunkem.io import open_map

    d = shared_data / NPC
    ref = shared_reference / "fsc_npc"
    h1 = open_map(d / "npc_ref_A_px_1_inv.mrc")
    h2 = open_map(d / "npc_ref_B_px_1_inv.mrc")
    mask = open_map(d / "sphere_r10_g2_bx32.mrc")
    assert h1.attrs["voxel_size"] == pytest.approx((2.682,) * 3, abs=1e-3)
    return {
        "h1": h1, "h2": h2, "mask": mask,
        "sv": _read_servalcat(ref / "servalcat_fsc.dat"),
        "svm": _read_servalcat(ref / "servalcat_fsc_masked.dat"),
        "emda": _read_emda(ref / "emda_halffsc.txt"),
    }


# --------------------------------------------------------------------------- peers
def test_unmasked_fsc_matches_servalcat(npc):
    r = _quiet(npc["h1"], npc["h2"], hermitian_weights=True, d_min=2 * 2.682)
    sv = npc["sv"]
    # the bins are the same reflections: unique counts (full-sphere count / 2) agree bin by bin
    unique = merge_shells(r.sums["unmasked"].count / 2, SV_GROUPS)
    np.testing.assert_array_equal(unique[:-1], sv["ncoeffs"][:-1])
    ours = _rebin(r.sums["unmasked"], SV_GROUPS)
    diff = np.abs(ours - sv["fsc_half"])
    assert diff.max() < 0.02, diff
    # resolution: same shell as servalcat (bin j is shell j + 2)
    assert r.crossing_0143.shell == _last_passing(sv["fsc_half"]) + 2


def test_unmasked_fsc_matches_emda(npc):
    r = _quiet(npc["h1"], npc["h2"], drop_nyquist_planes=True)
    em = npc["emda"]
    np.testing.assert_array_equal(merge_shells(r.sums["unmasked"].count, EMDA_GROUPS)[:-1], em["count"][:-1])
    diff = np.abs(_rebin(r.sums["unmasked"], EMDA_GROUPS) - em["fsc"])
    assert diff.max() < 0.02, diff
    assert r.crossing_0143.shell == _last_passing(em["fsc"]) + 2


def test_relion_shells_give_the_peer_resolution_within_one_shell(npc):
    r = _quiet(npc["h1"], npc["h2"])  # RELION compat: every voxel of shells 0..N/2
    for peer in (npc["sv"]["fsc_half"], npc["emda"]["fsc"]):
        assert abs(r.crossing_0143.shell - (_last_passing(peer) + 2)) <= 1
    # the unaligned curve agrees with emda's on all full shells too (same shells 3..15)
    np.testing.assert_allclose(r.fsc_unmasked[3:16], npc["emda"]["fsc"][1:14], atol=0.02)


def test_masked_fsc_matches_servalcat(npc):
    r = _quiet(npc["h1"], npc["h2"], mask=npc["mask"], hermitian_weights=True, d_min=2 * 2.682,
               force_mask=True)
    svm = npc["svm"]
    masked = _rebin(r.sums["masked"], SV_GROUPS)
    assert np.abs(masked - svm["fsc_half_masked"]).max() < 0.02
    # both randomise from the first shell whose unmasked FSC < 0.8
    sv_rand_bin = int(np.nonzero(svm["fsc_half_unmasked"] < 0.8)[0][0])
    assert r.randomize_at == sv_rand_bin + 2
    # well below that shell nothing is randomised: randomised = masked for both programs (the shell just
    # below the edge differs: servalcat randomises the whole edge shell, RELION only |k| >= randomize_at)
    rand = _rebin(r.sums["randomized"], SV_GROUPS)
    keep = sv_rand_bin - 1
    np.testing.assert_allclose(rand[:keep], svm["fsc_half_masked_rand"][:keep], atol=0.02)
    # the corrected curve gives the same resolution shell (random phases differ, so not per shell)
    assert r.crossing_0143.shell == _last_passing(svm["fsc_half_masked_corrected"]) + 2


# --------------------------------------------------------------------------- analytic
def test_fsc_of_a_map_with_itself_and_affine_copy_is_one():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(37, 37, 37)).astype(np.float32)
    m = make_volume(da.from_array(x, chunks=(10, 13, 16)), voxel_size=1.3)
    assert np.allclose(_quiet(m, m).fsc_unmasked, 1.0, atol=1e-6)
    affine = like(m, 2.5 * m.data - 7.0)
    f = _quiet(affine, m).fsc_unmasked
    np.testing.assert_allclose(f[1:], 1.0, atol=1e-5)


def test_fsc_non_cubic_anisotropic_self_is_one():
    rng = np.random.default_rng(1)
    m = make_volume(rng.normal(size=(20, 24, 22)), voxel_size=(1.3, 1.1, 1.0))
    r = _quiet(m, m)
    assert r.box_edge == pytest.approx(22.0)
    assert r.fsc_unmasked.size == 11
    np.testing.assert_allclose(r.fsc_unmasked, 1.0, atol=1e-6)
    np.testing.assert_allclose(r.frequency, np.arange(11) / 22.0)


def test_independent_noise_fsc_is_zero_with_binomial_spread():
    rng = np.random.default_rng(2)
    a = make_volume(rng.normal(size=(64, 64, 64)), voxel_size=1.0)
    b = make_volume(rng.normal(size=(64, 64, 64)), voxel_size=1.0)
    r = _quiet(a, b, hermitian_weights=True)
    # with Friedel pairs counted twice, count = 2 × independent complex voxels, and FSC ~ N(0, 1/count)
    z = (r.fsc_unmasked * np.sqrt(r.count))[2:]
    assert abs(z.mean()) < 3 / math.sqrt(z.size)
    assert 0.7 < z.std() < 1.35
    assert r.crossing_0143.shell <= 4


def test_signal_plus_noise_fsc_equals_snr_over_one_plus_snr():
    rng = np.random.default_rng(3)
    shape = (64, 64, 64)
    sig = rng.normal(size=shape)
    snr = 1.0  # white signal and white noise: SNR the same in every shell
    h1 = make_volume(sig + rng.normal(size=shape) / math.sqrt(snr), voxel_size=1.0)
    h2 = make_volume(sig + rng.normal(size=shape) / math.sqrt(snr), voxel_size=1.0)
    r = _quiet(h1, h2, hermitian_weights=True)
    rho = snr / (1 + snr)
    sigma = (1 - rho**2) / np.sqrt(r.count[2:])
    dev = (r.fsc_unmasked[2:] - rho) / sigma
    assert np.all(np.abs(dev) < 4)
    assert abs(dev.mean()) < 3 / math.sqrt(dev.size)


# --------------------------------------------------------------------------- mask correction on a phantom
class _Sim:
    """Phantom truth and mask with our own white noise (σ = std of the truth), so the noise model is known."""

    def __init__(self, ph):
        t = ph.truth.values.astype(np.float64)
        self.vs = ph.truth.attrs["voxel_size"]
        rng = np.random.default_rng(10)
        self.truth = t
        self.n1 = t.std() * rng.standard_normal(t.shape)
        self.n2 = t.std() * rng.standard_normal(t.shape)
        self.half1 = make_volume(t + self.n1, voxel_size=self.vs)
        self.half2 = make_volume(t + self.n2, voxel_size=self.vs)
        self.mask = ph.mask


@pytest.fixture(scope="module")
def phantom():
    from chunkem.phantoms import make_phantom

    return _Sim(make_phantom(box=64, resolution=3.5, seed=0))


def _noise_free_background_reference(sim):
    """Unmasked FSC of halves whose noise lives only inside the molecule (mask > 0.5)."""
    inside = sim.mask.values > 0.5
    t = sim.truth
    return _quiet(make_volume(t + inside * sim.n1, voxel_size=sim.vs),
                  make_volume(t + inside * sim.n2, voxel_size=sim.vs))


def test_soft_mask_correction_matches_noise_free_background(phantom):
    sim = phantom
    ref = _noise_free_background_reference(sim).fsc_unmasked
    r = _quiet(sim.half1, sim.half2, mask=sim.mask, force_mask=True)
    beyond = np.arange(ref.size) >= r.randomize_at + 2
    # the soft model mask (3 Å cosine edge) induces almost no correlation
    assert abs(r.fsc_randomized[beyond].mean()) < 0.05
    d = np.abs(r.fsc_corrected[beyond] - ref[beyond])
    assert d.max() < 0.05 and d.mean() < 0.025  # spec: within 0.05
    # with signal left, the masked curve is above the unmasked one (solvent noise removed)
    sig = beyond & (ref > 0.143)
    assert sig.sum() >= 5
    assert np.all(r.fsc_corrected[sig] > r.fsc_unmasked[sig])


def test_too_tight_mask_inflates_masked_fsc_and_correction_removes_it(phantom):
    sim = phantom
    ref = _noise_free_background_reference(sim).fsc_unmasked
    smooth = ndimage.gaussian_filter(sim.truth, 1.5)
    tight = (smooth > np.percentile(smooth, 95)).astype(np.float32)  # hard edge, 5 % of the box
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = fsc(sim.half1, sim.half2, mask=like(sim.half1, tight), force_mask=True)
    beyond = np.arange(ref.size) >= r.randomize_at + 2
    excess_masked = (r.fsc_masked - ref)[beyond]
    excess_corr = (r.fsc_corrected - ref)[beyond]
    assert excess_masked.mean() > 0.1  # the mask-induced correlation
    assert r.fsc_randomized[beyond].mean() > 0.2  # ... which the phase-randomised maps measure
    assert np.all(r.fsc_corrected[beyond] <= r.fsc_masked[beyond] + 1e-9)  # the expected drop
    assert abs(excess_corr.mean()) < 0.6 * excess_masked.mean()
    assert any("too sharp" in str(w.message) for w in caught)


# --------------------------------------------------------------------------- chunk invariance
def test_fsc_chunk_and_strategy_invariant(phantom):
    ph = phantom
    ref = _quiet(ph.half1, ph.half2, mask=ph.mask, seed=4)
    h1 = ph.half1.chunk({"z": 20, "y": 27, "x": 33})
    h2 = ph.half2.chunk({"z": 23, "y": 64, "x": 40})
    m = ph.mask.chunk({"z": 30, "y": 50, "x": 21})
    for strategy in ("gather", "slab"):
        r = _quiet(h1, h2, mask=m, seed=4, strategy=strategy)
        for name in ("fsc_unmasked", "fsc_masked", "fsc_randomized", "fsc_corrected"):
            np.testing.assert_allclose(getattr(r, name), getattr(ref, name), atol=1e-5, err_msg=f"{name} {strategy}")
        assert r.randomize_at == ref.randomize_at
        assert r.resolution_0143 == pytest.approx(ref.resolution_0143, abs=1e-4)
    other = _quiet(ph.half1, ph.half2, mask=ph.mask, seed=5)
    assert not np.allclose(other.fsc_randomized[ref.randomize_at + 1:], ref.fsc_randomized[ref.randomize_at + 1:])


def test_masked_fsc_transforms_each_half_map_once(phantom, monkeypatch):
    """Gathered maps: 2 half-map FFTs (kept for the randomisation), 2 masked, 2 randomised masked,
    2 inverse FFTs -- and the same curves as from the in-memory halves."""
    from chunkem.engine import spectral

    calls = {"rfftn": 0, "irfftn": 0}
    fwd, inv = spectral._rfftn_block, spectral._irfftn_block

    def count_fwd(x):
        calls["rfftn"] += 1
        return fwd(x)

    def count_inv(f, shape):
        calls["irfftn"] += 1
        return inv(f, shape)

    ph = phantom
    ref = _quiet(ph.half1, ph.half2, mask=ph.mask, seed=2)
    monkeypatch.setattr(spectral, "_rfftn_block", count_fwd)
    monkeypatch.setattr(spectral, "_irfftn_block", count_inv)
    r = _quiet(ph.half1.chunk(30), ph.half2.chunk(30), mask=ph.mask.chunk(30), seed=2, strategy="gather")
    assert calls == {"rfftn": 6, "irfftn": 2}
    for name in ("fsc_unmasked", "fsc_masked", "fsc_randomized", "fsc_corrected"):
        np.testing.assert_allclose(getattr(r, name), getattr(ref, name), atol=1e-5, err_msg=name)
    # a given randomisation resolution: one compute for all three curves, same numbers
    calls.update(rfftn=0, irfftn=0)
    at = r.box_edge / r.randomize_at
    r2 = _quiet(ph.half1.chunk(30), ph.half2.chunk(30), mask=ph.mask.chunk(30), seed=2, strategy="gather",
                randomize_at_resolution=at)
    assert calls == {"rfftn": 6, "irfftn": 2}
    assert r2.randomize_at == r.randomize_at
    np.testing.assert_allclose(r2.fsc_corrected, r.fsc_corrected, atol=1e-6)


# --------------------------------------------------------------------------- reports and errors
def test_result_reports(phantom, tmp_path):
    r = _quiet(phantom.half1, phantom.half2, mask=phantom.mask)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["resolution_0143_A"] == pytest.approx(r.resolution_0143)
    text = r.to_csv(tmp_path / "c.csv")
    assert (tmp_path / "c.csv").read_text() == text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == r.frequency.size
    np.testing.assert_allclose([float(x["fsc_corrected"]) for x in rows], r.fsc_corrected, atol=1e-5)
    r.plot(tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    c = resolution_crossing(r.fsc_final, box_edge=r.box_edge, threshold=0.143)
    assert r.resolution_0143 == pytest.approx(c.resolution_interp)


def test_bad_inputs_raise_clear_errors():
    rng = np.random.default_rng(5)
    a = make_volume(rng.normal(size=(16, 16, 16)), voxel_size=1.0)
    with pytest.raises(GeometryError, match="shape"):
        fsc(a, make_volume(rng.normal(size=(16, 16, 18)), voxel_size=1.0))
    with pytest.raises(GeometryError, match="voxel size"):
        fsc(a, make_volume(rng.normal(size=(16, 16, 16)), voxel_size=1.1))
    with pytest.raises(GeometryError, match="origin"):
        fsc(a, make_volume(rng.normal(size=(16, 16, 16)), voxel_size=1.0, origin=5.0))
    with pytest.raises(GeometryError, match="mask"):
        fsc(a, a, mask=make_volume(np.ones((16, 16, 16)), voxel_size=1.0, origin=(0, 0, 3.0)))
    with pytest.raises(DataValueError, match="all zeros"):
        fsc(a, a, mask=make_volume(np.zeros((16, 16, 16)), voxel_size=1.0))
    with pytest.raises(DataValueError, match=r"\[0, 1\]"):
        fsc(a, a, mask=make_volume(np.full((16, 16, 16), 2.0), voxel_size=1.0))
    with pytest.raises(ParameterError, match="Nyquist"):
        fsc(a, a, d_min=1.5)
    with pytest.raises(ParameterError, match="never drops below"):
        fsc(a, a, mask=make_volume(np.ones((16, 16, 16)), voxel_size=1.0))
