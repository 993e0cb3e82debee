"""CLI verb render-scene end to end: CSV and STAR particle lists, zarr output, JSON report, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import starfile

from chunkem.cli.main import main
from chunkem.io import open_map, save
from chunkem.io.model import open_model, save_model
from chunkem.ops.scene import Particles, render_scene
from chunkem.phantoms import build_model
from chunkem.volume import make_volume

SHAPE = (30, 34, 38)
VS = 1.2
POS = np.array([[15.0, 20.0, 17.0], [30.0, 22.0, 19.0], [21.0, 26.0, 12.0]])
ANG = np.array([[0.0, 0.0, 0.0], [45.0, 90.0, -30.0], [170.0, 33.0, 12.0]])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("scenecli")
    m = build_model(6, seed=2).with_values(b_iso=30.0)
    save_model(m, d / "m.pdb")
    m = open_model(d / "m.pdb")  # as the CLI reads it (PDB rounds coordinates)
    rows = "".join(",".join(repr(float(v)) for v in (*p, *a)) + "\n" for p, a in zip(POS, ANG))
    (d / "p.csv").write_text("x,y,z,rot,tilt,psi\n" + rows)
    df = pd.DataFrame({
        "rlnCoordinateX": POS[:, 0] / 2.0, "rlnCoordinateY": POS[:, 1] / 2.0, "rlnCoordinateZ": POS[:, 2] / 2.0,
        "rlnAngleRot": ANG[:, 0], "rlnAngleTilt": ANG[:, 1], "rlnAnglePsi": ANG[:, 2],
    })
    starfile.write({"particles": df}, d / "p.star", overwrite=True)
    save(make_volume(np.zeros(SHAPE, np.float32), voxel_size=VS), d / "like.mrc")
    return d, m


def test_render_scene_cli_csv_star_and_like(files):
    d, m = files
    shape = [str(n) for n in SHAPE]
    assert main(["render-scene", str(d / "m.pdb"), str(d / "p.csv"), "--shape", *shape, "--voxel-size", str(VS),
                 "-d", "3.5", "-o", str(d / "csv.zarr"), "--chunks", "16", "--no-progress"]) == 0
    got = open_map(d / "csv.zarr")
    ref = render_scene(m, Particles.from_euler(POS, *ANG.T), shape=SHAPE, voxel_size=VS, resolution=3.5).values
    assert got.shape == SHAPE and got.attrs["voxel_size"] == pytest.approx((VS,) * 3)
    np.testing.assert_allclose(got.values, ref, rtol=0, atol=1e-6 * np.abs(ref).max())
    rep = json.loads((d / "csv.json").read_text())
    assert rep["verb"] == "render-scene" and rep["n_copies"] == 3 and rep["n_copies_rendered"] == 3
    assert rep["method"] == "analytic" and rep["resolution"] == 3.5
    # STAR in pixels of 2 Å, rendered on the grid of a map: the same scene
    assert main(["render-scene", str(d / "m.pdb"), str(d / "p.star"), "--like", str(d / "like.mrc"),
                 "--pixel-size", "2.0", "-d", "3.5", "-o", str(d / "star.mrc"), "--no-progress"]) == 0
    np.testing.assert_allclose(open_map(d / "star.mrc").values, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_render_scene_cli_errors(files, tmp_path, capsys):
    d, _ = files
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    rc = main(["render-scene", str(d / "m.pdb"), str(bad), "--shape", "20", "--voxel-size", "1",
               "-o", str(tmp_path / "o.zarr"), "--no-progress"])
    assert rc != 0 and "lacks column" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()
    far = tmp_path / "far.csv"
    far.write_text("x,y,z\n900,900,900\n")
    rc = main(["render-scene", str(d / "m.pdb"), str(far), "--shape", "20", "--voxel-size", "1",
               "-o", str(tmp_path / "o.zarr"), "--no-progress"])
    assert rc != 0 and "outside the scene box" in capsys.readouterr().err
    assert not (tmp_path / "o.zarr").exists()
    rc = main(["render-scene", str(d / "m.pdb"), str(d / "p.star"), "--shape", "20",
               "-o", str(tmp_path / "o.zarr"), "--no-progress"])
    assert rc != 0 and "--voxel-size" in capsys.readouterr().err
