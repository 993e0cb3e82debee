"""CLI verbs locspiral, locbfactor, lococcupancy: outputs equal the library's, reports, errors."""

from __future__ import annotations

import json

import dask
import mrcfile
import numpy as np
import pytest

from chunkem.cli.main import main
from chunkem.ops import spiral as S


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from chunkem.io import save
    from chunkem.phantoms import make_phantom

    d = tmp_path_factory.mktemp("spiral_cli")
    ph = make_phantom(box=40, n_residues=60, voxel_size=1.5, resolution=4.5, b_range=(30, 90), seed=5)
    for key in ("half1", "half2", "mask"):
        save(getattr(ph, key), d / f"{key}.mrc")
    return d, ph


def _avg(ph):
    from chunkem.volume import like

    return like(ph.half1, (ph.half1.values + ph.half2.values) / 2)


def test_locbfactor_cli_writes_maps_report_and_plots(files):
    d, ph = files
    out = d / "lb.mrc"
    rc = main(["locbfactor", str(d / "half1.mrc"), str(d / "half2.mrc"), "--mask", str(d / "mask.mrc"),
               "--resolution-range", "15", "5", "--n-bands", "6", "-o", str(out), "--no-progress"])
    assert rc == 0
    with dask.config.set({"chunkem.progress": False}):
        ref = S.locbfactor(_avg(ph), mask=ph.mask, resolution_range=(15, 5), n_bands=6)
    with mrcfile.open(out) as m:
        b = m.data.copy()
        assert m.voxel_size.x == pytest.approx(1.5)
    np.testing.assert_allclose(b, ref.b_factor.values, rtol=1e-4, atol=1e-3)
    rep = json.loads((d / "lb.json").read_text())
    inside = ph.mask.values > 0.5
    assert rep["summary_in_mask"]["mean_b_A2"] == pytest.approx(float(ref.b_factor.values[inside].mean()), rel=1e-4)
    assert rep["global_guinier_masked"]["b_relion_A2"] < 0
    assert rep["global_guinier_masked"]["band_matched"]["b_relion_A2"] < 0
    assert set(rep["guinier_points"]) == {"core", "periphery", "background"}
    assert len(rep["guinier_points"]["core"]["s2"]) == 6
    assert "RELION" in rep["b_sign"]
    for name in ("lb_intercept.mrc", "lb_r2.mrc", "lb_guinier.png", "lb_slices.png"):
        assert (d / name).stat().st_size > 0


def test_locspiral_and_lococcupancy_cli(files):
    d, ph = files
    out = d / "sp.mrc"
    rc = main(["locspiral", str(d / "half1.mrc"), str(d / "half2.mrc"), "--mask", str(d / "mask.mrc"),
               "--resolution-range", "20", "5", "--n-bands", "4", "-o", str(out), "--no-progress"])
    assert rc == 0
    with dask.config.set({"chunkem.progress": False}):
        ref = S.locspiral(_avg(ph), mask=ph.mask, resolution_range=(20, 5), n_bands=4)
    with mrcfile.open(out) as m:
        np.testing.assert_allclose(m.data, ref.map.values, atol=1e-4 * float(ref.map.values.max()))
    rep = json.loads((d / "sp.json").read_text())
    assert len(rep["noise_quantile_per_band"]) == 4 and rep["bands"]["n_bands"] == 4
    assert (d / "sp_quality.mrc").exists() and (d / "sp_slices.png").exists()

    occ = d / "occ.mrc"
    rc = main(["lococcupancy", str(d / "half1.mrc"), "--mask", str(d / "mask.mrc"), "-o", str(occ),
               "--reference-mask", str(d / "mask.mrc"), "--no-progress"])
    assert rc == 0
    rep = json.loads((d / "occ.json").read_text())
    with mrcfile.open(occ) as m:
        o = m.data.copy()
    inside = ph.mask.values > 0.5
    assert rep["summary_in_mask"]["mean_in_mask"] == pytest.approx(float(o[inside].mean()), rel=1e-5)
    # maturity against its own mask = fraction of the mask with occupancy > 0.5
    assert rep["maturity"]["index"] == pytest.approx(float(np.mean(o[inside] > 0.5)), abs=1e-9)


def test_cli_automatic_mask_is_reported(files, capsys):
    d, _ = files
    out = d / "auto.mrc"
    rc = main(["lococcupancy", str(d / "half1.mrc"), str(d / "half2.mrc"), "-o", str(out), "--no-progress"])
    assert rc == 0
    assert "automatic mask" in capsys.readouterr().out
    rep = json.loads((d / "auto.json").read_text())
    assert rep["mask"]["source"] == "automatic" and rep["mask"]["threshold"] > rep["mask"]["noise_median"]


def test_cli_errors_are_one_line(files, capsys):
    d, _ = files
    rc = main(["locbfactor", str(d / "half1.mrc"), "--mask", str(d / "mask.mrc"), "--resolution-range", "4", "15",
               "-o", str(d / "bad.mrc"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "inverted" in err and "Traceback" not in err
    rc = main(["locspiral", str(d / "half1.mrc"), "--mask", str(d / "mask.mrc"), "-o", str(d / "half1.mrc")])
    assert rc == 2 and "overwrite" in capsys.readouterr().err
    assert not (d / "bad.mrc").exists()
