"""`chunkem locscale` and `chunkem fdr`: outputs equal the API's, reports, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chunkem.cli.main import main
from chunkem.io import open_map, save
from chunkem.ops.fdr import fdr_confidence
from chunkem.ops.locscale import locscale
from chunkem.ops.modelmap import model_map
from chunkem.phantoms import make_phantom
from chunkem.volume import make_volume


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("locscale_cli")
    ph = make_phantom(n_residues=80, box=52, resolution=3.5, seed=2)
    full = make_volume((ph.half1.values + ph.half2.values) / 2, voxel_size=ph.half1.attrs["voxel_size"],
                       name="full")
    mm = model_map(ph.model, resolution=3.5, like=full)
    paths = {"map": d / "full.mrc", "mm": d / "mm.mrc", "mask": d / "mask.mrc", "sparse": d / "sparse.mrc",
             "dir": d}
    save(full, paths["map"])
    save(mm, paths["mm"])
    save(ph.mask, paths["mask"])
    sparse = np.zeros(full.shape, np.float32)  # every 4th voxel of the mask: keeps the exact run short
    sparse[::2, ::2, :] = np.asarray(ph.mask.values)[::2, ::2, :] > 0.5
    save(make_volume(sparse, voxel_size=full.attrs["voxel_size"]), paths["sparse"])
    return paths


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_locscale_cli_matches_api(files, mode):
    out = files["dir"] / f"ls_{mode}.mrc"
    mask = files["mask"] if mode == "fast" else files["sparse"]
    rc = main(["locscale", str(files["map"]), str(out), "--model-map", str(files["mm"]), "--mask",
               str(mask), "--resolution", "3.5", "--mode", mode, "--no-progress", "--cluster", "threads"])
    assert rc == 0
    api = locscale(open_map(files["map"]).compute(), model_map=open_map(files["mm"]).compute(),
                   mask=open_map(mask).compute(), resolution=3.5, mode=mode)
    np.testing.assert_allclose(open_map(out).values, api.values, rtol=1e-5, atol=1e-6)
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["mode"] == mode and rep["window_voxels"] == [24, 24, 24]
    assert rep["n_scaled_voxels"] == int(np.count_nonzero(api.values))
    assert out.with_suffix(".png").stat().st_size > 1000


def test_locscale_cli_model_free_and_errors(files, capsys):
    out = files["dir"] / "ls_free.mrc"
    rc = main(["locscale", str(files["map"]), str(out), "--model-free", "--mask", str(files["mask"]),
               "--resolution", "3.5", "--no-progress", "--cluster", "threads"])
    assert rc == 0 and np.count_nonzero(open_map(out).values) > 1000
    capsys.readouterr()
    rc = main(["locscale", str(files["map"]), str(files["dir"] / "x.mrc"), "--model-map", str(files["mm"]),
               "--mask", str(files["mask"]), "--resolution", "3.5", "--window", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "smaller than 5 voxels" in err and "Traceback" not in err
    empty = files["dir"] / "empty.mrc"
    save(make_volume(np.zeros((52, 52, 52)), voxel_size=1.1), empty)
    rc = main(["locscale", str(files["map"]), str(files["dir"] / "y.mrc"), "--model-map", str(files["mm"]),
               "--mask", str(empty), "--resolution", "3.5", "--no-progress"])
    assert rc == 2 and "empty" in capsys.readouterr().err


def test_fdr_cli_matches_api(files):
    out = files["dir"] / "conf.mrc"
    rc = main(["fdr", str(files["map"]), str(out), "--lowpass", "4", "--no-progress", "--cluster", "threads"])
    assert rc == 0
    api = fdr_confidence(open_map(files["map"]).compute(), lowpass=4.0)
    np.testing.assert_allclose(open_map(out).values, api.confidence.values, atol=1e-6)
    np.testing.assert_array_equal(open_map(files["dir"] / "conf_mask.mrc").values, api.mask.values)
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["n_selected"] == api.n_selected and rep["method"] == "BY"
    assert out.with_suffix(".png").stat().st_size > 1000
