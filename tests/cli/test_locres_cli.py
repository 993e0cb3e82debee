"""``chunkem locres`` and ``chunkem local-filter``: outputs equal the library's, reports, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from chunkem.cli.main import main
from chunkem.io import open_map, save
from chunkem.ops.locres import local_filter, local_resolution
from chunkem.phantoms import make_phantom
from chunkem.volume import make_volume


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    ph = make_phantom(box=37, n_residues=40, voxel_size=1.4, resolution=4.5, seed=3, origin=(5.6, -2.8, 14.0))
    d = tmp_path_factory.mktemp("locres_cli")
    paths = {}
    for key in ("half1", "half2", "mask"):
        paths[key] = d / f"{key}.mrc"
        save(getattr(ph, key), paths[key], progress=False)
    return ph, d, paths


def test_locres_cli_matches_library(files, capsys):
    ph, d, p = files
    out = d / "res.mrc"
    rc = main(["locres", str(p["half1"]), str(p["half2"]), "--mask", str(p["mask"]), "--window", "14",
               "-o", str(out), "--no-progress"])
    assert rc == 0
    got = open_map(out)
    assert got.shape == ph.half1.shape
    assert got.attrs["voxel_size"] == pytest.approx(ph.half1.attrs["voxel_size"])
    assert got.attrs["origin"] == pytest.approx(ph.half1.attrs["origin"])
    ref = local_resolution(ph.half1, ph.half2, mask=ph.mask, window=14.0)
    np.testing.assert_allclose(got.values, ref.resolution.values, rtol=1e-4, atol=1e-4)
    rep = json.loads((d / "res.json").read_text())
    m = ph.mask.values > 0.5
    vals = ref.resolution.values[m]
    assert rep["statistics"]["median_A"] == pytest.approx(float(np.median(vals)), rel=1e-4)
    assert rep["statistics"]["q25_A"] == pytest.approx(float(np.percentile(vals, 25)), rel=1e-4)
    assert rep["statistics"]["q75_A"] == pytest.approx(float(np.percentile(vals, 75)), rel=1e-4)
    assert rep["statistics"]["n_voxels"] == int(m.sum())
    assert rep["method"] == "localfsc" and rep["mode"] == "fast" and rep["window_A"] == 14.0
    png = (d / "res.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert rep["statistics"]["at_best_fraction"] == pytest.approx(np.mean(vals <= ref.best * (1 + 1e-5)), abs=1e-6)
    assert "note:" not in capsys.readouterr().out  # 16 % at the fine limit: no note
    # a fine limit of 4 Å puts 68 % of the voxels there: noted on the console, counted in the JSON
    assert main(["locres", str(p["half1"]), str(p["half2"]), "--mask", str(p["mask"]), "--window", "14",
                 "--best", "4", "-o", str(d / "capped.mrc"), "--no-progress"]) == 0
    assert "note: 68 % of the mask voxels are at the fine limit 4.00 Å" in capsys.readouterr().out
    assert json.loads((d / "capped.json").read_text())["statistics"]["at_best_fraction"] > 0.6


def test_locres_cli_several_cutoffs(files):
    ph, d, p = files
    out = d / "multi.mrc"
    rc = main(["locres", str(p["half1"]), str(p["half2"]), "--mask", str(p["mask"]), "--window", "14",
               "--cutoff", "0.143,0.5", "-o", str(out), "--no-progress"])
    assert rc == 0
    ref = local_resolution(ph.half1, ph.half2, mask=ph.mask, window=14.0, cutoff=(0.143, 0.5))
    np.testing.assert_allclose(open_map(out).values, ref.resolution.values, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(open_map(d / "multi_fsc0.5.mrc").values, ref.extra[0.5].values, rtol=1e-4, atol=1e-4)
    rep = json.loads((d / "multi.json").read_text())
    assert rep["cutoffs"] == [0.143, 0.5]
    other = rep["other_cutoffs"]["0.5"]
    assert other["output"].endswith("multi_fsc0.5.mrc")
    assert other["statistics"]["median_A"] == pytest.approx(ref.at_cutoff(0.5).median, rel=1e-4)
    assert other["statistics"]["median_A"] > rep["statistics"]["median_A"]
    v = ref.at_cutoff(0.5).values_in_mask()
    assert other["statistics"]["at_worst_fraction"] == pytest.approx(np.mean(v >= 14.0 * (1 - 1e-5)), abs=1e-6)
    assert (d / "multi_fsc0.5.png").read_bytes()[:4] == b"\x89PNG"


def test_locres_cli_monores_zarr(files):
    ph, d, p = files
    out = d / "mono.zarr"
    rc = main(["locres", str(p["half1"]), str(p["half2"]), "--mask", str(p["mask"]), "--method", "monores",
               "--max-resolution", "9", "--resolution-step", "0.5", "-o", str(out), "--no-progress"])
    assert rc == 0
    ref = local_resolution(ph.half1, ph.half2, mask=ph.mask, method="monores", max_resolution=9.0,
                           resolution_step=0.5)
    np.testing.assert_allclose(open_map(out).values, ref.resolution.values, rtol=1e-4, atol=1e-4)
    rep = json.loads((d / "mono.json").read_text())
    assert rep["method"] == "monores" and rep["statistics"]["median_A"] == pytest.approx(ref.median, rel=1e-4)


def test_local_filter_cli(files):
    ph, d, p = files
    loc = np.where(ph.mask.values > 0.5, 5.0, 9.0).astype(np.float32)
    lp = d / "loc.mrc"
    save(make_volume(loc, voxel_size=1.4, origin=ph.half1.attrs["origin"]), lp, progress=False)
    out = d / "lf.mrc"
    rc = main(["local-filter", str(p["half1"]), "--locres", str(lp), "--bfactor", "-30", "--n-bands", "16",
               "-o", str(out), "--no-progress"])
    assert rc == 0
    ref = local_filter(ph.half1, locres=make_volume(loc, voxel_size=1.4, origin=ph.half1.attrs["origin"]),
                       n_bands=16, bfactor=-30.0)
    np.testing.assert_allclose(open_map(out).values, ref.values, atol=1e-5 * float(np.abs(ref.values).max()))
    rep = json.loads((d / "lf.json").read_text())
    assert rep["bfactor_A2"] == -30.0 and "RELION" in rep["bfactor_sign"]


def test_cli_errors(files, capsys, tmp_path):
    ph, d, p = files
    rc = main(["locres", str(p["half1"]), str(p["half2"]), "--window", "2", "-o", str(tmp_path / "x.mrc")])
    assert rc == 2
    assert "at least 3 voxels" in capsys.readouterr().err
    rc = main(["locres", str(p["half1"]), "-o", str(tmp_path / "x.mrc")])
    assert rc == 2
    assert "half2 is missing" in capsys.readouterr().err
    other = tmp_path / "other.mrc"
    save(make_volume(np.zeros((36, 37, 37)), voxel_size=1.4), other, progress=False)
    rc = main(["locres", str(p["half1"]), str(other), "--window", "14", "-o", str(tmp_path / "x.mrc")])
    assert rc == 2
    assert "shape" in capsys.readouterr().err
    assert not (tmp_path / "x.mrc").exists()
    rc = main(["locres", str(p["half1"]), str(p["half2"]), "-o", str(p["half1"])])
    assert rc == 2
    assert "overwrite an input" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["locres", str(p["half1"]), str(p["half2"]), "--cutoff", "0.143,x", "-o", str(tmp_path / "y.mrc")])
    assert "comma-separated" in capsys.readouterr().err
    rc = main(["locres", str(p["half1"]), str(p["half2"]), "--window", "14", "--cutoff", "0.5,0.5",
               "-o", str(tmp_path / "y.mrc")])
    assert rc == 2
    assert "twice" in capsys.readouterr().err
    assert not (tmp_path / "y.mrc").exists()


def test_locres_help_states_the_face_threshold_in_use():
    """--faces' help names the threshold (the CLI imports no op at parse time, so the number is written there):
    it must be the one local_resolution uses."""
    import argparse

    from chunkem.cli.locres import add_args
    from chunkem.ops.locres import FACE_SIGNAL

    p = argparse.ArgumentParser()
    add_args(p)
    assert f"correlating above {FACE_SIGNAL:g} there" in " ".join(p.format_help().split())
