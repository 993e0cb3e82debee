"""CLI verbs fsc, postprocess and sharpen: outputs beside the map, same numbers as the API, clean errors."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest

from chunkem.cli.main import main

NPC = "npc_sta_halfmaps"


@pytest.fixture(scope="module")
def npc_files(shared_data):
    d = shared_data / NPC
    return d / "npc_ref_A_px_1_inv.mrc", d / "npc_ref_B_px_1_inv.mrc", d / "sphere_r10_g2_bx32.mrc"


def test_fsc_cli_writes_json_csv_png_matching_the_api(npc_files, tmp_path, capsys):
    from chunkem.io import open_map
    from chunkem.ops.fsc import fsc

    h1, h2, m = npc_files
    prefix = tmp_path / "out" / "npc"
    rc = main(["fsc", str(h1), str(h2), "--mask", str(m), "-o", str(prefix), "--no-progress", "--force-mask"])
    assert rc == 0
    report = json.loads(prefix.with_suffix(".json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        api = fsc(open_map(h1), open_map(h2), mask=open_map(m), force_mask=True)
    assert report["resolution_0143_A"] == pytest.approx(api.resolution_0143)
    assert report["randomize_at_shell"] == api.randomize_at
    rows = list(csv.DictReader(prefix.with_suffix(".csv").open()))
    np.testing.assert_allclose([float(r["fsc_masked"]) for r in rows], api.fsc_masked, atol=1e-5)
    assert prefix.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "resolution (FSC 0.143)" in capsys.readouterr().out


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    from chunkem.io import save
    from chunkem.phantoms import make_phantom

    ph = make_phantom(box=56, n_residues=80, resolution=3.5, seed=3)
    d = tmp_path_factory.mktemp("ph")
    paths = {}
    for k in ("half1", "half2", "mask", "truth"):
        paths[k] = save(getattr(ph, k), d / f"{k}.mrc")
    return ph, paths


def test_postprocess_cli_outputs(phantom_files, tmp_path):
    from chunkem.io import open_map
    from chunkem.ops.postprocess import postprocess

    ph, p = phantom_files
    out = tmp_path / "post.mrc"
    rc = main(["postprocess", str(p["half1"]), str(p["half2"]), "--mask", str(p["mask"]), "-o", str(out),
               "--no-progress"])
    assert rc == 0
    for name in ("post.mrc", "post_masked.mrc", "post.json", "post_fsc.csv", "post_fsc.png", "post_guinier.png"):
        assert (tmp_path / name).exists(), name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        api = postprocess(open_map(p["half1"]), open_map(p["half2"]), mask=open_map(p["mask"]))
    report = json.loads((tmp_path / "post.json").read_text())
    assert report["bfactor_relion_A2"] == pytest.approx(api.bfactor, abs=1e-3)
    written = open_map(out).values
    assert np.abs(written - api.map.values).max() < 1e-5 * np.abs(written).max()
    # forced B is used as given
    rc = main(["postprocess", str(p["half1"]), str(p["half2"]), "--mask", str(p["mask"]), "-o",
               str(tmp_path / "forced.mrc"), "--bfactor", "-25", "--lowpass", "0", "--no-progress"])
    assert rc == 0
    forced = json.loads((tmp_path / "forced.json").read_text())
    assert forced["bfactor_relion_A2"] == -25.0 and forced["lowpass_A"] is None


def test_sharpen_cli_fixed_and_auto(phantom_files, tmp_path):
    from chunkem.io import open_map
    from chunkem.ops.sharpen import sharpen

    ph, p = phantom_files
    out = tmp_path / "blur.mrc"
    assert main(["sharpen", str(p["truth"]), str(out), "--bfactor", "60", "--no-progress"]) == 0
    want = sharpen(open_map(p["truth"]), bfactor=60.0).values
    assert np.abs(open_map(out).values - want).max() < 1e-5 * np.abs(want).max()
    assert json.loads((tmp_path / "blur.json").read_text())["bfactor_relion_A2"] == 60.0
    auto = tmp_path / "auto.mrc"
    assert main(["sharpen", str(out), str(auto), "--auto", "--resolution", "3.0", "--solvent-fraction", "0.8",
                 "--no-progress"]) == 0
    rep = json.loads((tmp_path / "auto.json").read_text())
    assert rep["b_sharpen_A2"] == pytest.approx(rep["original_b_iso_A2"] - rep["b_iso_A2"])
    assert len(rep["table"]["score"]) == 21
    assert (tmp_path / "auto_scores.png").exists()


def test_cli_errors_are_one_line(npc_files, phantom_files, tmp_path, capsys):
    h1, h2, m = npc_files
    ph, p = phantom_files
    rc = main(["fsc", str(h1), str(p["half1"]), "-o", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "chunkem fsc: error:" in err and "shape" in err and "Traceback" not in err
    rc = main(["sharpen", str(p["truth"]), str(tmp_path / "a.mrc"), "--auto", "--no-progress"])
    assert rc == 2 and "--resolution" in capsys.readouterr().err
    assert not (tmp_path / "a.mrc").exists()


def test_help_states_the_b_sign(capsys):
    for verb in ("sharpen", "postprocess"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "exp(-B s²/4)" in text and "sharpens" in text


def test_fsc_cli_auto_cluster_is_threads_only_when_the_working_set_fits(monkeypatch):
    import argparse

    import dask
    import psutil

    from chunkem.cli import fsc as cli_fsc

    class _Mem:
        available = 10 * 2**30

    monkeypatch.setattr(psutil, "virtual_memory", lambda: _Mem())
    auto = argparse.Namespace(scheduler=None, cluster=None)
    # 512³: 2 maps (1 GiB) + 2 half spectra (~1 GiB) < 2.5 GiB = a quarter of 10 GiB
    assert cli_fsc._fits_in_threads(auto, (512, 512, 512))
    assert not cli_fsc._fits_in_threads(auto, (1024, 1024, 1024))  # ~16 GiB: keep auto (spilling workers)
    assert not cli_fsc._fits_in_threads(argparse.Namespace(scheduler=None, cluster="local"), (64, 64, 64))
    assert not cli_fsc._fits_in_threads(argparse.Namespace(scheduler="tcp://x:1", cluster=None), (64, 64, 64))
    with dask.config.set({"chunkem.cluster": "slurm"}):
        assert not cli_fsc._fits_in_threads(auto, (64, 64, 64))
