"""A corpus of bad inputs built from a real map: each gives one clear error naming the
file and the problem (API and CLI, exit code 2, no traceback) and leaves no output."""

from __future__ import annotations

import bz2
import gzip
import os
import shutil
import warnings

import numpy as np
import pytest

from chunkem.cli.main import main
from chunkem.errors import DataValueError, InputFileError, MapFormatError, OutputError, ParameterError
from chunkem.io import map_stats, open_map, save
from chunkem.volume import validate_volume
from tests.conftest import data_file

SRC = "mrcfile_edge_cases/EMD-3197.map"  # 20³ float32, real EMDB header


def _patch(raw: bytes, offset: int, value, dtype="<i4") -> bytes:
    b = bytearray(raw)
    enc = np.array(value, dtype=dtype).tobytes()
    b[offset : offset + len(enc)] = enc
    return bytes(b)


def _corpus(tmp_path):
    """name -> (path, expected error class, message fragment)."""
    good = data_file(SRC).read_bytes()
    d = tmp_path / "bad"
    d.mkdir()
    cases = {}

    def put(name, payload, err, msg):
        p = d / name
        p.write_bytes(payload)
        cases[name] = (p, err, msg)

    cases["missing.mrc"] = (d / "missing.mrc", InputFileError, "no such file")
    put("empty.mrc", b"", MapFormatError, "empty file")
    put("short.mrc", good[:500], MapFormatError, "too short to be an MRC file")
    put("truncated.mrc", good[:20000], MapFormatError, "truncated MRC file")
    put("badmode.mrc", _patch(good, 12, 7), MapFormatError, "bad MRC mode 7")
    put("complex.mrc", _patch(good, 12, 4), MapFormatError, "mode 4 (complex float32) is not supported")
    put("zerodim.mrc", _patch(good, 0, 0), MapFormatError, "dimensions NX, NY, NZ = (0, 20, 20)")
    put("negdim.mrc", _patch(good, 4, -20), MapFormatError, "must be positive")
    put("badaxes.mrc", _patch(good, 64, [1, 1, 3]), MapFormatError, "MAPC/MAPR/MAPS = (1, 1, 3)")
    put("zerocell.mrc", _patch(good, 40, [0.0, 0.0, 0.0], "<f4"), MapFormatError, "pass voxel_size=")
    put("nancell.mrc", _patch(good, 40, [np.nan, 228.0, 228.0], "<f4"), MapFormatError, "no usable voxel size")
    put("badorigin.mrc", _patch(good, 196, [np.inf, 0.0, 0.0], "<f4"), MapFormatError, "ORIGIN")
    put("negext.mrc", _patch(good, 92, -8), MapFormatError, "NSYMBT = -8")
    put("garbage.mrc", np.random.default_rng(0).bytes(40000), MapFormatError, "bad MRC mode")
    put("cut.map.gz", gzip.compress(good)[:5000], MapFormatError, "corrupt or truncated gzip")
    put("cut.map.bz2", bz2.compress(good)[:5000], MapFormatError, "corrupt or truncated bzip2")
    put("truncated_inside.map.gz", gzip.compress(good[:30000]), MapFormatError, "truncated MRC file")
    put("notes.txt", b"just some text\n", InputFileError, "unknown map format")
    (d / "folder.mrc").mkdir()
    cases["folder.mrc"] = (d / "folder.mrc", InputFileError, "is a folder")
    (d / "empty.zarr").mkdir()
    cases["empty.zarr"] = (d / "empty.zarr", MapFormatError, "not a readable zarr store")
    return cases


CASES = [
    "missing.mrc", "empty.mrc", "short.mrc", "truncated.mrc", "badmode.mrc", "complex.mrc", "zerodim.mrc",
    "negdim.mrc", "badaxes.mrc", "zerocell.mrc", "nancell.mrc", "badorigin.mrc", "negext.mrc", "garbage.mrc",
    "cut.map.gz", "cut.map.bz2", "truncated_inside.map.gz", "notes.txt", "folder.mrc", "empty.zarr",
]


@pytest.fixture
def corpus(tmp_path):
    return _corpus(tmp_path)


@pytest.mark.parametrize("name", CASES)
def test_bad_input_clear_error(corpus, name, tmp_path, capsys):
    path, err, msg = corpus[name]
    with pytest.raises(err) as ei:
        open_map(path)
    text = str(ei.value)
    assert msg in text
    assert str(path) in text  # names the file
    # CLI: one line, exit code 2, no traceback
    assert main(["info", str(path), "--no-progress"]) == 2
    cap = capsys.readouterr()
    assert cap.err.startswith("chunkem info: error: ") and msg in cap.err
    assert "Traceback" not in cap.err and cap.err.count("\n") == 1
    # convert leaves no output behind
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for out in ("o.mrc", "o.zarr"):
        assert main(["convert", str(path), str(out_dir / out), "--no-progress"]) == 2
    assert list(out_dir.iterdir()) == []
    capsys.readouterr()


def test_corpus_is_complete(corpus):
    assert sorted(corpus) == sorted(CASES)


def test_zero_cell_opens_with_voxel_size_override(corpus):
    path = corpus["zerocell.mrc"][0]
    vol = open_map(path, voxel_size=11.4)
    assert vol.attrs["voxel_size"] == (11.4, 11.4, 11.4)
    assert vol.attrs["origin"] == (0.0, 0.0, -2 * 11.4)  # NSTART (-2, 0, 0) with the given voxel size
    np.testing.assert_array_equal(vol.values, open_map(data_file(SRC)).values)
    with pytest.raises(ParameterError, match="voxel_size must be positive"):
        open_map(path, voxel_size=-1.0)


def test_trailing_bytes_warn_but_open(tmp_path):
    p = tmp_path / "long.mrc"
    p.write_bytes(data_file(SRC).read_bytes() + b"\0" * 100)
    with pytest.warns(UserWarning, match="100 bytes after the map data"):
        vol = open_map(p)
    np.testing.assert_array_equal(vol.values, open_map(data_file(SRC)).values)


def _with_nans(tmp_path):
    raw = bytearray(data_file(SRC).read_bytes())
    data = np.frombuffer(raw, dtype="<f4", offset=1024).copy()
    data[[5, 500, 7000]] = np.nan
    data[100] = np.inf
    p = tmp_path / "nan.mrc"
    p.write_bytes(bytes(raw[:1024]) + data.tobytes())
    return p, data


def test_nan_policy(tmp_path, capsys):
    p, data = _with_nans(tmp_path)
    vol = open_map(p)  # lazy: nothing checked
    with pytest.raises(DataValueError, match="3 voxels are NaN and 1 are Inf"):
        open_map(p, nan_policy="raise")
    with pytest.warns(UserWarning, match="3 voxels are NaN"):
        open_map(p, nan_policy="warn")
    with pytest.raises(DataValueError, match="4 voxels are NaN or Inf"):
        validate_volume(vol, finite=True)
    with pytest.raises(ParameterError, match="nan_policy"):
        open_map(p, nan_policy="ignore")
    st = map_stats(vol, progress=False)
    fin = data[np.isfinite(data)].astype(np.float64)
    assert (st.nan_count, st.inf_count, st.count) == (3, 1, fin.size)
    assert st.min == fin.min() and st.max == fin.max()
    np.testing.assert_allclose([st.mean, st.std], [fin.mean(), fin.std()], rtol=1e-9)
    # info reports the counts; a clean map reports zero
    assert main(["info", str(p), "--no-progress"]) == 0
    assert "NaN 3, Inf 1" in capsys.readouterr().out
    # NaNs survive a round trip unchanged (float32 output)
    out = save(vol, tmp_path / "nan_out.mrc", progress=False)
    np.testing.assert_array_equal(np.fromfile(out, "<f4", offset=1024), data)


def test_output_errors_leave_nothing(tmp_path, capsys):
    src = tmp_path / "a.mrc"
    shutil.copy(data_file(SRC), src)
    before = src.read_bytes()
    vol = open_map(src)
    # output would overwrite the input
    assert main(["convert", str(src), str(src), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "output would overwrite an input" in err and "Traceback" not in err
    with pytest.raises(OutputError, match="overwrite an input"):
        save(vol, src)
    assert src.read_bytes() == before
    # output folder cannot be created (a file is in the way)
    (tmp_path / "blocker").write_text("x")
    assert main(["convert", str(src), str(tmp_path / "blocker" / "o.mrc"), "--no-progress"]) == 2
    assert "blocker" in capsys.readouterr().err
    with pytest.raises(OutputError):
        save(vol, tmp_path / "blocker" / "o.zarr")
    # unknown or compressed output formats
    with pytest.raises(ParameterError, match="unknown output format"):
        save(vol, tmp_path / "o.tif")
    with pytest.raises(ParameterError, match="compressed MRC"):
        save(vol, tmp_path / "o.mrc.gz")
    save(vol, src.with_name("b.mrc"), progress=False)
    with pytest.raises(OutputError, match="exists"):
        save(vol, src.with_name("b.mrc"), overwrite=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mrc", "b.mrc", "blocker"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not writable"):
            save(open_map(data_file(SRC)), ro / "o.mrc")
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


def test_unwritable_midway_removes_temp(tmp_path, monkeypatch):
    """An OSError while writing (disk full...) becomes an OutputError and removes the temp file."""
    import chunkem.io.mrc as mrcmod

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mrcmod, "_pwrite_all", full)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(OutputError, match="No space left on device"):
            save(open_map(data_file(SRC)), tmp_path / "o.mrc", progress=False)
    assert list(tmp_path.iterdir()) == []
