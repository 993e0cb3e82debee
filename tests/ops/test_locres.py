"""Local resolution (local FSC fast/exact, MonoRes) and local filtering.

References: the phantom's known local resolution (chunkem.phantoms: the
resolution where the half-map FSC would cross 0.143 for the local B), the
exact per-voxel windowed FFT mode, the global masked FSC of real half maps,
numpy whole-array results for chunk invariance, and numpy FFT filters for
local filtering.
"""

from __future__ import annotations

import warnings

import dask
import dask.array as da
import numpy as np
import pytest
import scipy.fft
from hypothesis import given, settings
from hypothesis import strategies as st

from chunkem.engine import spectral
from chunkem.errors import DataValueError, GeometryError, ParameterError
from chunkem.kernels import locres as K
from chunkem.kernels.fsc import resolution_crossing
from chunkem.ops.locres import local_filter, local_resolution
from chunkem.phantoms import make_phantom
from chunkem.volume import make_volume

NPC = "npc_sta_halfmaps"


@pytest.fixture(scope="module")
def phantom():
    """64³ at 1.1 Å, half-map FSC 3.5 Å, B 20 → 200 Å² along x (true local resolution 2.2-4.1 Å)."""
    return make_phantom(box=64, voxel_size=1.1, resolution=3.5, b_range=(20.0, 200.0), seed=0)


@pytest.fixture(scope="module")
def small():
    """37³ at 1.4 Å for chunking tests."""
    return make_phantom(box=37, n_residues=40, voxel_size=1.4, resolution=4.5, seed=3)


@pytest.fixture(scope="module")
def fast_result(phantom):
    return local_resolution(phantom.half1, phantom.half2, mask=phantom.mask)


@pytest.fixture(scope="module")
def npc(shared_data):
    from chunkem.io import open_map

    d = shared_data / NPC
    h1 = open_map(d / "npc_ref_A_px_1_inv.mrc").compute()
    h2 = open_map(d / "npc_ref_B_px_1_inv.mrc").compute()
    m = open_map(d / "sphere_r10_g2_bx32.mrc").compute()
    return h1, h2, m


def _truth_checks(est, phantom, max_rmse):
    m = phantom.mask.values > 0.5
    tru = phantom.local_resolution.values[m].astype(np.float64)
    e = np.asarray(est)[m].astype(np.float64)
    rmse = float(np.sqrt(np.mean((e - tru) ** 2)))
    assert rmse < max_rmse, f"RMSE {rmse:.3f} Å vs truth"
    # ranking: medians of the estimate rise with the truth terciles
    edges = np.percentile(tru, [100 / 3, 200 / 3])
    q = np.digitize(tru, edges)
    meds = [float(np.median(e[q == k])) for k in range(3)]
    assert meds[0] < meds[1] < meds[2], f"ranking of regions wrong: {meds}"
    return rmse, meds


# --------------------------------------------------------------------------- ground truth


def test_fast_local_fsc_matches_phantom_truth(phantom, fast_result):
    r = fast_result
    assert r.window == pytest.approx(6 * r.global_resolution, rel=1e-6)
    assert r.global_resolution == pytest.approx(phantom.params["fsc_resolution"], abs=0.05)
    rmse, _ = _truth_checks(r.resolution.values, phantom, 0.5)
    # clearly better than the best constant map (the truth's own spread)
    m = phantom.mask.values > 0.5
    assert rmse < 0.7 * float(np.std(phantom.local_resolution.values[m]))
    assert (r.resolution.values[~m] == 0).all()
    st = r.statistics()
    assert st["n_voxels"] == int(m.sum())
    assert st["q25_A"] < st["median_A"] < st["q75_A"]
    assert st["median_A"] == pytest.approx(np.median(r.resolution.values[m]), rel=1e-6)
    v = r.resolution.values[m]
    assert st["at_best_fraction"] == pytest.approx(np.mean(v <= r.best * 1.00001))
    # a fine limit inside the truth's range (2.2-4.1 Å): the voxels finer than it pile up there, and say so
    capped = local_resolution(phantom.half1, phantom.half2, mask=phantom.mask, window=r.window, best=3.2)
    vc = capped.resolution.values[m]
    assert vc.min() == pytest.approx(3.2, abs=1e-4)
    assert capped.statistics()["at_best_fraction"] == pytest.approx(np.mean(v <= 3.2), abs=0.05)
    assert capped.statistics()["at_best_fraction"] > 0.2 and capped.limits == (3.2, r.worst)


def test_exact_local_fsc_matches_truth_and_fast(phantom, fast_result):
    r = local_resolution(phantom.half1, phantom.half2, mask=phantom.mask, mode="exact", step=4,
                         window=fast_result.window)
    m = phantom.mask.values > 0.5
    g = np.zeros(m.shape, bool)
    g[::4, ::4, ::4] = True
    sel = m & g  # voxels computed exactly (the rest is interpolated)
    ex = r.resolution.values[sel].astype(np.float64)
    fa = fast_result.resolution.values[sel].astype(np.float64)
    tru = phantom.local_resolution.values[sel]
    assert np.sqrt(np.mean((ex - tru) ** 2)) < 0.5
    shell = 1.0 / (r.window * 2)  # one shell of the padded window
    agree = (np.abs(1 / ex - 1 / fa) <= shell) | (np.abs(ex - fa) <= 0.3)
    assert agree.mean() >= 0.95, f"fast vs exact: {agree.mean():.3f} within one shell"
    # interpolated map covers the mask
    assert (r.resolution.values[m] > 0).all()


def test_monores_matches_phantom_truth(phantom):
    r = local_resolution(phantom.half1, phantom.half2, mask=phantom.mask, method="monores")
    _truth_checks(r.resolution.values, phantom, 1.0)
    assert r.frequencies[0] > r.frequencies[-1]  # scanned from coarse to fine


def test_monores_values_are_the_scanned_resolutions(small):
    """The scan keeps each voxel's last passed step exactly (not rounded by the float32 of a Volume): most
    values are scanned resolutions, here on a grid (9.13 - 0.37 k Å) with no float32-friendly values."""
    ch = {"z": 12, "y": 13, "x": 14}
    r = local_resolution(small.half1.chunk(ch), small.half2.chunk(ch), mask=small.mask.chunk(ch), method="monores",
                         max_resolution=9.13, resolution_step=0.37)
    v = r.values_in_mask()
    ds = np.asarray(r.frequencies)
    on_grid = np.min(np.abs(v[:, None] - ds[None, :]), axis=1) < 1e-4
    assert on_grid.mean() > 0.3, on_grid.mean()  # 0.49 (the rest is the post-smoothing's finer value)
    assert r.limits == (pytest.approx(ds.min()), pytest.approx(9.13))  # the finest and coarsest scanned
    assert r.statistics()["at_best_fraction"] == pytest.approx(np.mean(v <= ds.min() * 1.00001))


def test_monores_single_map_ranks_regions(phantom):
    r = local_resolution(phantom.half1, method="monores", mask=phantom.mask)
    m = phantom.mask.values > 0.5
    e = r.resolution.values[m]
    tru = phantom.local_resolution.values[m]
    edges = np.percentile(tru, [100 / 3, 200 / 3])
    q = np.digitize(tru, edges)
    meds = [float(np.median(e[q == k])) for k in range(3)]
    assert meds[0] < meds[2]
    # one half map has half the SNR of the pair: coarser, but close to the truth
    assert 0 <= np.median(e) - np.median(tru) < 1.0


def test_monores_single_map_in_a_masked_box():
    """One map masked by a sphere smaller than the box (a refinement's particle mask, radius 26 voxels here,
    the molecule's mask reaches 23): the zeros beyond it are not noise (Xmipp's cliff search), so the map
    reads as the unmasked one. Measured: 79 % of the mask voxels within one 0.25 Å step of the unmasked
    map's value (25 % when the zeros count as noise, which reads 0.5 Å finer)."""
    ph = make_phantom(box=64, n_residues=80, voxel_size=1.1, resolution=3.5, b_range=(20.0, 200.0), seed=0)
    m = ph.mask.values > 0.5
    r = np.sqrt(((np.indices(m.shape) - 32) ** 2).sum(0))
    assert 20 < r[m].max() < 25
    base = local_resolution(ph.half1, method="monores", mask=ph.mask).resolution.values[m]
    boxed = make_volume((ph.half1.values * (r < 26)).astype(np.float32), voxel_size=1.1)
    e = local_resolution(boxed, method="monores", mask=ph.mask).resolution.values[m]
    assert (np.abs(e - base) <= 0.2501).mean() > 0.7
    assert abs(np.median(e) - np.median(base)) <= 0.25
    # masked tightly around the molecule: nothing to take the noise from
    tight = make_volume((ph.half1.values * (ph.mask.values > 0.5)).astype(np.float32), voxel_size=1.1,
                        name="masked.mrc")
    with pytest.raises(DataValueError, match="masked.mrc.*flat outside the mask"):
        local_resolution(tight, method="monores", mask=ph.mask)


def test_monores_half_maps_in_a_masked_box():
    """Half maps masked by a sphere of 26 voxels: their difference is zero beyond it, which is not noise either
    (Xmipp excludes what lies beyond the cliff in both modes). Measured: 98 % of the mask voxels within one
    0.25 Å step of the unmasked halves' map (91 % when the zeros count). Identical halves are refused."""
    ph = make_phantom(box=64, n_residues=80, voxel_size=1.1, resolution=3.5, b_range=(20.0, 200.0), seed=0)
    m = ph.mask.values > 0.5
    r = np.sqrt(((np.indices(m.shape) - 32) ** 2).sum(0))
    base = local_resolution(ph.half1, ph.half2, method="monores", mask=ph.mask).resolution.values[m]
    boxed = [make_volume((h.values * (r < 26)).astype(np.float32), voxel_size=1.1) for h in (ph.half1, ph.half2)]
    e = local_resolution(*boxed, method="monores", mask=ph.mask).resolution.values[m]
    assert (np.abs(e - base) <= 0.2501).mean() > 0.95
    with pytest.raises(DataValueError, match="half1 and half2 hold the same values"):  # in memory: compared
        local_resolution(ph.half1, ph.half1.copy(), method="monores", mask=ph.mask)
    with pytest.raises(DataValueError, match="the two half maps are the same"):  # lazy, two graphs: the noise
        local_resolution(ph.half1.chunk(32), ph.half1.chunk(20), method="monores", mask=ph.mask).resolution.values


def test_monores_one_map_warns_on_a_soft_masked_map(shared_data):
    """EMD-3488 as deposited: multiplied by a soft mask (its variance falls 162-fold across the noise region),
    so a single-map noise threshold means little: MonoRes says so, in a lazy run when it is computed. An
    unmasked phantom does not warn."""
    from chunkem.io import open_map

    hb = open_map(shared_data / "emd3488_haemoglobin" / "emd_3488.mrc")  # lazy
    with pytest.warns(UserWarning, match=r"emd_3488.*falls \d+-fold.*soft mask"):
        local_resolution(hb, method="monores", max_resolution=6.0).resolution.values
    ph = make_phantom(box=48, n_residues=40, voxel_size=1.2, resolution=4.0, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        local_resolution(ph.half1, method="monores", mask=ph.mask, max_resolution=8.0)


def test_monores_warns_when_most_voxels_pass_no_step(shared_data):
    """A tomogram crop (int16, 10.5 Å) with one map and the automatic mask: what lies outside the mask is other
    density, not noise, so only 1.1 % of the mask voxels ever pass; the rest take the median. Said, not hidden."""
    from chunkem.io import open_map

    mt = open_map(shared_data / "microtubule_tomogram_crops" / "14pf_MT.mrc")
    with pytest.warns(UserWarning, match=r"only \d+\.\d % of the \d+ voxels analysed passed any resolution step"):
        r = local_resolution(mt, method="monores")
        v = r.resolution.values[r.mask.values > 0.5]
    assert np.mean(v == np.median(v)) > 0.5


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_density_cut_by_the_box_face(phantom, mode):
    """A box whose face cuts through the molecule: near that face local FSC reads what it reads in the whole
    map. Both modes see the map mirrored beyond its faces. Wrapped around (a periodic box; the fast mode's
    windows were truncated at the faces, its bands still periodic), the cut density met the solvent of the
    opposite face, a jump both halves share, and the first 6 slices read finer: median -0.35 / -0.34 Å (fast)
    and -0.41 / -0.43 Å (exact) at cuts 23 / 32, 37-45 % of the voxels within 0.3 Å. Measured now: medians
    +0.005 / +0.059 Å (fast), +0.004 / +0.052 Å (exact); 89-95 % within 0.3 Å."""
    kw = dict(window=20.0, mode=mode, step=2 if mode == "exact" else None)
    whole_r = local_resolution(phantom.half1, phantom.half2, mask=phantom.mask, **kw)
    assert whole_r.params["mirrored_axes"] == ""  # solvent at every face: the periodic box, nothing to pay
    assert max(whole_r.params["face_correlation"]) < 0.05
    whole = whole_r.resolution.values
    for cut in (23, 32):
        sl = (slice(cut, None), slice(None), slice(None))
        halves = [make_volume(h.values[sl], voxel_size=1.1) for h in (phantom.half1, phantom.half2)]
        mask = make_volume(phantom.mask.values[sl], voxel_size=1.1)
        r = local_resolution(*halves, mask=mask, **kw)
        assert r.params["mirrored_axes"] == "z"  # only the cut axis (face correlation 0.38-0.39)
        near = mask.values > 0.5
        near[6:] = False  # within 6 voxels (6.6 Å) of the cut face
        d = (r.resolution.values - whole[sl])[near]
        assert abs(np.median(d)) < 0.15, (cut, np.median(d))
        assert np.mean(np.abs(d) <= 0.3) > 0.8, (cut, np.mean(np.abs(d) <= 0.3))
        if mode == "fast":  # the wrapped-around box reads finer there
            p = local_resolution(*halves, mask=mask, faces="periodic", **kw)
            assert p.params["mirrored_axes"] == ""
            assert np.median((p.resolution.values - whole[sl])[near]) < -0.2


def test_face_correlation_is_the_half_maps_correlation_over_the_face_slabs():
    """faces="auto" decides per axis from the correlation of the halves over that axis's two face slabs: equal to
    numpy's corrcoef of the slabs, lazily on any chunking; shared signal only at the z faces flags z only."""
    from chunkem.ops.locres import FACE_SIGNAL, _face_correlation

    rng = np.random.default_rng(4)
    shape, t = (30, 26, 28), 4
    shared = np.zeros(shape)
    inner = (slice(t, shape[1] - t), slice(t, shape[2] - t))  # away from the y and x face slabs
    shared[(slice(0, t),) + inner] = rng.standard_normal((t, shape[1] - 2 * t, shape[2] - 2 * t))
    shared[(slice(shape[0] - t, None),) + inner] = rng.standard_normal((t, shape[1] - 2 * t, shape[2] - 2 * t))
    h1, h2 = (make_volume(shared + rng.standard_normal(shape), voxel_size=1.3) for _ in range(2))
    want = []
    for ax in range(3):
        a, b = (np.moveaxis(h.values.astype(np.float64), ax, 0) for h in (h1, h2))
        want.append(np.corrcoef(np.concatenate([a[:t], a[-t:]]).ravel(), np.concatenate([b[:t], b[-t:]]).ravel())[0, 1])
    got = _face_correlation(h1, h2, thickness=[t] * 3)
    ch = {"z": 7, "y": 11, "x": 28}
    lazy = _face_correlation(h1.chunk(ch), h2.chunk(ch), thickness=[t] * 3)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(lazy, want, atol=1e-6)
    assert got[0] > 0.25 and max(abs(got[1]), abs(got[2])) < FACE_SIGNAL


# --------------------------------------------------------------------------- real half maps


def _masked_fsc_resolution(h1, h2, m):
    s1 = spectral.rfft(h1 * m)
    s2 = spectral.rfft(h2 * m)
    sums = spectral.shell_sums(s1, s2, progress=False)
    L = float(min(n * v for n, v in zip(h1.shape, h1.attrs["voxel_size"])))
    return resolution_crossing(sums.fsc(), box_edge=L).resolution_interp


def test_npc_median_matches_global_masked_fsc(npc):
    h1, h2, m = npc
    glob = _masked_fsc_resolution(h1, h2, m)
    assert 6.5 < glob < 9.5  # sanity of the reference itself
    fast = local_resolution(h1, h2, mask=m)
    assert abs(fast.median / glob - 1) < 0.2, (fast.median, glob)
    mono = local_resolution(h1, h2, mask=m, method="monores")
    assert abs(mono.median / glob - 1) < 0.2, (mono.median, glob)


def test_npc_fast_vs_exact(npc):
    """Real half maps: fast vs exact within one padded Fourier shell (or 0.3 Å) for >= 95 % of the voxels of a
    molecular mask; in the solvent of the data set's spherical mask both are noise-limited.

    The whole data set (32³, no larger crop exists) at the default window:
    the global FSC of these halves reaches Nyquist, so the default window
    is 6 × 5.36 Å = 12 voxels, what a user gets.

    * Molecular mask: chunkem's FDR confidence mask (1 %, BY, the defaults)
      of the averaged halves, inverted (these sub-tomogram averages hold
      the protein as negative values, cryo-ET contrast). Measured: 876
      voxels, 99.3 % within one padded shell 1/(2·window), 100 % within
      1/window; the exact mode agrees with itself one voxel away for 96.1 %.
      (With the box wrapped around at its faces instead of mirrored: 96.1 %;
      78 % of the 152 voxels within half a window of a face, where the fast
      mode read Nyquist for 57 %.)
    * The data set's sphere (radius 10 voxels, 10 875 voxels, 94 % of them
      outside the molecular mask): 87.6 % (94.3 % within 1/window); exact
      vs exact one voxel away 87.8 %. There the local FSC hovers near 0.143
      over several shells and the first crossing is noise; the fast mode is
      held to the exact mode's own voxel-to-voxel agreement.
    """
    from chunkem.ops.fdr import fdr_confidence
    from chunkem.volume import like

    h1, h2, m = npc

    def agree(x, y, tol):  # within ``tol`` in 1/Å, or 0.3 Å
        return float(((np.abs(1 / x - 1 / y) <= tol) | (np.abs(x - y) <= 0.3)).mean())

    # the molecular mask
    mean = (h1.values + h2.values) / 2
    sphere = m.values > 0.5
    assert mean[sphere].mean() < mean[~sphere].mean()  # protein is negative in these maps
    mol = fdr_confidence(like(h1, (-mean).astype(np.float32))).mask
    n_mol = int((mol.values > 0.5).sum())
    assert 300 < n_mol < 3000 and (mol.values > 0.5)[sphere].mean() < 0.2
    fast_m = local_resolution(h1, h2, mask=mol)
    assert fast_m.box == (12, 12, 12)  # the default window
    assert fast_m.params["mirrored_axes"] == "zyx"  # density at every face (face correlation 0.92-0.97)
    shell = 1.0 / (2 * fast_m.window)  # one padded shell
    ex_m = local_resolution(h1, h2, mask=mol, mode="exact", window=fast_m.window)
    sm = mol.values > 0.5
    a, b = (r.resolution.values[sm].astype(np.float64) for r in (fast_m, ex_m))
    assert agree(a, b, shell) >= 0.95, agree(a, b, shell)  # the check
    assert abs(np.median(a) - np.median(b)) < 0.15
    idx = np.indices(sm.shape)
    face = np.min([np.minimum(idx[ax], sm.shape[ax] - 1 - idx[ax]) for ax in range(3)], axis=0)[sm] < 6
    assert face.sum() > 100 and agree(a[face], b[face], shell) >= 0.95  # near the faces too (the maps are mirrored)

    # the spherical mask, solvent included
    fast = local_resolution(h1, h2, mask=m)
    ex = local_resolution(h1, h2, mask=m, mode="exact", window=fast.window)
    shells = local_resolution(h1, h2, mask=m, window=fast.window, band_spacing=1 / (2 * fast.window))
    a = fast.resolution.values.astype(np.float64)
    b = ex.resolution.values.astype(np.float64)
    c = shells.resolution.values.astype(np.float64)
    # the mask only selects voxels (float round-off: the FFT regions follow the active voxels)
    np.testing.assert_allclose(a[sm & sphere], fast_m.resolution.values[sm & sphere], atol=1e-3)
    sel = sphere.copy()
    sel[:, :, -1] = False
    sel &= np.roll(sel, -1, axis=2)  # voxels whose x-neighbour is in the mask too
    fe = agree(a[sel], b[sel], shell)
    jitter = agree(b[sel], np.roll(b, -1, axis=2)[sel], shell)
    assert fe < 0.95 and jitter < 0.9  # noise-limited: the exact mode does not reproduce itself either
    assert fe >= jitter - 0.03, (fe, jitter)
    assert agree(c[sel], b[sel], shell) >= fe  # bands on the exact mode's padded shells: at least as close
    assert agree(a[sel], b[sel], 2 * shell) >= 0.9  # within one shell of the unpadded window
    assert abs(np.median(a[sel]) - np.median(b[sel])) < 0.5
    assert abs(np.median(c[sel]) - np.median(b[sel])) < 0.15


# --------------------------------------------------------------------------- chunks, laziness, cluster


@pytest.mark.parametrize("kw", [dict(mode="fast", band_spacing=1 / 20.0), dict(mode="exact", step=3),
                                dict(mode="fast", band_spacing=1 / 20.0, faces="mirror"),
                                dict(mode="exact", step=3, faces="mirror"),
                                dict(method="monores", max_resolution=9.0, resolution_step=0.5),
                                dict(method="monores", max_resolution=9.13, resolution_step=0.37)],
                         ids=["fast", "exact-step3", "fast-mirror", "exact-step3-mirror", "monores",
                              "monores-odd-steps"])
def test_chunk_invariance(small, kw):
    ref = local_resolution(small.half1, small.half2, mask=small.mask, window=14.0, **kw).resolution.values
    ch = {"z": 10, "y": 13, "x": 16}
    with dask.config.set({"chunkem.chunks": 19}):  # internal stages on uneven chunks (19 + 18) too
        r = local_resolution(small.half1.chunk(ch), small.half2.chunk(ch), mask=small.mask.chunk(ch), window=14.0,
                             **kw)
        assert isinstance(r.resolution.data, da.Array)
        assert r.resolution.data.chunks == small.half1.chunk(ch).data.chunks
        got = r.resolution.values
    np.testing.assert_allclose(got, ref, atol=1e-3)


@settings(max_examples=10, deadline=None)
@given(st.data())
def test_fast_band_step_any_chunking(data):
    """The fast mode's band stage (halo = half the window, in Å; zeros beyond the map edge; finished blocks
    skipped) equals one whole-array call of the zero-padded linear correlation, for any chunking."""
    from chunkem.engine.local import run_local
    from chunkem.ops.locres import _band_fsc_block

    shape = tuple(data.draw(st.integers(12, 26), label=f"n{ax}") for ax in range(3))
    vs = data.draw(st.sampled_from([(1.0, 1.0, 1.0), (1.3, 1.1, 0.9)]), label="voxel")
    # (a 3-voxel Hann window is a single voxel, w = [0, 1, 0]: FSC ±1 from float round-off; not tested)
    box = tuple(data.draw(st.integers(5, min(9, n)), label=f"box{ax}") for ax, n in enumerate(shape))
    chunks = tuple(data.draw(st.integers(box[ax] // 2 + 1, shape[ax]), label=f"c{ax}") for ax in range(3))
    rng = np.random.default_rng(sum(shape))
    a = make_volume(rng.standard_normal(shape), voxel_size=vs)
    b = make_volume(a.values + rng.standard_normal(shape), voxel_size=vs)
    state = np.full(shape, 0.6, np.float32)
    state[:, :, : shape[2] // 2] = -1.25  # half of the map has crossed already: its blocks skip the band
    sv = make_volume(state, voxel_size=vs)
    kw = dict(f_prev=0.1, f_cur=0.2, first=False, cutoff=0.5)
    # reference: linear correlation on the whole arrays (the window truncated at the map edge), then the step
    full = K.windowed_band_fsc(a.values, b.values, box=box)
    ref = K.crossing_step(state, full, **kw)
    reach = tuple((bx // 2) * v for bx, v in zip(box, vs))
    ch = dict(zip("zyx", chunks))
    fsc = run_local(_band_fsc_block, a.chunk(ch), b.chunk(ch), sv.chunk(ch), reach=reach, with_offset=True, box=box,
                    origin=(0.0, 0.0, 0.0), map_shape=shape)
    assert np.isnan(fsc.values[:, :, : max(0, shape[2] // 2 - box[2])]).all()  # crossed, far from active voxels
    active = state >= 0
    np.testing.assert_allclose(fsc.values[active], full[active], atol=5e-5)
    got = run_local(K.crossing_step, sv.chunk(ch), fsc, reach=0.0, **kw).values
    # the crossing decision, except where the FSC is the cutoff to float round-off (0.50000006 vs 0.4999999)
    decided = np.abs(full - kw["cutoff"]) > 1e-5
    np.testing.assert_allclose(got[decided], ref[decided], atol=5e-5)
    assert (got[:, :, : shape[2] // 2] == -1.25).all()


def test_exact_unstepped_chunk_invariance(small):
    m = small.mask.values.copy()
    m[:, :, :16] = 0
    m[:, :, 22:] = 0  # a small region across a chunk boundary keeps the per-voxel FFTs cheap
    mask = make_volume(m, voxel_size=small.mask.attrs["voxel_size"])
    ref = local_resolution(small.half1, small.half2, mask=mask, window=12.0, mode="exact").resolution.values
    ch = {"z": 10, "y": 13, "x": 16}
    with dask.config.set({"chunkem.chunks": 19}):
        got = local_resolution(small.half1.chunk(ch), small.half2.chunk(ch), mask=mask.chunk(ch), window=12.0,
                               mode="exact").resolution.values
    np.testing.assert_array_equal(got, ref)
    assert (got[m > 0.5] > 0).all()


def _no_compute(*args, **kwargs):
    raise AssertionError("something computed inside a lazy call")


def test_lazy_in_lazy_out(small):
    """Given the window and the face treatment nothing is computed; faces="auto" reads the face slabs only."""
    ch = {"z": 20, "y": 20, "x": 20}
    h1, h2 = small.half1.chunk(ch), small.half2.chunk(ch)
    for faces in ("periodic", "mirror"):
        with dask.config.set(scheduler=_no_compute):
            r = local_resolution(h1, h2, window=14.0, faces=faces)
            f = local_filter(h1, locres=r.resolution)
        assert isinstance(r.resolution.data, da.Array) and isinstance(f.data, da.Array)
    seen = []

    def record(dsk, keys, **kw):
        graph = dsk.__dask_graph__() if hasattr(dsk, "__dask_graph__") else dsk
        seen.append(keys)
        return dask.get(graph, keys, **kw)

    with dask.config.set(scheduler=record):
        r = local_resolution(h1, h2, window=14.0)
    assert len(seen) == 1 and isinstance(r.resolution.data, da.Array)  # one small REDUCE: the face slabs' sums


def test_monores_one_map_lazy_and_chunk_invariant(small, monkeypatch):
    """One map: the noise region (its cliff radius, a REDUCE over a strided sample) stays lazy and does not
    depend on the chunks (the empty-mask check is the one computation of the call, patched out here)."""
    import chunkem.ops.locres as L

    kw = dict(method="monores", max_resolution=9.0, resolution_step=0.5)
    ref = local_resolution(small.half1, mask=small.mask, **kw).resolution.values
    ch = {"z": 10, "y": 13, "x": 16}
    monkeypatch.setattr(L, "_mask_count", lambda mask: 1)
    with dask.config.set({"chunkem.chunks": 19}):
        with dask.config.set(scheduler=_no_compute):
            r = local_resolution(small.half1.chunk(ch), mask=small.mask.chunk(ch), **kw)
        got = r.resolution.values
    assert np.isfinite(ref[small.mask.values > 0.5]).all()
    np.testing.assert_allclose(got, ref, atol=1e-3)


@pytest.mark.parametrize("kw", [dict(window=14.0, band_spacing=1 / 10.0, cutoff=(0.143, 0.5)),
                                dict(window=14.0, mode="exact", step=3),
                                dict(method="monores", max_resolution=9.0, resolution_step=0.5)],
                         ids=["fast-two-cutoffs", "exact-step3", "monores"])
def test_two_worker_cluster(small, two_worker_client, kw):
    client = two_worker_client
    ref = local_resolution(small.half1, small.half2, mask=small.mask, **kw).resolution.values
    ch = {"z": 19, "y": 20, "x": 37}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with dask.config.set({"chunkem.chunks": 20}):
            r = local_resolution(small.half1.chunk(ch), small.half2.chunk(ch), mask=small.mask.chunk(ch), **kw)
        got = client.compute(r.resolution.data).result()
        assert len(client.scheduler_info()["workers"]) == 2
    np.testing.assert_allclose(got, ref, atol=1e-3)


def test_several_cutoffs_in_one_run(small):
    """cutoff=(0.143, 0.5): each map equals its own single-cutoff run, in both modes and on any chunking;
    the 0.5 crossing comes first, so its map is coarser or equal everywhere."""
    kw = dict(mask=small.mask, window=14.0)
    both = local_resolution(small.half1, small.half2, cutoff=(0.143, 0.5), **kw)
    assert both.cutoffs == [0.143, 0.5]
    sel = small.mask.values > 0.5
    for c in (0.143, 0.5):
        one = local_resolution(small.half1, small.half2, cutoff=c, **kw)
        # (equal up to float round-off: the FFT regions follow the lowest cutoff's open voxels)
        np.testing.assert_allclose(both.at_cutoff(c).resolution.values, one.resolution.values, atol=1e-4)
        assert both.at_cutoff(c).cutoff == c and both.at_cutoff(c).extra == {}
    fine, coarse = both.resolution.values[sel], both.extra[0.5].values[sel]
    assert (coarse >= fine - 1e-5).all()
    assert np.median(coarse) > np.median(fine) + 0.2
    assert both.at_cutoff(0.5).median == pytest.approx(float(np.median(coarse)), abs=1e-4)
    with pytest.raises(KeyError, match="not computed"):
        both.at_cutoff(0.3)
    ch = {"z": 10, "y": 13, "x": 16}
    lazy = local_resolution(small.half1.chunk(ch), small.half2.chunk(ch), mask=small.mask.chunk(ch), window=14.0,
                            cutoff=(0.5, 0.143))
    np.testing.assert_allclose(lazy.resolution.values, both.extra[0.5].values, atol=1e-3)
    np.testing.assert_allclose(lazy.extra[0.143].values, both.resolution.values, atol=1e-3)
    ex = local_resolution(small.half1, small.half2, mode="exact", step=3, cutoff=(0.5, 0.143), **kw)
    ex1 = local_resolution(small.half1, small.half2, mode="exact", step=3, cutoff=0.143, **kw)
    np.testing.assert_array_equal(ex.extra[0.143].values, ex1.resolution.values)
    assert ex.to_dict()["cutoffs"] == [0.5, 0.143]
    # the exact mode computes each voxel's curve once for both cutoffs, lazily on any chunking too
    exl = local_resolution(small.half1.chunk(ch), small.half2.chunk(ch), mask=small.mask.chunk(ch), mode="exact",
                           step=3, cutoff=(0.5, 0.143), window=14.0)
    a, b = dask.compute(exl.resolution.data, exl.extra[0.143].data)
    np.testing.assert_allclose(a, ex.resolution.values, atol=1e-4)
    np.testing.assert_allclose(b, ex1.resolution.values, atol=1e-4)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs(small):
    h1, h2 = small.half1, small.half2
    other = make_volume(np.zeros((36, 37, 37)), voxel_size=1.4)
    with pytest.raises(GeometryError, match="shape"):
        local_resolution(h1, other, window=14.0)
    coarse = make_volume(h2.values, voxel_size=1.5)
    with pytest.raises(GeometryError, match="voxel size"):
        local_resolution(h1, coarse, window=14.0)
    with pytest.raises(DataValueError, match="empty mask"):
        local_resolution(h1, h2, mask=make_volume(np.zeros(h1.shape), voxel_size=1.4), window=14.0)
    with pytest.raises(ParameterError, match="at least 3 voxels"):
        local_resolution(h1, h2, window=2.5)
    with pytest.raises(ParameterError, match="larger than the box"):
        local_resolution(h1, h2, window=60.0)
    with pytest.raises(ParameterError, match="half2 is missing"):
        local_resolution(h1)
    with pytest.raises(ParameterError, match="method"):
        local_resolution(h1, h2, method="resmap")
    with pytest.raises(ParameterError, match="faces must be one of auto, mirror, periodic"):
        local_resolution(h1, h2, window=14.0, faces="reflect")
    with pytest.raises(ParameterError, match="finer than Nyquist"):
        local_resolution(h1, h2, window=14.0, best=2.0)
    with pytest.raises(ParameterError, match="step"):
        local_resolution(h1, h2, window=14.0, mode="exact", step=9)
    with pytest.raises(ParameterError, match="twice"):
        local_resolution(h1, h2, window=14.0, cutoff=(0.143, 0.143))
    with pytest.raises(ParameterError, match="between 0 and 1"):
        local_resolution(h1, h2, window=14.0, cutoff=(0.143, 1.5))
    with pytest.raises(ParameterError, match="at least one"):
        local_resolution(h1, h2, window=14.0, cutoff=())


# --------------------------------------------------------------------------- local filtering


def _hann_profile(s, d, n_bands, nyq):
    spacing = nyq / (n_bands - 1)
    return sum(K.hann_band(s, centre=j * spacing, spacing=spacing) * K.lowpass_weight(np.array(d), centre=j * spacing,
                                                                                      spacing=spacing)
               for j in range(n_bands))


def _numpy_filter(x, vs, profile):
    n = x.shape
    kz = np.fft.fftfreq(n[0], vs)[:, None, None]
    ky = np.fft.fftfreq(n[1], vs)[None, :, None]
    kx = np.fft.rfftfreq(n[2], vs)[None, None, :]
    s = np.sqrt(kz**2 + ky**2 + kx**2)
    return scipy.fft.irfftn(scipy.fft.rfftn(x.astype(np.float64)) * profile(s), s=n)


def test_local_filter_equals_global_lowpass_per_voxel(small):
    vol = small.half1
    vs = 1.4
    nyq = 1 / (2 * vs)
    loc = np.full(vol.shape, 5.0, np.float32)
    loc[:, :, 18:] = 8.0
    loc[0, 0, 0] = 0.0  # no resolution there: output 0
    out = local_filter(vol, locres=make_volume(loc, voxel_size=vs), n_bands=20).values
    for d, sl in ((5.0, np.s_[:, :, :18]), (8.0, np.s_[:, :, 18:])):
        ref = _numpy_filter(vol.values, vs, lambda s, d=d: _hann_profile(s, d, 20, nyq))
        got, want = out[sl].copy(), ref[sl].copy()
        if d == 5.0:
            got[0, 0, 0] = want[0, 0, 0] = 0.0
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(ref).max())
    assert out[0, 0, 0] == 0.0
    # the profile is a low-pass at d: ~1 well below 1/d, 0 above
    s = np.array([0.0, 0.1, 0.25, 0.3])
    np.testing.assert_allclose(_hann_profile(s, 5.0, 20, nyq), [1, 1, 0, 0], atol=1e-12)


def test_local_filter_bfactor_and_chunks(small):
    vol = small.half1
    vs = 1.4
    nyq = 1 / (2 * vs)
    loc = make_volume(np.full(vol.shape, 4.0, np.float32), voxel_size=vs)
    n_b = 16
    sharp = local_filter(vol, locres=loc, n_bands=n_b, bfactor=-40.0).values
    spacing = nyq / (n_b - 1)

    def prof(s):
        return sum(K.hann_band(s, centre=j * spacing, spacing=spacing)
                   * K.lowpass_weight(np.array(4.0), centre=j * spacing, spacing=spacing)
                   * np.exp(40.0 * (j * spacing) ** 2 / 4) for j in range(n_b))

    ref = _numpy_filter(vol.values, vs, prof)
    np.testing.assert_allclose(sharp, ref, atol=1e-4 * np.abs(ref).max())
    bmap = make_volume(np.full(vol.shape, -40.0), voxel_size=vs)
    np.testing.assert_allclose(local_filter(vol, locres=loc, n_bands=n_b, bfactor=bmap).values, sharp, atol=1e-5)
    ch = {"z": 10, "y": 13, "x": 16}
    lazy = local_filter(vol.chunk(ch), locres=loc.chunk(ch), n_bands=n_b, bfactor=-40.0)
    assert isinstance(lazy.data, da.Array)
    np.testing.assert_allclose(lazy.values, sharp, atol=1e-5 * np.abs(sharp).max())
    with pytest.raises(ParameterError, match="n_bands"):
        local_filter(vol, locres=loc, n_bands=2)
    with pytest.raises(GeometryError):
        local_filter(vol, locres=make_volume(np.ones((5, 5, 5)), voxel_size=vs))


# --------------------------------------------------------------------------- demo


def test_demo_stage(phantom, tmp_path):
    from chunkem.io import open_map, save
    from chunkem.ops.locres import demo_stage

    lazy = {}
    for key in ("half1", "half2", "mask"):
        save(getattr(phantom, key), tmp_path / f"{key}.zarr", progress=False)
        lazy[key] = open_map(tmp_path / f"{key}.zarr")
    out = demo_stage({"phantom": phantom, "outdir": tmp_path, **lazy})  # its time is in `chunkem demo`'s report
    assert out["rmse_A"] < 0.5 and out["corr"] > 0.5
    assert out["median_fsc05_A"] > out["median_A"] + 0.2  # the 0.5 cutoff is crossed first: coarser
    assert (tmp_path / "locres.mrc").exists() and (tmp_path / "locres.png").stat().st_size > 1000
    back = open_map(tmp_path / "locres.mrc").values
    m = phantom.mask.values > 0.5
    assert np.median(back[m]) == pytest.approx(out["median_A"], abs=1e-3)


def test_fast_is_invariant_to_a_constant_offset(small):
    """The exact mode subtracts each window's mean; the fast mode's bands carry no DC, so an offset changes nothing."""
    off = 3.0 * float(small.half1.std())
    kw = dict(mask=small.mask, window=14.0, band_spacing=1 / 28.0)
    ref = local_resolution(small.half1, small.half2, **kw).resolution.values
    got = local_resolution(small.half1 + off, small.half2 + off, **kw).resolution.values
    np.testing.assert_allclose(got, ref, atol=2e-3)
