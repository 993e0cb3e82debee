"""chunkem.io.model: reading PDB/mmCIF into an atom table, writing it back.

The oracle is gemmi read independently in each test (atom by atom), and the
real models in ../shared/data.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import gemmi
import mrcfile
import numpy as np
import pytest

from chunkem.errors import GeometryError, ModelFormatError, OutputError, ParameterError
from chunkem.io.model import Model, atoms_outside, check_model_in_map, open_model, save_model
from chunkem.volume import make_volume
from tests.conftest import data_file

HB_PDB = "emd3488_haemoglobin/5me2.pdb"
HB_CIF = "emd3488_haemoglobin/5ni1_updated.cif"


def gemmi_atoms(path: str | Path) -> list[dict]:
    """Every atom of model 1, in file order, read with gemmi alone."""
    st = gemmi.read_structure(str(path))
    out = []
    for ch in st[0]:
        for res in ch:
            for a in res:
                out.append(
                    dict(
                        chain=ch.name,
                        resname=res.name,
                        resseq=res.seqid.num,
                        name=a.name,
                        element=a.element.name,
                        xyz=(a.pos.x, a.pos.y, a.pos.z),
                        b=a.b_iso,
                        occ=a.occ,
                        het=res.het_flag == "H",
                    )
                )
    return out


def assert_matches_gemmi(m: Model, ref: list[dict], *, xyz_tol=1e-6, b_tol=1e-4, occ_tol=1e-6) -> None:
    assert len(m) == len(ref)
    np.testing.assert_allclose(m.xyz, np.array([r["xyz"] for r in ref]), atol=xyz_tol, rtol=0)
    np.testing.assert_allclose(m.b_iso, [r["b"] for r in ref], atol=b_tol, rtol=0)
    np.testing.assert_allclose(m.occupancy, [r["occ"] for r in ref], atol=occ_tol, rtol=0)
    assert m.atom_name.tolist() == [r["name"] for r in ref]
    assert m.element.tolist() == [r["element"] for r in ref]
    assert m.chain.tolist() == [r["chain"] for r in ref]
    assert m.resname.tolist() == [r["resname"] for r in ref]
    assert m.resseq.tolist() == [r["resseq"] for r in ref]
    assert m.is_het.tolist() == [r["het"] for r in ref]


@pytest.mark.parametrize("rel, n_atoms", [(HB_PDB, 4468), (HB_CIF, 4579)])
def test_read_real_models_match_gemmi(rel, n_atoms):
    path = data_file(rel)
    m = open_model(path)
    ref = gemmi_atoms(path)
    assert len(m) == len(ref) == n_atoms
    assert_matches_gemmi(m, ref)
    assert m.xyz.shape == (n_atoms, 3) and m.xyz.dtype == np.float64
    assert sorted(set(m.chain.tolist())) == ["A", "B", "C", "D"]
    # residue_index: a new value exactly where (chain, resseq, icode, resname) changes
    keys = list(zip(m.chain.tolist(), m.resseq.tolist(), m.icode.tolist(), m.resname.tolist()))
    changes = np.array([keys[i] != keys[i - 1] for i in range(1, len(keys))])
    np.testing.assert_array_equal(np.diff(m.residue_index) == 1, changes)
    assert m.residue_index[0] == 0 and np.all(np.diff(m.residue_index) >= 0)
    n_res = sum(len(ch) for ch in gemmi.read_structure(str(path))[0])
    assert m.n_residues == n_res
    # waters and ligands are kept
    assert (m.resname == "HEM").sum() > 0
    assert m.altloc.tolist() == [""] * len(m)
    assert m.aniso_u is None and not m.has_aniso.any()
    assert m.source == str(path)


def test_bounds_center_dataframe():
    m = open_model(data_file(HB_PDB))
    lo, hi = m.bounds()
    ref = np.array([r["xyz"] for r in gemmi_atoms(data_file(HB_PDB))])
    np.testing.assert_allclose(lo, ref.min(axis=0))
    np.testing.assert_allclose(hi, ref.max(axis=0))
    np.testing.assert_allclose(m.center(), ref.mean(axis=0))
    df = m.to_dataframe()
    assert len(df) == len(m)
    np.testing.assert_allclose(df[["x", "y", "z"]].to_numpy(), ref)
    assert df["atom_name"].iloc[0] == "N" and df["chain"].iloc[-1] == m.chain[-1]


def test_gzip_and_first_model_only(tmp_path):
    src = data_file(HB_PDB)
    gz = tmp_path / "5me2.pdb.gz"
    with open(src, "rb") as fi, gzip.open(gz, "wb") as fo:
        shutil.copyfileobj(fi, fo)
    a, b = open_model(src), open_model(gz)
    np.testing.assert_array_equal(a.xyz, b.xyz)
    np.testing.assert_array_equal(a.b_iso, b.b_iso)

    # a two-model (NMR-style) file: model 1 only, with model 1's coordinates
    st = gemmi.read_structure(str(src))
    st.remove_ligands_and_waters()
    m2 = st[0].clone()
    m2.num = 2
    for ch in m2:
        for res in ch:
            for at in res:
                at.pos = gemmi.Position(at.pos.x + 10.0, at.pos.y, at.pos.z)
    st.add_model(m2)
    assert len(st) == 2
    path = tmp_path / "two_models.pdb"
    st.write_pdb(str(path))
    m = open_model(path)
    n1 = sum(len(r) for ch in st[0] for r in ch)
    assert len(m) == n1
    ref = np.array([(at.pos.x, at.pos.y, at.pos.z) for ch in st[0] for r in ch for at in r])
    np.testing.assert_allclose(m.xyz, ref, atol=1e-3)


def test_anisotropic_u_read_and_dropped_when_b_changes(tmp_path):
    st = gemmi.read_structure(str(data_file(HB_PDB)))
    atoms = [at for ch in st[0] for r in ch for at in r]
    u = (0.11, 0.22, 0.33, 0.01, -0.02, 0.03)
    for at in atoms[:5]:
        at.aniso = gemmi.SMat33f(*u)
    path = tmp_path / "aniso.pdb"
    st.write_pdb(str(path))
    m = open_model(path)
    assert m.has_aniso.tolist() == [True] * 5 + [False] * (len(m) - 5)
    np.testing.assert_allclose(m.aniso_u[:5], np.tile(u, (5, 1)), atol=1e-4)
    assert np.isnan(m.aniso_u[5:]).all()
    # change B of atom 0 only: its ANISOU goes, atom 1 keeps its own
    nb = m.b_iso.copy()
    nb[0] += 10.0
    out = save_model(m.with_values(b_iso=nb), tmp_path / "aniso_out.pdb")
    back = [at for ch in gemmi.read_structure(str(out))[0] for r in ch for at in r]
    assert not back[0].aniso.nonzero()
    assert back[1].aniso.nonzero() and abs(back[1].aniso.u22 - 0.22) < 1e-4


@pytest.mark.parametrize("rel", [HB_PDB, HB_CIF])
@pytest.mark.parametrize("ext", ["pdb", "cif", "cif.gz", "pdb.gz"])
def test_write_back_changed_values(tmp_path, rel, ext):
    src = data_file(rel)
    m = open_model(src)
    rng = np.random.default_rng(7)
    new_b = np.round(rng.uniform(5, 150, len(m)), 2)
    new_occ = np.round(rng.uniform(0.1, 1.0, len(m)), 2)
    new_xyz = np.round(m.xyz + rng.normal(0, 0.5, m.xyz.shape), 3)
    m2 = m.with_values(b_iso=new_b, occupancy=new_occ, xyz=new_xyz)
    # the original model and its structure are untouched
    assert not np.array_equal(m.b_iso, m2.b_iso)
    assert_matches_gemmi(m, gemmi_atoms(src))
    out = save_model(m2, tmp_path / f"out.{ext}")
    assert out.exists()
    assert [p.name for p in tmp_path.iterdir()] == [f"out.{ext}"]  # no temporary left
    ref = gemmi_atoms(out)  # read back by gemmi alone
    assert len(ref) == len(m)
    np.testing.assert_allclose([r["b"] for r in ref], new_b, atol=6e-3)
    np.testing.assert_allclose([r["occ"] for r in ref], new_occ, atol=6e-3)
    np.testing.assert_allclose(np.array([r["xyz"] for r in ref]), new_xyz, atol=6e-4)
    # order and identity preserved
    assert [r["name"] for r in ref] == m.atom_name.tolist()
    assert [r["resseq"] for r in ref] == m.resseq.tolist()
    assert [r["chain"] for r in ref] == m.chain.tolist()
    assert [r["element"] for r in ref] == m.element.tolist()


def test_with_values_broadcast_and_errors():
    m = open_model(data_file(HB_PDB))
    m2 = m.with_values(b_iso=42.0, occupancy=0.5)
    assert np.all(m2.b_iso == 42.0) and np.all(m2.occupancy == 0.5)
    np.testing.assert_array_equal(m2.xyz, m.xyz)
    with pytest.raises(ParameterError, match="b_iso"):
        m.with_values(b_iso=np.ones(3))
    with pytest.raises(ParameterError, match="xyz"):
        m.with_values(xyz=np.zeros((len(m), 2)))
    with pytest.raises(ParameterError, match="NaN"):
        m.with_values(occupancy=np.full(len(m), np.nan))


def test_read_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.pdb"
    with pytest.raises(ModelFormatError, match="nope.pdb.*not found"):
        open_model(missing)
    empty = tmp_path / "empty.cif"
    empty.write_text("")
    with pytest.raises(ModelFormatError, match="empty.cif"):
        open_model(empty)
    garbage = tmp_path / "garbage.cif"
    garbage.write_text("data_x\n_atom_site.id 'unterminated\nloop_ 1 2\n")
    with pytest.raises(ModelFormatError, match="garbage.cif"):
        open_model(garbage)
    no_atoms = tmp_path / "header_only.pdb"
    no_atoms.write_text("HEADER    NOTHING HERE\nREMARK   1 no atoms\nEND\n")
    with pytest.raises(ModelFormatError, match="header_only.pdb.*no atoms"):
        open_model(no_atoms)
    with pytest.raises(ModelFormatError, match="not a regular file"):
        open_model(tmp_path)


def test_write_errors(tmp_path):
    src = tmp_path / "m.pdb"
    shutil.copy(data_file(HB_PDB), src)
    m = open_model(src)
    with pytest.raises(OutputError, match="unknown model file type"):
        save_model(m, tmp_path / "out.xyz")
    with pytest.raises(OutputError, match="does not exist"):
        save_model(m, tmp_path / "no_such_dir" / "out.pdb")
    with pytest.raises(OutputError, match="input file"):
        save_model(m.with_values(b_iso=1.0), src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pdb"]
    # the source is unchanged
    np.testing.assert_array_equal(open_model(src).b_iso, m.b_iso)


def _volume_from_mrc_header(path: Path):
    """A zero Volume with the geometry of an MRC file, from its header alone (mrcfile)."""
    with mrcfile.open(path, permissive=True, header_only=True) as mrc:
        h = mrc.header
        assert (int(h.mapc), int(h.mapr), int(h.maps)) == (1, 2, 3)
        shape = (int(h.nz), int(h.ny), int(h.nx))
        vs = (float(h.cella.z) / int(h.mz), float(h.cella.y) / int(h.my), float(h.cella.x) / int(h.mx))
        org = np.array([float(h.origin.z), float(h.origin.y), float(h.origin.x)])
        if not org.any():
            org = np.array([int(h.nzstart), int(h.nystart), int(h.nxstart)]) * np.array(vs)
    return make_volume(np.zeros(shape, np.float32), voxel_size=vs, origin=tuple(org))


def test_atoms_outside_real_placements():
    d = "emd21457_spike_ntd_crop/"
    ndom = open_model(data_file(d + "6vyb_Ndom.pdb"))
    shifted = open_model(data_file(d + "6vyb_Ndom_shifted.pdb"))
    seg = _volume_from_mrc_header(data_file(d + "emd_21457_seg.mrc"))
    nst = _volume_from_mrc_header(data_file(d + "emd_21457_seg_nstart.mrc"))
    orig0 = _volume_from_mrc_header(data_file(d + "emd_21457_seg_orig0.mrc"))
    # the same placement in the three header conventions; a few atoms poke out of the crop
    k = atoms_outside(ndom, seg)
    assert 0 < k <= 5
    assert atoms_outside(ndom, nst) == k
    assert atoms_outside(shifted, orig0) == k
    assert atoms_outside(ndom, seg, margin=2.0) == 0
    assert atoms_outside(ndom, orig0) == len(ndom)
    check_model_in_map(ndom, seg)
    check_model_in_map(shifted, orig0)
    with pytest.raises(GeometryError, match=f"{k} of {len(ndom)} atoms"):
        check_model_in_map(ndom, seg, max_outside_fraction=0.0)
    with pytest.raises(GeometryError, match="model outside the map"):
        check_model_in_map(ndom, orig0)
    with pytest.raises(GeometryError, match="model outside the map"):
        check_model_in_map(shifted, seg, max_outside_fraction=0.5)


def test_atoms_outside_axis_order_and_edges():
    # box: z 0..9 (10 voxels of 1 Å), y 0..38 (20 of 2 Å), x 100..160 (4 of 20 Å)
    vol = make_volume(np.zeros((10, 20, 4)), voxel_size=(1.0, 2.0, 20.0), origin=(0.0, 0.0, 100.0))
    xyz = np.array(
        [
            [100.0, 0.0, 0.0],  # corner, inside (boundary counts)
            [160.0, 38.0, 9.0],  # opposite corner, inside
            [130.0, 20.0, 5.0],  # inside
            [5.0, 20.0, 130.0],  # x and z swapped: outside
            [161.0, 20.0, 5.0],  # just past x
            [130.0, 38.5, 5.0],  # just past y
            [130.0, 20.0, -0.5],  # just before z
        ]
    )
    m = Model(
        xyz=xyz,
        b_iso=np.zeros(7),
        occupancy=np.ones(7),
        element=np.array(["C"] * 7),
        charge=np.zeros(7, int),
        chain=np.array(["A"] * 7),
        resname=np.array(["ALA"] * 7),
        resseq=np.arange(7),
        icode=np.array([""] * 7),
        atom_name=np.array(["CA"] * 7),
        altloc=np.array([""] * 7),
        is_het=np.zeros(7, bool),
        residue_index=np.arange(7),
        has_aniso=np.zeros(7, bool),
    )
    assert atoms_outside(m, vol) == 4
    assert atoms_outside(m, vol, margin=1.0) == 1  # only the swapped one
    with pytest.raises(GeometryError, match="4 of 7 atoms"):
        check_model_in_map(m, vol, max_outside_fraction=0.5)
    check_model_in_map(m, vol, max_outside_fraction=0.6)
    with pytest.raises(ParameterError):
        check_model_in_map(m, vol, max_outside_fraction=2.0)
