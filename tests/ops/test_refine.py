"""Real-space B / occupancy refinement: gradients, recovery of known truth, real data, bad input."""

from __future__ import annotations

import warnings

import gemmi
import numpy as np
import pytest

from chunkem.errors import GeometryError, ParameterError
from chunkem.io import open_map
from chunkem.io.model import model_from_structure
from chunkem.ops.metrics import map_model_metrics
from chunkem.ops.modelmap import atom_set, model_map
from chunkem.ops.refine import adp_problem, refine_adp
from chunkem.phantoms import build_model
from chunkem.volume import make_volume

from ..conftest import data_file


def _phantom(n_res=20, d=2.6, seed=3, per_residue_b=False, noise=0.02):
    m = build_model(n_res, seed=seed)
    rng = np.random.default_rng(seed)
    res = np.unique(m.residue_index, return_inverse=True)[1].ravel()
    b = rng.uniform(10, 150, res.max() + 1)[res] if per_residue_b else rng.uniform(10, 150, len(m))
    occ = rng.uniform(0.3, 1.0, res.max() + 1)[res]
    truth = m.with_values(b_iso=b, occupancy=occ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mm = model_map(truth, resolution=d, voxel_size=0.9, padding=7.0).compute()
    obs = mm.values + rng.normal(0, noise * mm.values.std(), mm.shape)
    vol = make_volume(obs, voxel_size=mm.attrs["voxel_size"], origin=mm.attrs["origin"])
    return m, truth, vol


@pytest.mark.parametrize("target", ["cc", "ls"])
def test_tiled_gradient_matches_finite_differences(target):
    """Gradients summed over tiles (tiles smaller than an atom's reach) vs central differences."""
    m, truth, vol = _phantom(n_res=5, d=3.0, seed=1)
    prob = adp_problem(m, vol, resolution=3.0, tile=9, threads=2)
    assert len(prob.tiles) > 8
    at = atom_set(m.with_values(b_iso=np.linspace(20, 80, len(m)), occupancy=0.8))
    f0, cc, gb, go = prob.value_and_grad(at, target, 1.0, 0.0, 50.0)
    rng = np.random.default_rng(0)
    for i in rng.choice(len(at), 6, replace=False):
        for what, h in (("b", 1e-3), ("occ", 1e-5)):
            ap, am = at.take(np.arange(len(at))), at.take(np.arange(len(at)))
            if what == "b":
                ap.b_iso[i] += h
                am.b_iso[i] -= h
                ana = gb[i]
            else:
                ap.occ[i] += h
                am.occ[i] -= h
                ana = go[i]
            fd = (prob.value_and_grad(ap, target, 1.0, 0.0, 50.0)[0]
                  - prob.value_and_grad(am, target, 1.0, 0.0, 50.0)[0]) / (2 * h)
            assert ana == pytest.approx(fd, rel=1e-4, abs=1e-9 * max(1.0, abs(f0)))


def test_refinement_recovers_per_atom_b_and_residue_occupancy():
    m, truth, vol = _phantom()
    start = m.with_values(b_iso=60.0, occupancy=0.7)
    r = refine_adp(start, vol, resolution=2.6, refine_occupancy=True, scale=1.0, offset=0.0,
                   restraint_weight=0.0, max_iter=120)
    assert r.target == "ls"
    assert r.cc_after > r.cc_before + 0.05
    assert np.corrcoef(r.model.b_iso, truth.b_iso)[0, 1] >= 0.9
    assert np.mean(np.abs(r.model.occupancy - truth.occupancy)) <= 0.1
    assert r.to_dict()["b_convention"].startswith("decay")


def test_residue_grouped_b_with_correlation_target():
    m, truth, vol = _phantom(n_res=16, seed=5, per_residue_b=True)
    start = m.with_values(b_iso=60.0, occupancy=truth.occupancy)
    r = refine_adp(start, vol, resolution=2.6, group="residue", max_iter=60)
    assert r.target == "cc" and r.n_b_groups == m.n_residues
    res = np.unique(m.residue_index, return_inverse=True)[1].ravel()
    for g in range(r.n_b_groups):  # one B per residue
        assert np.ptp(r.model.b_iso[res == g]) == 0
    assert np.corrcoef(r.model.b_iso, truth.b_iso)[0, 1] >= 0.9
    assert r.cc_after > r.cc_before


def test_real_map_cc_mask_improves():
    """emd_3488 + a 5me2 slice at 3.2 Å: B refinement raises CC_mask (independent metric, spectral model map)."""
    st = gemmi.read_structure(str(data_file("emd3488_haemoglobin/5me2.pdb")))
    for name in [ch.name for ch in st[0] if ch.name != "A"]:
        st[0].remove_chain(name)
    del st[0]["A"][20:]
    m = model_from_structure(st)
    full = open_map(data_file("emd3488_haemoglobin/emd_3488.mrc"))
    # the map around the slice (15 Å margin), as its own Volume with the right origin
    h = np.asarray(full.attrs["voxel_size"])
    lo = np.maximum(np.floor((m.xyz.min(0)[::-1] - 15.0) / h).astype(int), 0)
    hi = np.minimum(np.ceil((m.xyz.max(0)[::-1] + 15.0) / h).astype(int), full.shape)
    v = make_volume(full.values[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], voxel_size=h, origin=lo * h)
    before = map_model_metrics(v, m, resolution=3.2, per_residue=False, fsc=False).cc_mask
    r = refine_adp(m, v, resolution=3.2, max_iter=15)
    after = map_model_metrics(v, r.model, resolution=3.2, per_residue=False, fsc=False).cc_mask
    assert r.cc_after > r.cc_before
    assert after > before + 0.02


def test_bad_input():
    m, truth, vol = _phantom(n_res=5, seed=2)
    far = m.with_values(xyz=m.xyz + 500.0)
    with pytest.raises(GeometryError, match="outside"):
        refine_adp(far, vol, resolution=3.0)
    with pytest.raises(ParameterError, match="zero occupancy"):
        refine_adp(m.with_values(occupancy=0.0), vol, resolution=3.0)
    with pytest.raises(ParameterError):
        refine_adp(m, vol, resolution=3.0, group="chain")
    with pytest.raises(ParameterError):
        refine_adp(m, vol, resolution=3.0, bounds={"b": (50.0, 10.0)})
