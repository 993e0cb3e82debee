"""``chunkem info`` and ``chunkem convert`` through ``chunkem.cli.main.main``."""

from __future__ import annotations

import json

import dask
import gemmi
import mrcfile
import numpy as np
import pytest
import zarr

from chunkem.cli.main import main
from chunkem.io import open_map, read_mrc_header
from tests.conftest import data_file

E3001 = "mrcfile_edge_cases/EMD-3001.map"


def _no_compute(*args, **kwargs):
    raise AssertionError("something was computed")


def test_info_text_reports_header_facts(capsys):
    assert main(["info", str(data_file(E3001)), "--no-progress"]) == 0
    out = capsys.readouterr().out
    for fact in (
        "73 25 43 (z, y, x)",
        "3 1 2 (MAPC/MAPR/MAPS",
        "along Z, X, Y",
        "0 -21 -12 (NX/NY/NZSTART)",
        "40 12 72 (MX/MY/MZ)",
        "17.93 4.71 33.03 Å, 90 94.326 90°",
        "space group  4",
        "EMD-3001",
        "NaN 0, Inf 0",
        "from NSTART",
    ):
        assert fact in out, fact


def test_info_json_matches_independent_readers(capsys, tmp_path):
    path = data_file(E3001)
    report = tmp_path / "r.json"
    assert main(["info", str(path), "--json", "--report", str(report), "--chunks", "16", "--no-progress"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert json.loads(report.read_text()) == facts
    m = gemmi.read_ccp4_map(str(path))
    m.setup(float("nan"), gemmi.MapSetup.ReorderOnly)
    nx, ny, nz = m.grid.nu, m.grid.nv, m.grid.nw
    assert facts["shape"] == [nz, ny, nx]
    uc = m.grid.unit_cell
    vs = [uc.c / m.header_i32(10), uc.b / m.header_i32(9), uc.a / m.header_i32(8)]
    np.testing.assert_allclose(facts["voxel_size"], vs, rtol=1e-6)
    start = [m.header_i32(7), m.header_i32(6), m.header_i32(5)]  # z, y, x after reordering
    np.testing.assert_allclose(facts["origin"], np.multiply(start, vs), rtol=1e-6)
    assert facts["axis_order"] == [3, 1, 2] and facts["space_group"] == 4 and facts["chunks"] == [16, 16, 16]
    with mrcfile.open(str(path)) as mm:
        d = np.asarray(mm.data, dtype=np.float64)
    st = facts["stats"]
    assert st["min"] == d.min() and st["max"] == d.max() and st["nan_count"] == 0
    np.testing.assert_allclose([st["mean"], st["std"]], [d.mean(), d.std()], rtol=1e-9)


def test_info_no_stats_reads_only_the_header(capsys):
    with dask.config.set(scheduler=_no_compute):
        assert main(["info", str(data_file("emd3488_haemoglobin/emd_3488.mrc")), "--no-stats", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert "stats" not in facts and facts["shape"] == [100, 100, 100]


def test_convert_mrc_zarr_mrc(tmp_path, capsys):
    src = data_file(E3001)
    z = tmp_path / "e.zarr"
    assert main(["convert", str(src), str(z), "--chunks", "32", "--no-progress"]) == 0
    assert zarr.open_array(str(z / "0"), mode="r").chunks == (32, 25, 32)
    rep = json.loads((tmp_path / "e.json").read_text())
    assert rep["verb"] == "convert" and rep["output"]["shape"] == [73, 25, 43]
    back = tmp_path / "back.mrc"
    assert main(["convert", str(z), str(back), "--no-progress"]) == 0
    a, b = src.read_bytes(), back.read_bytes()
    assert a[1024:] == b[1024:]  # extended header and data, byte for byte
    stats_bytes = set(range(76, 88)) | set(range(216, 220))
    assert {i for i in range(1024) if a[i] != b[i]} <= stats_bytes
    # standard axis order: gemmi sees the same world map
    zyx = tmp_path / "zyx.mrc"
    assert main(["convert", str(src), str(zyx), "--axis-order", "zyx", "--no-progress"]) == 0
    assert read_mrc_header(zyx).mapcrs == (1, 2, 3)
    g = []
    for p in (src, zyx):
        m = gemmi.read_ccp4_map(str(p))
        m.setup(float("nan"))
        g.append(np.array(m.grid))
    np.testing.assert_array_equal(g[0], g[1])
    capsys.readouterr()


def test_convert_levels(tmp_path, capsys):
    src = data_file("emd3488_haemoglobin/emd_3488.mrc")
    z = tmp_path / "p.zarr"
    assert main(["convert", str(src), str(z), "--levels", "3", "--no-progress"]) == 0
    ds = json.loads((z / "zarr.json").read_text())["attributes"]["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in ds] == ["0", "1", "2"]
    base = open_map(src).values.astype(np.float64)
    v0 = open_map(src).attrs["voxel_size"][0]
    for level in (1, 2):
        lv = open_map(z, level=level)
        f = 2**level
        n = 100 // f
        ref = base[: n * f, : n * f, : n * f].reshape(n, f, n, f, n, f).mean(axis=(1, 3, 5))
        np.testing.assert_allclose(lv.values, ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lv.attrs["voxel_size"], (f * v0,) * 3, rtol=1e-12)
        np.testing.assert_allclose(lv.attrs["origin"], ((f - 1) / 2 * v0,) * 3, rtol=1e-12)
    capsys.readouterr()


def test_convert_mode_and_int_input(tmp_path):
    src = data_file("microtubule_tomogram_crops/14pf_MT.mrc")
    assert main(["convert", str(src), str(tmp_path / "a.mrc"), "--no-progress"]) == 0
    assert read_mrc_header(tmp_path / "a.mrc").mode == 1
    assert main(["convert", str(src), str(tmp_path / "b.mrc"), "--mode", "2", "--no-progress"]) == 0
    assert read_mrc_header(tmp_path / "b.mrc").mode == 2
    np.testing.assert_array_equal(open_map(tmp_path / "b.mrc").values, open_map(src).values)


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["convert", "{src}", "{tmp}/o.mrc", "--levels", "2"], "needs a zarr output"),
        (["convert", "{src}", "{tmp}/o.zarr", "--mode", "1"], "apply to MRC output only"),
        (["convert", "{tmp}/nothere.mrc", "{tmp}/o.mrc"], "no such file"),
        (["convert", "{src}", "{tmp}/o.png"], "unknown output format"),
        (["convert", "{src}", "{src}"], "output would overwrite an input"),
        (["info", "{tmp}/nothere.map"], "no such file"),
        (["info", "{src}", "--voxel-size", "1", "2"], "1 or 3 values"),
    ],
)
def test_cli_errors_exit_2_without_traceback(tmp_path, capsys, argv, msg):
    src = data_file("mrcfile_edge_cases/EMD-3197.map")
    args = [a.format(src=src, tmp=tmp_path) for a in argv] + ["--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
    assert err.startswith(f"chunkem {argv[0]}: error: ")
    assert list(tmp_path.iterdir()) == []


def test_help_has_examples(capsys):
    for verb in ("info", "convert"):
        with pytest.raises(SystemExit) as ei:
            main([verb, "--help"])
        assert ei.value.code == 0
        out = capsys.readouterr().out
        assert "Examples" in out and f"chunkem {verb} " in out
