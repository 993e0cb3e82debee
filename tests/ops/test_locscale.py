"""LocScale op: against locscale's own output on EMD-3488, fast vs exact, model-free on a two-domain
phantom, chunk and scheduler invariance, bad input."""

from __future__ import annotations

import warnings

import dask.array as da
import numpy as np
import pytest
import scipy.ndimage as ndi
from scipy.spatial import cKDTree

from chunkem.engine import spectral
from chunkem.errors import DataValueError, GeometryError, ParameterError
from chunkem.io import open_map
from chunkem.kernels import locscale as KL
from chunkem.ops.filter import lowpass
from chunkem.ops.locscale import locscale, noise_profile, reference_from_model, rscc
from chunkem.ops.modelmap import model_map
from chunkem.ops.sharpen import sharpen
from chunkem.phantoms import build_model, make_phantom, render_gemmi
from chunkem.volume import make_volume

N_SUBSET = 3000  # random mask voxels checked against locscale (the full 112k-voxel exact run takes ~15 s)


@pytest.fixture(scope="module")
def emd3488(shared_data, shared_reference):
    ref = shared_reference / "locscale_emd3488"
    em = open_map(shared_data / "emd3488_haemoglobin" / "emd_3488.mrc")
    mm = open_map(ref / "modelmap.mrc")
    mask = open_map(ref / "mask.mrc")
    out = open_map(ref / "locscale_out.mrc")
    m = np.asarray(mask.values) > 0.99
    idx = np.flatnonzero(m)
    pick = np.random.default_rng(0).choice(idx, N_SUBSET, replace=False)
    sub = np.zeros(m.size, np.float32)
    sub[pick] = 1
    sub_vol = make_volume(sub.reshape(m.shape), voxel_size=em.attrs["voxel_size"], name="subset")
    return {"em": em, "mm": mm, "mask": mask, "out": np.asarray(out.values), "subset": sub_vol,
            "sel": sub.reshape(m.shape) > 0.5}


def test_locscale2_mode_reproduces_locscale_and_exact_mode_agrees(emd3488):
    d = emd3488
    ls2 = locscale(d["em"], model_map=d["mm"], mask=d["subset"], resolution=3.2, mode="locscale2").values
    sel = d["sel"]
    assert rscc(ls2[sel], d["out"][sel]) >= 0.99
    np.testing.assert_allclose(ls2[sel], d["out"][sel], atol=1e-5)  # float32 round-off only
    assert np.all(ls2[~sel] == 0)
    ex = locscale(d["em"], model_map=d["mm"], mask=d["subset"], resolution=3.2, mode="exact").values
    r = rscc(ex[sel], d["out"][sel])
    assert 0.99 <= r < 0.9999  # exact radial bins differ from LocScale 2's octant bins by a few %


def test_fast_agrees_with_exact_on_emd3488(emd3488):
    d = emd3488
    fast = locscale(d["em"], model_map=d["mm"], mask=d["mask"], resolution=3.2, mode="fast").values
    ex = locscale(d["em"], model_map=d["mm"], mask=d["subset"], resolution=3.2, mode="exact").values
    sel = d["sel"]
    assert rscc(fast[sel], ex[sel]) >= 0.97
    assert rscc(fast[sel], d["out"][sel]) >= 0.97
    assert np.all(fast[np.asarray(d["mask"].values) <= 0.5] == 0)


@pytest.fixture(scope="module")
def phantom():
    ph = make_phantom(n_residues=160, box=56, resolution=3.5, seed=1)
    full = make_volume((ph.half1.values + ph.half2.values) / 2, voxel_size=ph.half1.attrs["voxel_size"],
                       name="full")
    mm = model_map(ph.model, resolution=3.5, like=full)
    return ph, full, mm


def test_fast_agrees_with_exact_on_phantom(phantom):
    ph, full, mm = phantom
    every3 = np.zeros(full.shape, np.float32)  # every 3rd voxel along x of the mask, to keep the test short
    every3[:, :, ::3] = np.asarray(ph.mask.values)[:, :, ::3] > 0.5
    sub = make_volume(every3, voxel_size=full.attrs["voxel_size"])
    ex = locscale(full, model_map=mm, mask=sub, resolution=3.5, mode="exact")
    fast = locscale(full, model_map=mm, mask=ph.mask, resolution=3.5, mode="fast")
    assert rscc(fast, ex, sub) >= 0.97
    # and both sharpen towards the model: closer to the model map than the input is
    assert rscc(ex, mm, sub) > rscc(full, mm, sub) + 0.02


def test_model_route_shifts_b_and_renders_on_the_grid(phantom):
    ph, full, _ = phantom
    ref = reference_from_model(ph.model, full, resolution=3.5, refine=False)
    b = ph.model.b_iso
    shifted = ph.model.with_values(b_iso=np.clip(b - np.percentile(b, 1), 0, None))
    np.testing.assert_allclose(ref.values, model_map(shifted, resolution=3.5, like=full).values, atol=1e-6)
    via_model = locscale(full, model=ph.model, refine=False, mask=ph.mask, resolution=3.5, mode="fast")
    via_map = locscale(full, model_map=ref, mask=ph.mask, resolution=3.5, mode="fast")
    np.testing.assert_allclose(via_model.values, via_map.values, atol=1e-6)


def _two_domain_phantom(n=72, a=1.1, b_blur=120.0, noise=0.25, seed=0):
    """Two separate globules, one at B = 20 Å², one at ``b_blur``; truth = both at B = 20 Å²."""
    L = n * a

    def place(m, centre):
        return m.with_values(xyz=m.xyz - m.xyz.mean(0) + np.asarray(centre))

    m1 = place(build_model(60, seed=1), (L * 0.3, L / 2, L / 2))
    m2 = place(build_model(60, seed=2), (L * 0.72, L / 2, L / 2))

    def render(m, b):
        return render_gemmi(m.with_values(b_iso=b), shape=(n,) * 3, voxel_size=(a,) * 3)

    s1 = render(m1, 20.0)
    sharp = s1 + render(m2, 20.0)
    obs = s1 + render(m2, b_blur)
    zz, yy, xx = np.indices((n,) * 3)
    pts = np.stack([xx, yy, zz], -1).reshape(-1, 3) * a
    dom1 = (cKDTree(m1.xyz).query(pts)[0] < 3.0).reshape((n,) * 3)
    dom2 = (cKDTree(m2.xyz).query(pts)[0] < 3.0).reshape((n,) * 3)
    rng = np.random.default_rng(seed)
    obs = obs + rng.normal(scale=noise * obs[dom1 | dom2].std(), size=obs.shape)
    vol = make_volume(obs, voxel_size=a, name="two_domains")
    mask = make_volume((dom1 | dom2).astype(np.float32), voxel_size=a, name="mask")
    return vol, mask, make_volume(sharp, voxel_size=a), dom1, dom2


def test_model_free_beats_global_sharpening_in_the_blurred_domain():
    res = 3.5
    vol, mask, sharp, dom1, dom2 = _two_domain_phantom()
    truth = lowpass(sharp, resolution=res)
    # global sharpening to the same target B (20 Å²), two ways of choosing the global B:
    # the same Guinier fit on the whole map's profile, and the median of the local fits
    prof = spectral.radial_profile(spectral.rfft(vol))
    f = prof.frequency
    b_map = float(KL.guinier_fit(prof.mean_amplitude()[None], f, d_max=10.0, d_min=res,
                                 theory=KL.expected_amplitude(f))[0][0])
    bo = np.full(vol.shape, np.nan, np.float32)
    KL.locscale_block(vol.values, None, mask.values, wn=KL.window_voxels(25.0, 1.1), voxel_size=1.1,
                      model_free={"resolution": res}, bfactor_out=bo)
    # local B separates the domains (decay B, Å²)
    assert np.nanmedian(bo[dom2]) > np.nanmedian(bo[dom1]) + 40
    b_med = float(np.nanmedian(bo[mask.values > 0.5]))
    globals_ = [sharpen(vol, bfactor=-(b - 20.0), lowpass=res) for b in (b_map, b_med)]
    # every other voxel of each domain (the result at a voxel does not depend on the others)
    checker = (np.indices(vol.shape).sum(axis=0) % 2 == 0)
    d1, d2 = dom1 & checker, dom2 & checker
    sub = make_volume((d1 | d2).astype(np.float32), voxel_size=1.1)
    for mode in ("exact", "fast"):
        loc = locscale(vol, model_free=True, resolution=res, mask=sub, mode=mode, target_bfactor=20.0)
        for g in globals_:
            assert rscc(loc, truth, d1) >= rscc(g, truth, d1) - 0.005  # as good where sharp
            assert rscc(loc, truth, d2) >= rscc(g, truth, d2) + 0.005  # better where blurred
        assert rscc(loc, truth, d2) > rscc(vol, truth, d2) + 0.05


def test_noise_profile_of_white_noise_is_flat():
    rng = np.random.default_rng(3)
    v = make_volume(rng.normal(scale=0.5, size=(64, 64, 64)), voxel_size=1.0)
    wn = KL.window_voxels(12.0, 1.0)
    fast = noise_profile(v, wn=wn, mode="fast")
    assert np.allclose(fast[1:], 0.5, rtol=0.2)
    ex = noise_profile(v, wn=wn, mode="exact")
    # mean |F| of complex Gaussian coefficients = sigma * sqrt(pi)/2
    assert np.allclose(ex[2:-1], 0.5 * np.sqrt(np.pi) / 2, rtol=0.2)


def _smooth_case(vs=(1.0, 1.05, 0.95)):
    rng = np.random.default_rng(11)
    a = ndi.gaussian_filter(rng.normal(size=(37, 40, 43)), 1.0)
    b = ndi.gaussian_filter(a, 0.8) + 0.1 * ndi.gaussian_filter(rng.normal(size=a.shape), 1.0)
    zz, yy, xx = np.indices(a.shape)
    m = ((zz - 18) ** 2 / 200 + (yy - 20) ** 2 / 150 + (xx - 21) ** 2 / 300 < 1).astype(np.float32)
    return (make_volume(a, voxel_size=vs, name="em"), make_volume(b, voxel_size=vs, name="ref"),
            make_volume(m, voxel_size=vs, name="mask"))


@pytest.mark.parametrize("mode", ["exact", "locscale2", "fast"])
def test_chunk_invariance_and_laziness(mode):
    aniso = mode != "locscale2"
    em, ref, mask = _smooth_case((1.0, 1.05, 0.95) if aniso else 1.0)
    kw = dict(model_map=ref, mask=mask, resolution=3.0, window=8.0, mode=mode)
    if aniso:
        with pytest.warns(UserWarning, match=r"anisotropic voxels .* windows are \(8, 8, 10\) voxels"):
            whole = locscale(em, **kw)
    else:
        whole = locscale(em, **kw)
    assert isinstance(whole.data, np.ndarray)
    chunks = {"z": 10, "y": 13, "x": 16}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the same anisotropy warning, checked above
        lazy = locscale(em.chunk(chunks), **{**kw, "model_map": ref.chunk(chunks), "mask": mask.chunk(chunks)})
    assert isinstance(lazy.data, da.Array)
    assert lazy.data.chunks == em.chunk(chunks).data.chunks
    np.testing.assert_allclose(lazy.values, whole.values, rtol=1e-5, atol=1e-6)
    assert np.count_nonzero(whole.values) > 1000


def test_model_free_chunk_invariance():
    em, _, mask = _smooth_case()
    em = make_volume(em.values * 0.1 + 0.02 * np.random.default_rng(2).normal(size=em.shape), voxel_size=1.0)
    sparse = np.zeros(em.shape, np.float32)
    sparse[::2, ::2, :] = mask.values[::2, ::2, :]
    mask = make_volume(sparse, voxel_size=1.0)
    for mode in ("exact", "fast"):
        kw = dict(model_free=True, mask=mask, resolution=2.5, window=13.0, wilson_cutoff=6.0, mode=mode)
        whole = locscale(em, **kw).values
        lazy = locscale(em.chunk({"z": 10, "y": 13, "x": 16}), **{**kw, "mask": mask.chunk(12)}).values
        np.testing.assert_allclose(lazy, whole, rtol=1e-4, atol=1e-6)
        assert np.count_nonzero(whole) > 500


def test_default_mask_is_the_fdr_mask():
    from chunkem.ops.fdr import fdr_confidence

    rng = np.random.default_rng(5)
    a = rng.normal(size=(40, 40, 40))
    a[14:26, 14:26, 14:26] += 6 * ndi.gaussian_filter(rng.random((12, 12, 12)), 1) + 4
    v = make_volume(a, voxel_size=1.0)
    out = locscale(v, model_map=v, resolution=3.0, window=8.0, mode="fast")
    m = np.asarray(fdr_confidence(v, noise_box=KL.round_up_to_even(0.1 * 40)).mask.values) > 0.5
    assert m.sum() > 100
    assert np.array_equal(out.values != 0, m)


@pytest.mark.filterwarnings("ignore:anisotropic voxels")  # the windows-in-voxels warning
def test_bad_input():
    em, ref, mask = _smooth_case()
    with pytest.raises(ParameterError, match="exactly one reference"):
        locscale(em, resolution=3.0, mask=mask)
    with pytest.raises(ParameterError, match="exactly one reference"):
        locscale(em, model_map=ref, model_free=True, resolution=3.0, mask=mask)
    with pytest.raises(ParameterError, match="smaller than 5 voxels"):
        locscale(em, model_map=ref, mask=mask, resolution=3.0, window=4.0)
    with pytest.raises(DataValueError, match="empty"):
        locscale(em, model_map=ref, mask=make_volume(np.zeros(em.shape), voxel_size=(1.0, 1.05, 0.95)),
                 resolution=3.0)
    with pytest.raises(ParameterError, match="mode"):
        locscale(em, model_map=ref, mask=mask, resolution=3.0, mode="slow")
    with pytest.raises(ParameterError, match="Nyquist"):
        locscale(em, model_map=ref, mask=mask, resolution=1.0)
    with pytest.raises(GeometryError):
        locscale(em, model_map=make_volume(ref.values, voxel_size=1.3), mask=mask, resolution=3.0)
    model = build_model(20, seed=0)
    far = model.with_values(xyz=model.xyz + 1000.0)
    with pytest.raises(GeometryError, match="outside the map"):
        locscale(em, model=far, refine=False, mask=mask, resolution=3.0)


@pytest.mark.filterwarnings("ignore:anisotropic voxels")  # the windows-in-voxels warning
def test_two_worker_cluster_matches_single_process(two_worker_client):
    from chunkem.ops.fdr import fdr_confidence

    em, ref, mask = _smooth_case()
    kw = dict(model_map=ref, mask=mask, resolution=3.0, window=8.0)
    ref_exact = locscale(em, mode="exact", **kw).values
    ref_fast = locscale(em, mode="fast", **kw).values
    ref_fdr = fdr_confidence(em).confidence.values
    chunks = {"z": 20, "y": 21, "x": 22}  # 8 blocks: a real multi-process run, few tasks
    lk = dict(model_map=ref.chunk(chunks), mask=mask.chunk(chunks), resolution=3.0, window=8.0)
    ex = locscale(em.chunk(chunks), mode="exact", **lk).values
    fa = locscale(em.chunk(chunks), mode="fast", **lk).values
    fd = fdr_confidence(em.chunk(chunks)).confidence.values
    np.testing.assert_allclose(ex, ref_exact, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fa, ref_fast, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(fd, ref_fdr)
