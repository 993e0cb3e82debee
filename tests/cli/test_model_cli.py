"""CLI verbs model-map, map-model and refine-adp, end to end on files."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest

from chunkem.cli.main import main
from chunkem.io import open_map, save
from chunkem.io.model import open_model, save_model
from chunkem.ops.metrics import map_model_metrics
from chunkem.ops.modelmap import model_grid, model_map
from chunkem.phantoms import build_model
from chunkem.volume import make_volume


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("modelcli")
    m = build_model(10, seed=6)
    res = np.unique(m.residue_index, return_inverse=True)[1].ravel()
    truth = m.with_values(b_iso=np.linspace(20, 110, res.max() + 1)[res])
    shape, vs, org = model_grid(truth, voxel_size=0.9, padding=7.0)
    grid = make_volume(np.zeros(shape, np.float32), voxel_size=vs, origin=(org[0] + 0.3, org[1] - 0.2, org[2]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mm = model_map(truth, like=grid, resolution=2.7)
    rng = np.random.default_rng(0)
    noisy = make_volume(mm.values + rng.normal(0, 0.03 * mm.values.std(), mm.shape), voxel_size=vs,
                        origin=grid.attrs["origin"])
    save(noisy, d / "map.mrc")
    save_model(truth, d / "truth.pdb")
    save_model(m.with_values(b_iso=60.0), d / "start.pdb")
    return d, truth


def test_model_map_cli_equals_api(files):
    d, truth = files
    rc = main(["model-map", str(d / "truth.pdb"), "--resolution", "2.7", "--like", str(d / "map.mrc"),
               "-o", str(d / "mm.mrc"), "--no-progress"])
    assert rc == 0
    got = open_map(d / "mm.mrc")
    like = open_map(d / "map.mrc")
    assert got.attrs["origin"] == pytest.approx(like.attrs["origin"], abs=1e-3)
    ref = model_map(open_model(d / "truth.pdb"), like=like.compute(), resolution=2.7).values
    np.testing.assert_allclose(got.values, ref, atol=1e-6 * ref.max())
    rep = json.loads((d / "mm.json").read_text())
    assert rep["method"] == "spectral" and rep["resolution"] == 2.7 and rep["n_atoms"] == len(truth)
    # a new box around the model
    assert main(["model-map", str(d / "truth.pdb"), "-d", "3.0", "--voxel-size", "1.2", "--padding", "4",
                 "--method", "analytic", "-o", str(d / "box.zarr"), "--no-progress"]) == 0
    box = open_map(d / "box.zarr")
    assert box.attrs["voxel_size"] == pytest.approx((1.2, 1.2, 1.2))
    assert float(box.max()) > 0


def test_model_map_cli_errors(files, capsys):
    d, truth = files
    far = truth.with_values(xyz=truth.xyz + 900.0)
    save_model(far, d / "far.pdb")
    rc = main(["model-map", str(d / "far.pdb"), "-d", "3", "--like", str(d / "map.mrc"), "-o", str(d / "x.mrc")])
    assert rc == 2
    assert "model outside the map" in capsys.readouterr().err
    assert not (d / "x.mrc").exists()


def test_map_model_cli_reports(files):
    d, truth = files
    rc = main(["map-model", str(d / "map.mrc"), str(d / "truth.pdb"), "-d", "2.7", "-o", str(d / "fit"),
               "--no-progress"])
    assert rc == 0
    rep = json.loads((d / "fit.json").read_text())
    api = map_model_metrics(open_map(d / "map.mrc"), open_model(d / "truth.pdb"), resolution=2.7)
    for k in ("cc_mask", "cc_box", "cc_volume", "cc_peaks"):
        assert rep[k] == pytest.approx(getattr(api, k), abs=1e-9)
    assert rep["cc_mask"] > 0.95  # map = model map + 3 % noise
    rows = list(csv.DictReader((d / "fit_residues.csv").open()))
    assert len(rows) == truth.n_residues
    assert float(rows[0]["cc"]) == pytest.approx(api.residues["cc"][0], abs=1e-4)
    assert (d / "fit.png").stat().st_size > 1000
    assert rep["fsc"]["d_fsc_05"] > 0


def test_refine_adp_cli(files):
    d, truth = files
    out = d / "refined.cif"
    rc = main(["refine-adp", str(d / "start.pdb"), str(d / "map.mrc"), "-d", "2.7", "--group", "residue",
               "--max-iter", "40", "-o", str(out), "--no-progress"])
    assert rc == 0
    rep = json.loads((d / "refined.json").read_text())
    assert rep["cc_after"] > rep["cc_before"]
    assert rep["cc_mask_after"] > rep["cc_mask_before"]
    refined = open_model(out)
    assert np.corrcoef(refined.b_iso, truth.b_iso)[0, 1] > 0.9
