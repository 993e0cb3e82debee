"""`chunkem demo` end to end: every stage runs and its numbers agree with the phantom's truth."""

from __future__ import annotations

import json

import pytest

from chunkem.cli.main import main
from chunkem.ops.demo import STAGES


def test_demo_runs_every_stage_and_recovers_the_phantom(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "demo finished" in printed
    report = json.loads((out / "demo_report.json").read_text())
    stages = report["stages"]
    assert set(stages) == {name for name, _ in STAGES}
    # the stored phantom reopens as zarr
    assert (out / "phantom" / "half1.zarr").is_dir()
    target = report["phantom"]["fsc_resolution"]
    # FSC: the unmasked half-map resolution is the one the phantom's noise was tuned for
    assert stages["fsc"]["resolution_unmasked_A"] == pytest.approx(target, abs=0.2)
    assert stages["fsc"]["bfactor_A2"] < 0  # RELION sign: a real map decays
    # model map: chunkem's renderer equals gemmi's
    assert stages["modelmap"]["cc_modelmap_vs_gemmi"] > 0.9999
    assert stages["modelmap"]["refine_cc_after"] >= stages["modelmap"]["refine_cc_before"]
    # local resolution within 0.5 Å RMSE of the known truth
    assert stages["locres"]["rmse_A"] < 0.5
    # local sharpening improves on the raw average
    assert stages["locscale"]["cc_model_based"] > stages["locscale"]["cc_input"]
    assert report["times_s"]["total"] < 120
