"""Atomic models (PDB / mmCIF) as a small table of numpy arrays.

:func:`open_model` reads a coordinate file with gemmi into a :class:`Model`:
one row per atom, in file order, of the **first model** only (NMR-style
multi-model files keep model 1). Nothing is removed: waters, ligands,
hydrogens and every alternative conformation stay, so that a model written
back with :func:`save_model` has exactly the atoms it was read with. Filter
with the arrays (e.g. ``m.resname != "HOH"``) when an operation needs to.

Conventions
-----------
* ``xyz`` is in Å, columns (x, y, z) as in the file. Volumes index
  ``(z, y, x)``: use ``xyz[:, ::-1]`` to compare with a Volume's origin.
* ``b_iso`` is the file's isotropic B in Å², **decay convention**
  (``B > 0`` blurs; the atom's Fourier amplitude falls as
  ``exp(-B s² / 4)``, s in 1/Å).
* ``aniso_u`` holds (U11, U22, U33, U12, U13, U23) in Å² where the file has
  ANISOU / ``_atom_site_anisotrop`` records (``has_aniso`` True), NaN
  elsewhere; ``None`` when no atom has one.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gemmi
import numpy as np

from ..errors import GeometryError, ModelFormatError, OutputError, ParameterError
from ..volume import DIMS, origin, voxel_size

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import xarray as xr

__all__ = [
    "Model",
    "open_model",
    "save_model",
    "model_from_structure",
    "atoms_outside",
    "check_model_in_map",
    "MODEL_SUFFIXES",
]

#: File name endings understood by :func:`open_model` / :func:`save_model`.
MODEL_SUFFIXES = (".pdb", ".ent", ".cif", ".mmcif", ".pdb.gz", ".ent.gz", ".cif.gz", ".mmcif.gz")


@dataclass(frozen=True, eq=False)
class Model:
    """An atomic model: per-atom numpy arrays in file order (first model only).

    Attributes
    ----------
    xyz : ndarray (N, 3) float64
        Cartesian coordinates in Å, columns (x, y, z).
    b_iso : ndarray (N,) float64
        Isotropic B in Å², decay convention (as in the file).
    occupancy : ndarray (N,) float64
    element : ndarray (N,) str
        Element symbol as gemmi spells it (``"C"``, ``"Fe"``...).
    charge : ndarray (N,) int
    chain, resname, icode, atom_name, altloc : ndarray (N,) str
        Author chain name, residue name, insertion code (``""`` if none),
        atom name, alternative-location label (``""`` if none).
    resseq : ndarray (N,) int
        Author residue number.
    is_het : ndarray (N,) bool
        HETATM record.
    residue_index : ndarray (N,) int
        Running index of residues (0, 1, ...) over the whole model, for
        per-residue grouping.
    aniso_u : ndarray (N, 6) float64 or None
        (U11, U22, U33, U12, U13, U23) in Å², NaN where absent; None when no
        atom is anisotropic.
    has_aniso : ndarray (N,) bool
    source : str or None
        File the model was read from.
    structure : gemmi.Structure
        The parsed structure (first model only), kept untouched for
        write-back; :meth:`to_structure` makes an updated copy.
    """

    xyz: np.ndarray
    b_iso: np.ndarray
    occupancy: np.ndarray
    element: np.ndarray
    charge: np.ndarray
    chain: np.ndarray
    resname: np.ndarray
    resseq: np.ndarray
    icode: np.ndarray
    atom_name: np.ndarray
    altloc: np.ndarray
    is_het: np.ndarray
    residue_index: np.ndarray
    has_aniso: np.ndarray
    aniso_u: np.ndarray | None = None
    source: str | None = None
    structure: gemmi.Structure | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.xyz.shape[0])

    def __repr__(self) -> str:
        chains = list(dict.fromkeys(self.chain.tolist()))
        return (
            f"Model({len(self)} atoms, {int(self.residue_index.max()) + 1 if len(self) else 0} residues, "
            f"chains {''.join(chains) if all(len(c) == 1 for c in chains) else chains}, source={self.source!r})"
        )

    @property
    def n_residues(self) -> int:
        """Number of residues (distinct ``residue_index`` values)."""
        return int(np.unique(self.residue_index).size)

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(min, max) of the coordinates in Å, each an (x, y, z) array."""
        return self.xyz.min(axis=0), self.xyz.max(axis=0)

    def center(self) -> np.ndarray:
        """Mean atom position (x, y, z) in Å (unweighted)."""
        return self.xyz.mean(axis=0)

    def to_dataframe(self) -> pd.DataFrame:
        """The atom table as a pandas DataFrame (one row per atom, file order)."""
        import pandas as pd

        cols: dict[str, Any] = {
            "chain": self.chain,
            "resname": self.resname,
            "resseq": self.resseq,
            "icode": self.icode,
            "atom_name": self.atom_name,
            "altloc": self.altloc,
            "element": self.element,
            "x": self.xyz[:, 0],
            "y": self.xyz[:, 1],
            "z": self.xyz[:, 2],
            "b_iso": self.b_iso,
            "occupancy": self.occupancy,
            "charge": self.charge,
            "is_het": self.is_het,
            "residue_index": self.residue_index,
        }
        if self.aniso_u is not None:
            for j, lab in enumerate(("u11", "u22", "u33", "u12", "u13", "u23")):
                cols[lab] = self.aniso_u[:, j]
        return pd.DataFrame(cols)

    def with_values(
        self,
        *,
        b_iso: Any = None,
        occupancy: Any = None,
        xyz: Any = None,
    ) -> Model:
        """A copy with new per-atom B (Å², decay convention), occupancy and/or xyz (Å).

        Scalars are broadcast to every atom. The kept gemmi structure is
        shared, not modified; :func:`save_model` writes the new values.
        """
        n = len(self)
        changes: dict[str, np.ndarray] = {}
        for name, val, shape in (
            ("b_iso", b_iso, (n,)),
            ("occupancy", occupancy, (n,)),
            ("xyz", xyz, (n, 3)),
        ):
            if val is None:
                continue
            arr = np.array(val, dtype=np.float64)
            if arr.ndim == 0:
                arr = np.full(shape, float(arr))
            if arr.shape != shape:
                raise ParameterError(f"{name} must have shape {shape} for a model of {n} atoms, got {arr.shape}")
            if not np.all(np.isfinite(arr)):
                raise ParameterError(f"{name} holds NaN or Inf values")
            changes[name] = arr
        return replace(self, **changes)

    def to_structure(self) -> gemmi.Structure:
        """A new gemmi.Structure holding this model's current xyz, B and occupancy.

        Atoms whose B changed from the kept structure lose their anisotropic
        U (ANISOU) so the written file stays self-consistent.
        """
        if self.structure is None:
            raise ModelFormatError("model has no gemmi structure to write back (build it with model_from_structure)")
        st = self.structure.clone()
        atoms = [a for ch in st[0] for res in ch for a in res]
        if len(atoms) != len(self):
            raise ModelFormatError(
                f"{self.source or 'model'}: kept structure has {len(atoms)} atoms but the table has {len(self)}"
            )
        for i, a in enumerate(atoms):
            x, y, z = self.xyz[i]
            a.pos = gemmi.Position(float(x), float(y), float(z))
            b = float(self.b_iso[i])
            if a.aniso.nonzero() and abs(a.b_iso - b) > 1e-3:
                a.aniso = gemmi.SMat33f(0, 0, 0, 0, 0, 0)
            a.b_iso = b
            a.occ = float(self.occupancy[i])
        return st


def _read_structure(path: Path) -> gemmi.Structure:
    try:
        st = gemmi.read_structure(str(path), merge_chain_parts=True)
    except Exception as exc:  # gemmi raises RuntimeError/ValueError/OSError with its own text
        raise ModelFormatError(f"{path}: cannot read atomic model ({exc})") from exc
    return st


def model_from_structure(st: gemmi.Structure, *, source: str | None = None) -> Model:
    """Build a :class:`Model` from a gemmi.Structure (its first model is kept).

    The structure is cloned and trimmed to its first model; the original is
    not modified.

    Raises
    ------
    ModelFormatError
        When the structure holds no model or no atom.
    """
    where = source or st.name or "structure"
    if len(st) == 0:
        raise ModelFormatError(f"{where}: no model (no atoms) in the file")
    st = st.clone()
    while len(st) > 1:
        del st[len(st) - 1]
    gmodel = st[0]
    n = sum(len(res) for ch in gmodel for res in ch)
    if n == 0:
        raise ModelFormatError(f"{where}: the model holds no atoms")

    xyz = np.empty((n, 3), dtype=np.float64)
    b = np.empty(n, dtype=np.float64)
    occ = np.empty(n, dtype=np.float64)
    charge = np.empty(n, dtype=np.int64)
    resseq = np.empty(n, dtype=np.int64)
    rindex = np.empty(n, dtype=np.int64)
    is_het = np.empty(n, dtype=bool)
    has_aniso = np.zeros(n, dtype=bool)
    u = np.full((n, 6), np.nan, dtype=np.float64)
    element: list[str] = []
    chain: list[str] = []
    resname: list[str] = []
    icode: list[str] = []
    atom_name: list[str] = []
    altloc: list[str] = []
    i = 0
    r = 0
    for ch in gmodel:
        for res in ch:
            ic = res.seqid.icode.strip()
            het = res.het_flag == "H"
            for a in res:
                p = a.pos
                xyz[i] = (p.x, p.y, p.z)
                b[i] = a.b_iso
                occ[i] = a.occ
                charge[i] = a.charge
                resseq[i] = res.seqid.num
                rindex[i] = r
                is_het[i] = het
                if a.aniso.nonzero():
                    an = a.aniso
                    u[i] = (an.u11, an.u22, an.u33, an.u12, an.u13, an.u23)
                    has_aniso[i] = True
                element.append(a.element.name)
                chain.append(ch.name)
                resname.append(res.name)
                icode.append(ic)
                atom_name.append(a.name)
                altloc.append(a.altloc.strip("\x00 "))
                i += 1
            r += 1
    return Model(
        xyz=xyz,
        b_iso=b,
        occupancy=occ,
        element=np.array(element, dtype=str),
        charge=charge,
        chain=np.array(chain, dtype=str),
        resname=np.array(resname, dtype=str),
        resseq=resseq,
        icode=np.array(icode, dtype=str),
        atom_name=np.array(atom_name, dtype=str),
        altloc=np.array(altloc, dtype=str),
        is_het=is_het,
        residue_index=rindex,
        has_aniso=has_aniso,
        aniso_u=u if has_aniso.any() else None,
        source=source,
        structure=st,
    )


def open_model(path: str | os.PathLike) -> Model:
    """Read a PDB or mmCIF file (optionally ``.gz``) into a :class:`Model`.

    Parameters
    ----------
    path
        ``.pdb``, ``.ent``, ``.cif``, ``.mmcif``, each optionally ``.gz``.

    Returns
    -------
    Model
        Every atom of the first model, in file order (waters, ligands,
        hydrogens and alternative conformations kept). B in Å², decay
        convention.

    Raises
    ------
    ModelFormatError
        Missing or unreadable file, or a file holding no atoms.

    Examples
    --------
    >>> m = open_model("5me2.pdb")  # doctest: +SKIP
    >>> len(m), m.xyz.shape  # doctest: +SKIP
    (4468, (4468, 3))
    """
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(f"{p}: model file not found")
    if not p.is_file():
        raise ModelFormatError(f"{p}: not a regular file")
    if p.stat().st_size == 0:
        raise ModelFormatError(f"{p}: empty model file")
    st = _read_structure(p)
    return model_from_structure(st, source=str(p))


def _format_of(path: Path) -> tuple[str, bool]:
    name = path.name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if name.endswith((".pdb", ".ent")):
        return "pdb", gz
    if name.endswith((".cif", ".mmcif")):
        return "cif", gz
    raise OutputError(f"{path}: unknown model file type (use one of {', '.join(MODEL_SUFFIXES)})")


def save_model(model: Model, path: str | os.PathLike) -> Path:
    """Write ``model`` (its current xyz, B and occupancy) as PDB or mmCIF.

    The format follows the extension (``.pdb``/``.ent`` or ``.cif``/``.mmcif``,
    optionally ``.gz``). Atoms keep the order, names and records of the
    source structure; only coordinates, B (Å², decay convention) and
    occupancy are replaced (ANISOU is dropped for atoms whose B changed).
    The file is written to a temporary name in the same folder and renamed,
    so no partial file is ever left.

    Returns
    -------
    pathlib.Path
        The written path.

    Raises
    ------
    OutputError
        Unknown extension, folder missing or not writable, or a path that is
        the model's own source file.
    """
    p = Path(path)
    fmt, gz = _format_of(p)
    if model.source is not None and p.exists() and os.path.samefile(p, model.source):
        raise OutputError(f"{p}: refusing to overwrite the model's input file")
    folder = p.parent if str(p.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{p}: output folder {folder} does not exist")
    st = model.to_structure()
    if fmt == "pdb":
        opts = gemmi.PdbWriteOptions()
        text = st.make_pdb_string(opts)
    else:
        st.setup_entities()
        text = st.make_mmcif_document().as_string()
    data = text.encode()
    if gz:
        data = gzip.compress(data, mtime=0)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"{p}: cannot write in {folder} ({exc.strerror})") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, p)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OutputError(f"{p}: cannot write model ({exc.strerror})") from exc
        raise
    return p


def _box_zyx(vol: xr.DataArray) -> tuple[np.ndarray, np.ndarray]:
    org = np.asarray(origin(vol), dtype=np.float64)
    vs = np.asarray(voxel_size(vol), dtype=np.float64)
    n = np.asarray([vol.sizes[d] for d in DIMS], dtype=np.float64)
    return org, org + (n - 1) * vs


def _outside_mask(model: Model, vol: xr.DataArray, margin: float) -> np.ndarray:
    lo, hi = _box_zyx(vol)
    zyx = model.xyz[:, ::-1]
    return np.any((zyx < lo - margin) | (zyx > hi + margin), axis=1)


def atoms_outside(model: Model, vol: xr.DataArray, *, margin: float = 0.0) -> int:
    """Number of atoms outside the box spanned by ``vol``'s voxel centres.

    The box is ``origin .. origin + (n - 1) * voxel_size`` per axis (Å), in
    the Volume's (z, y, x) order; atom xyz columns are (x, y, z).

    Parameters
    ----------
    margin
        Å added to each side of the box (negative shrinks it).
    """
    return int(_outside_mask(model, vol, margin).sum())


def check_model_in_map(
    model: Model,
    vol: xr.DataArray,
    *,
    max_outside_fraction: float = 0.05,
    margin: float = 0.0,
) -> None:
    """Raise :class:`GeometryError` ("model outside the map") when too many atoms lie outside.

    Parameters
    ----------
    max_outside_fraction
        Largest tolerated fraction (0..1) of atoms outside the box. The
        default tolerates a few atoms poking out of a tight crop (3 of the
        1615 atoms of PDB 6VYB's NTD lie up to 1.6 Å outside the deposited
        EMD-21457 crop), not a misplaced model.
    margin
        Å added to each side of the box.
    """
    if not 0.0 <= max_outside_fraction <= 1.0:
        raise ParameterError(f"max_outside_fraction must be in [0, 1], got {max_outside_fraction}")
    out = _outside_mask(model, vol, margin)
    k = int(out.sum())
    if k > max_outside_fraction * len(model):
        lo, hi = _box_zyx(vol)
        mlo, mhi = model.bounds()
        raise GeometryError(
            f"model outside the map: {k} of {len(model)} atoms of {model.source or 'the model'} lie outside "
            f"{vol.name or 'the map'} (map box x {lo[2]:.2f}..{hi[2]:.2f}, y {lo[1]:.2f}..{hi[1]:.2f}, "
            f"z {lo[0]:.2f}..{hi[0]:.2f} Å; model x {mlo[0]:.2f}..{mhi[0]:.2f}, y {mlo[1]:.2f}..{mhi[1]:.2f}, "
            f"z {mlo[2]:.2f}..{mhi[2]:.2f} Å). Check the map origin / nstart and the model frame."
        )
