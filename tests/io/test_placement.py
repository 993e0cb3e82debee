"""Placement check: deposited models sit in their maps.

Part 1 is independent of chunkem: the header is interpreted here (mrcfile;
ORIGIN, else NSTART × voxel size; MAPC/MAPR/MAPS), values are trilinear
(scipy ``map_coordinates``), atoms are read by gemmi, and gemmi's own map
reader is a second oracle. Part 2 repeats the check through chunkem's own
path (``open_map`` + ``open_model``) and compares with part 1.
"""

from __future__ import annotations

from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from tests.conftest import data_file

HB = "emd3488_haemoglobin/"
SPIKE = "emd21457_spike_ntd_crop/"
CASES = [
    (HB + "emd_3488.mrc", HB + "5me2.pdb"),
    (SPIKE + "emd_21457_seg.mrc", SPIKE + "6vyb_Ndom.pdb"),
    (SPIKE + "emd_21457_seg_nstart.mrc", SPIKE + "6vyb_Ndom.pdb"),
    (SPIKE + "emd_21457_seg_orig0.mrc", SPIKE + "6vyb_Ndom_shifted.pdb"),
]
IDS = ["3488", "21457-origin", "21457-nstart", "21457-orig0"]


def atom_xyz(path: Path) -> np.ndarray:
    st = gemmi.read_structure(str(path))
    return np.array([(a.pos.x, a.pos.y, a.pos.z) for ch in st[0] for r in ch for a in r])


def read_map_xyz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Data indexed [x, y, z], voxel size (x, y, z) and the position of voxel 0 (x, y, z), Å."""
    with mrcfile.open(path, permissive=True) as mrc:
        h = mrc.header
        data = np.asarray(mrc.data, dtype=np.float64)  # (sections, rows, columns)
        axis = {int(h.mapc) - 1: 2, int(h.mapr) - 1: 1, int(h.maps) - 1: 0}  # xyz axis -> data axis
        arr = data.transpose(axis[0], axis[1], axis[2])
        start_crs = (int(h.nxstart), int(h.nystart), int(h.nzstart))  # columns, rows, sections
        crs_of_data_axis = {2: 0, 1: 1, 0: 2}
        nstart = np.array([start_crs[crs_of_data_axis[axis[k]]] for k in range(3)], dtype=np.float64)
        vs = np.array([h.cella.x / h.mx, h.cella.y / h.my, h.cella.z / h.mz], dtype=np.float64)
        org = np.array([h.origin.x, h.origin.y, h.origin.z], dtype=np.float64)
    if not org.any():
        org = nstart * vs
    return arr, vs, org


def values_independent(map_rel: str, model_rel: str) -> tuple[np.ndarray, np.ndarray]:
    arr, vs, org = read_map_xyz(data_file(map_rel))
    xyz = atom_xyz(data_file(model_rel))
    idx = (xyz - org) / vs
    vals = map_coordinates(arr, idx.T, order=1, mode="nearest")
    return vals, arr


def zscore(vals: np.ndarray, arr: np.ndarray) -> float:
    return float((vals.mean() - arr.mean()) / arr.std())


@pytest.mark.parametrize("map_rel, model_rel", CASES, ids=IDS)
def test_model_sits_in_map_independent(map_rel, model_rel):
    vals, arr = values_independent(map_rel, model_rel)
    assert zscore(vals, arr) > 1.0
    # gemmi's reader as a second oracle (it ignores ORIGIN: shift by it by hand)
    with mrcfile.open(data_file(map_rel), permissive=True, header_only=True) as mrc:
        origin = np.array([mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z], dtype=np.float64)
    grid = gemmi.read_ccp4_map(str(data_file(map_rel)), setup=True).grid
    xyz = atom_xyz(data_file(model_rel)) - origin
    gvals = np.array([grid.interpolate_value(gemmi.Position(*p)) for p in xyz])
    inside = _inside(data_file(map_rel), data_file(model_rel))
    assert inside.mean() > 0.99
    np.testing.assert_allclose(gvals[inside], vals[inside], atol=1e-4)


def _inside(map_path: Path, model_path: Path) -> np.ndarray:
    arr, vs, org = read_map_xyz(map_path)
    idx = (atom_xyz(model_path) - org) / vs
    return np.all((idx >= 0) & (idx <= np.array(arr.shape) - 1), axis=1)


def test_three_placements_give_identical_world_values():
    """Identical up to the float32 header precision (ORIGIN 162.74998 vs NSTART 155 x 1.05 Å)."""
    vals = [values_independent(m, p)[0] for m, p in CASES[1:]]
    np.testing.assert_allclose(vals[0], vals[1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(vals[0], vals[2], atol=1e-4, rtol=0)
    # and they are not trivially equal (the density varies over the atoms)
    assert vals[0].std() > 0.01


def test_wrong_placement_is_detected():
    """The check can fail: the deposited-frame model against the origin-0 map is not in the density."""
    arr, vs, org = read_map_xyz(data_file(SPIKE + "emd_21457_seg_orig0.mrc"))
    xyz = atom_xyz(data_file(SPIKE + "6vyb_Ndom.pdb"))
    vals = map_coordinates(arr, ((xyz - org) / vs).T, order=1, mode="constant", cval=0.0)
    assert zscore(vals, arr) < 0.5


# ----------------------------------------------------------------------------- chunkem's own path


@pytest.mark.parametrize("map_rel, model_rel", CASES, ids=IDS)
def test_model_sits_in_map_chunkem(map_rel, model_rel):
    from chunkem.io import open_map
    from chunkem.io.model import atoms_outside, open_model

    vol = open_map(data_file(map_rel))
    model = open_model(data_file(model_rel))
    assert atoms_outside(model, vol) <= 0.01 * len(model)
    x, y, z = model.xyz.T
    import xarray as xr

    pts = {d: xr.DataArray(c, dims="atom") for d, c in zip(("x", "y", "z"), (x, y, z))}
    vals = vol.astype("float64").interp(pts, method="linear", kwargs={"fill_value": None}).values
    ref, arr = values_independent(map_rel, model_rel)
    inside = _inside(data_file(map_rel), data_file(model_rel))
    np.testing.assert_allclose(vals[inside], ref[inside], rtol=1e-5, atol=1e-6)
    mean = float(vol.mean().compute())
    std = float(vol.std().compute())
    assert (vals[inside].mean() - mean) / std > 1.0


def test_chunkem_three_placements_identical():
    from chunkem.io import open_map
    from chunkem.io.model import open_model

    out = []
    for map_rel, model_rel in CASES[1:]:
        vol = open_map(data_file(map_rel))
        xyz = open_model(data_file(model_rel)).xyz
        # world coordinates of the voxel grid from the Volume, nearest voxel to each atom
        org = np.array(vol.attrs["origin"])[::-1]
        vs = np.array(vol.attrs["voxel_size"])[::-1]
        ijk = np.clip(np.rint((xyz - org) / vs).astype(int), 0, np.array(vol.shape)[::-1] - 1)
        out.append(np.asarray(vol.values)[ijk[:, 2], ijk[:, 1], ijk[:, 0]])
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_allclose(out[0], out[2], atol=1e-6)
