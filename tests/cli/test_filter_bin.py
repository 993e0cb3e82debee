"""`chunkem filter` and `chunkem bin` on the real tomogram crops."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.ndimage as ndi

from chunkem.cli.main import main
from chunkem.io import open_map
from chunkem.ops.bin import bin_volume
from chunkem.ops.filter import filter_volume

COMPUTE = ["--cluster", "threads", "--chunks", "32"]


@pytest.fixture
def crop(shared_data):
    return shared_data / "microtubule_tomogram_crops" / "13pf_MT.mrc"


def test_filter_lowpass_writes_map_and_report(crop, tmp_path, capsys):
    out = tmp_path / "lp.mrc"
    assert main(["filter", str(crop), str(out), "--lowpass", "30", *COMPUTE]) == 0
    got = open_map(out)
    src = open_map(crop)
    ref = filter_volume(src.compute(), lowpass=30.0)
    np.testing.assert_allclose(got.values, ref.values, atol=3e-6 * float(np.abs(src.values).max()))
    assert got.attrs["voxel_size"] == pytest.approx(src.attrs["voxel_size"], abs=1e-3)
    assert got.attrs["origin"] == pytest.approx(src.attrs["origin"], abs=1e-3)
    report = json.loads((tmp_path / "lp.json").read_text())
    assert report["verb"] == "filter" and report["steps"][0]["fourier"] == {"lowpass": 30.0}
    assert report["compute"]["kind"] == "threads"
    assert "B < 0 sharpens" in report["bfactor_sign"]
    assert "threads" in capsys.readouterr().out



@pytest.mark.parametrize("verb", ["filter", "bin"])
def test_slab_fft_reads_whole_plane_slabs(crop, tmp_path, monkeypatch, verb):
    """With a slab FFT and no --chunks, `filter` and a Fourier `bin` read the input in whole-plane z-slabs;
    same map as in memory."""
    import chunkem.io as cio

    seen = []
    real_open = cio.open_map

    def spy(path, *a, **kw):
        seen.append(kw.get("chunks"))
        return real_open(path, *a, **kw)

    monkeypatch.setattr(cio, "open_map", spy)
    out = tmp_path / f"{verb}_slab.zarr"
    extra = ["--lowpass", "30"] if verb == "filter" else ["--factor", "2", "--method", "fourier"]
    assert main([verb, str(crop), str(out), *extra, "--fft-strategy", "slab", "--cluster", "threads",
                 "--no-progress"]) == 0
    src = real_open(crop)
    assert seen[0] is None and seen[-1] is not None and tuple(seen[-1][1:]) == tuple(src.shape[1:])
    if verb == "filter":
        ref = filter_volume(src.compute(), lowpass=30.0)
    else:
        ref = bin_volume(src.compute(), factor=2, method="fourier")
    np.testing.assert_allclose(open_map(out).values, ref.values, atol=3e-6 * float(np.abs(src.values).max()))


def test_filter_bandpass_bfactor_gaussian_chain(crop, tmp_path):
    out = tmp_path / "bp.zarr"
    args = ["filter", str(crop), str(out), "--bandpass", "200", "30", "--bfactor", "-500", "--gaussian", "12",
            "--edge", "gaussian", *COMPUTE]
    assert main(args) == 0
    src = open_map(crop).compute()
    vs = src.attrs["voxel_size"]
    ref = filter_volume(src, highpass=200.0, lowpass=30.0, bfactor=-500.0, edge="gaussian")
    ref = ndi.gaussian_filter(ref.values, [12.0 / v for v in vs], truncate=4.0)
    np.testing.assert_allclose(open_map(out).values, ref, atol=1e-5 * float(np.abs(ref).max()))


def test_filter_errors_are_one_line(crop, tmp_path, capsys):
    assert main(["filter", str(crop), str(tmp_path / "x.mrc"), *COMPUTE]) == 2
    assert "at least one of" in capsys.readouterr().err
    assert main(["filter", str(crop), str(tmp_path / "x.mrc"), "--bandpass", "8", "50", *COMPUTE]) == 2
    assert "coarser" in capsys.readouterr().err
    assert main(["filter", str(crop), str(tmp_path / "x.mrc"), "--lowpass", "5", *COMPUTE]) == 2
    assert "Nyquist" in capsys.readouterr().err
    assert not (tmp_path / "x.mrc").exists()


def test_bin_with_pyramid_levels(crop, tmp_path):
    out = tmp_path / "b.zarr"
    assert main(["bin", str(crop), str(out), "--factor", "2", "--method", "mean", "--levels", "3", *COMPUTE]) == 0
    src = open_map(crop)
    vs, org = src.attrs["voxel_size"], src.attrs["origin"]
    lv = [open_map(out, level=i) for i in range(3)]
    for i, v in enumerate(lv):
        f = 2 ** (i + 1)
        assert v.shape == tuple(n // f for n in src.shape)
        assert v.attrs["voxel_size"] == pytest.approx(tuple(f * x for x in vs), rel=1e-5)
        assert v.attrs["origin"] == pytest.approx(tuple(o + (f - 1) / 2 * x for o, x in zip(org, vs)), rel=1e-5)
    np.testing.assert_allclose(lv[0].values, bin_volume(src.compute(), factor=2).values, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lv[1].values, bin_volume(lv[0].compute(), factor=2).values, rtol=1e-6, atol=1e-6)
    report = json.loads((tmp_path / "b.json").read_text())
    assert [r["level"] for r in report["levels"]] == [0, 1, 2]
    assert report["levels"][1]["voxel_size_A"] == pytest.approx([4 * x for x in vs], rel=1e-5)


def test_bin_fourier_to_mrc(crop, tmp_path):
    out = tmp_path / "b2.mrc"
    assert main(["bin", str(crop), str(out), "--factor", "2", *COMPUTE]) == 0
    got = open_map(out)
    ref = bin_volume(open_map(crop).compute(), factor=2, method="fourier")
    np.testing.assert_allclose(got.values, ref.values, atol=1e-5 * float(np.abs(ref.values).max()))
    assert got.attrs["voxel_size"] == pytest.approx(ref.attrs["voxel_size"], rel=1e-5)


def test_bin_levels_need_zarr(crop, tmp_path, capsys):
    assert main(["bin", str(crop), str(tmp_path / "b.mrc"), "--levels", "2", *COMPUTE]) == 2
    assert ".zarr" in capsys.readouterr().err


def test_help_has_examples(capsys):
    for verb in ("filter", "bin"):
        with pytest.raises(SystemExit):
            main([verb, "--help"])
        text = capsys.readouterr().out
        assert "Examples" in text and f"chunkem {verb}" in text and "--scheduler" in text
