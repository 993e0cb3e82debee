"""MRC / CCP4 maps: lazy memory-mapped reading, streamed atomic writing.

Reading
-------
:func:`read_mrc` parses the 1024-byte header (either byte order) and wraps
the data block (which starts after the extended header, at byte
``1024 + NSYMBT``) as a dask array: every task memory-maps the file, copies
its block and converts it to float32, so opening reads nothing but the
header and a map of any size stays lazy. Compressed files (``.gz``, ``.bz2``,
recognised from their first bytes) cannot be memory-mapped: they are
decompressed into memory on open.

Geometry, following the MRC 2014 definition (and
``algorithms/00_conventions.md``):

* MAPC, MAPR, MAPS name the world axis (1 = X, 2 = Y, 3 = Z) along which
  the file's columns, rows and sections run. The Volume is always exposed in
  canonical ``(z, y, x)`` order (a lazy transpose of the file array).
* Voxel size along world X, Y, Z = cell a / MX, b / MY, c / MZ (Å); these
  may differ (anisotropic voxels). Cell angles are kept as metadata; the grid
  is treated as orthogonal.
* NXSTART, NYSTART, NZSTART are the index of the first column, row and
  section; ORIGIN (X, Y, Z, Å) is the position of voxel (0, 0, 0).
  The Volume origin is ORIGIN when any of its values is non-zero, else
  ``nstart * voxel size`` (per world axis).
* Modes 0 (int8; unsigned when the file carries IMOD's stamp without the
  "signed bytes" flag), 1 (int16), 2 (float32), 6 (uint16) and 12 (float16)
  are read; data are always exposed as float32 (exact for all of them).
  Modes 3, 4 (complex) and 101 (4-bit) are refused with a clear error.

``attrs["header"]`` keeps every header fact needed to write the file back
unchanged (JSON-ready, so that a zarr store carries it too): ``mode``,
``dtype``, ``file_shape`` (sections, rows, columns), ``nstart`` (NX/NY/
NZSTART), ``sampling`` (MX, MY, MZ), ``cell``, ``cell_angles``, ``mapcrs``,
``origin_xyz`` (the ORIGIN field's float32 values), ``ispg``, ``labels``,
``exttyp``, ``nversion``, ``nsymbt``, ``extended_header`` (base64, when
≤ 1 MiB), ``raw_header`` (base64 of the 1024 header bytes, for fields
chunkem does not interpret, e.g. IMOD stamps), ``header_stats`` and
``source``.

Writing
-------
:func:`write_mrc` streams a dask-backed Volume into a file named
``.<name>.tmp-<random>`` in the output folder (header placeholder, then
each block written with ``os.pwrite`` at its offset as soon as it is
computed, so memory is bounded by a few blocks), computes the header
statistics (min, max, mean, RMS deviation over finite voxels) chunk-wise in
the same pass, writes the final header and renames the file to its name. On
any error the temporary file is removed.

Round-trip rules (MRC → Volume → MRC keeps data and geometry exact):

* **Mode**: the original mode (``header["mode"]``) is written back when
  every value is exactly representable in it (always true for data read from
  that file); otherwise float32 (mode 2). Volumes without an MRC header are
  written in mode 2. ``mode=`` forces a mode (values must be exact).
  Volumes computed from a map (:func:`chunkem.volume.like`, inverse FFTs)
  carry mode 2 in their header (:func:`chunkem.volume.computed_header`):
  trying the integer mode on computed values would run the computation
  twice.
* **Axis order**: the original MAPC/MAPR/MAPS order is written back
  (``axis_order="keep"``, the default), so the file holds the same bytes in
  the same layout; ``axis_order="zyx"`` writes 1, 2, 3. Either way the data
  in world coordinates are identical.
* **Voxel size**: the header's cell and MX/MY/MZ are kept when the Volume's
  voxel size is still exactly cell / M; otherwise M = number of voxels and
  cell = voxel size × M (rounded to float32 by the format).
* **Origin**: the header's ORIGIN and NSTART are kept when they still give
  the Volume's origin exactly; otherwise a map that used NSTART keeps using
  it when the origin is a whole number of voxels, else ORIGIN is written
  (float32) and NSTART set to 0.
* Labels, space group, extended header, NVERSION, EXTTYP and the unused
  header bytes are copied. Data are written little-endian.
"""

from __future__ import annotations

import base64
import bz2
import gzip
import math
import os
import secrets
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
from dask.base import tokenize

from ..errors import DataValueError, InputFileError, MapFormatError, OutputError, ParameterError
from ..volume import as_triple, make_volume, origin as vol_origin, validate_volume, voxel_size as vol_voxel_size
from .maps import block_stats, compute, merge_stats, prepare_output

__all__ = ["MrcHeader", "read_mrc_header", "read_mrc", "write_mrc", "MODES"]

HEADER_BYTES = 1024
#: data modes chunkem reads and writes -> numpy dtype (mode 0 is int8 unless IMOD says unsigned)
MODES: dict[int, str] = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
_KNOWN_UNSUPPORTED = {3: "complex int16", 4: "complex float32", 101: "4-bit packed"}
_IMOD_STAMP = 1146047817
_MAX_EXT_KEEP = 1 << 20
_WRITE_BLOCK_BYTES = 16 << 20
_MERGE_BYTES = 32 << 20

_HEADER_DTYPE = np.dtype(
    [
        ("nx", "i4"), ("ny", "i4"), ("nz", "i4"), ("mode", "i4"),
        ("nxstart", "i4"), ("nystart", "i4"), ("nzstart", "i4"),
        ("mx", "i4"), ("my", "i4"), ("mz", "i4"),
        ("cella", "f4", (3,)), ("cellb", "f4", (3,)),
        ("mapc", "i4"), ("mapr", "i4"), ("maps", "i4"),
        ("dmin", "f4"), ("dmax", "f4"), ("dmean", "f4"),
        ("ispg", "i4"), ("nsymbt", "i4"),
        ("extra1", "V8"), ("exttyp", "S4"), ("nversion", "i4"),
        ("extra2a", "V40"), ("imod_stamp", "i4"), ("imod_flags", "i4"), ("extra2b", "V36"),
        ("origin", "f4", (3,)), ("map", "S4"), ("machst", "u1", (4,)),
        ("rms", "f4"), ("nlabl", "i4"), ("label", "S80", (10,)),
    ]
)
assert _HEADER_DTYPE.itemsize == HEADER_BYTES


# =========================================================================== header


@dataclass(frozen=True)
class MrcHeader:
    """The facts of an MRC header, as stored (file axis order).

    ``file_shape`` is (sections, rows, columns) = (NZ, NY, NX); ``nstart``,
    ``sampling``, ``cell`` follow the header's own order (X/Y/Z fields).
    Derived canonical (z, y, x) geometry: :attr:`perm`, :attr:`shape`,
    :meth:`voxel_size`, :meth:`origin`.
    """

    path: str
    byte_order: str
    mode: int
    dtype: str
    file_shape: tuple[int, int, int]
    nstart: tuple[int, int, int]
    sampling: tuple[int, int, int]
    cell: tuple[float, float, float]
    cell_angles: tuple[float, float, float]
    mapcrs: tuple[int, int, int]
    origin_xyz: tuple[float, float, float]
    ispg: int
    nsymbt: int
    exttyp: str
    nversion: int
    labels: tuple[str, ...]
    header_stats: dict
    raw: bytes
    compression: str | None = None

    # ------------------------------------------------------------------ derived
    @property
    def data_offset(self) -> int:
        """Byte offset of the data block."""
        return HEADER_BYTES + self.nsymbt

    @property
    def data_nbytes(self) -> int:
        return int(np.prod(self.file_shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def perm(self) -> tuple[int, int, int]:
        """Transpose taking the file array (sections, rows, columns) to (z, y, x)."""
        return _axis_perm(self.mapcrs)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Canonical (z, y, x) shape."""
        return tuple(self.file_shape[k] for k in self.perm)  # type: ignore[return-value]

    def voxel_size(self) -> tuple[float, float, float]:
        """(vz, vy, vx) in Å from cell / sampling (raises when they are zero or negative)."""
        return _voxel_from_cell(self.cell, self.sampling, self.path)

    def origin(self, voxel_size: Sequence[float] | None = None) -> tuple[float, float, float]:
        """(oz, oy, ox) in Å: ORIGIN if non-zero, else nstart × voxel size."""
        vs = as_triple(voxel_size) if voxel_size is not None else self.voxel_size()
        return _origin_rule(self.origin_xyz, self.nstart, self.mapcrs, vs)

    @property
    def origin_from(self) -> str:
        if any(v != 0 for v in self.origin_xyz):
            return "origin"
        if any(v != 0 for v in self.nstart):
            return "nstart"
        return "zero"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready facts (the ``attrs["header"]`` of a Volume, without the extended header)."""
        return {
            "format": "mrc",
            "source": self.path,
            "compression": self.compression,
            "mode": self.mode,
            "dtype": self.dtype,
            "byte_order": self.byte_order,
            "file_shape": list(self.file_shape),
            "nstart": list(self.nstart),
            "sampling": list(self.sampling),
            "cell": list(self.cell),
            "cell_angles": list(self.cell_angles),
            "mapcrs": list(self.mapcrs),
            "origin_xyz": list(self.origin_xyz),
            "origin_from": self.origin_from,
            "ispg": self.ispg,
            "nsymbt": self.nsymbt,
            "exttyp": self.exttyp,
            "nversion": self.nversion,
            "labels": list(self.labels),
            "header_stats": dict(self.header_stats),
            "raw_header": base64.b64encode(self.raw).decode("ascii"),
        }


def _axis_perm(mapcrs: Sequence[int]) -> tuple[int, int, int]:
    # numpy axis k of the file array (0 sections, 1 rows, 2 columns) runs along world axis w[k]
    w = (int(mapcrs[2]), int(mapcrs[1]), int(mapcrs[0]))
    return tuple(w.index(3 - j) for j in range(3))  # type: ignore[return-value]


def _voxel_from_cell(cell: Sequence[float], sampling: Sequence[int], path: str) -> tuple[float, float, float]:
    vx, vy, vz = (float(c) / m if m > 0 else float("nan") for c, m in zip(cell, sampling))
    vs = (vz, vy, vx)
    if not all(math.isfinite(v) and v > 0 for v in vs):
        raise MapFormatError(
            f"{path}: header gives no usable voxel size (cell {tuple(float(c) for c in cell)} Å, "
            f"sampling MX/MY/MZ {tuple(int(m) for m in sampling)}); "
            "pass voxel_size= (Å) to open_map (CLI: --voxel-size) to override it"
        )
    return vs  # type: ignore[return-value]


def _world_of_file_axis(mapcrs: Sequence[int]) -> tuple[int, int, int]:
    """World axis (1 X, 2 Y, 3 Z) of the header's X/Y/Z-ordered file fields (columns, rows, sections)."""
    return (int(mapcrs[0]), int(mapcrs[1]), int(mapcrs[2]))


def _nstart_zyx(nstart: Sequence[int], mapcrs: Sequence[int]) -> tuple[int, int, int]:
    """NX/NY/NZSTART (columns, rows, sections) as starts along world z, y, x."""
    w = _world_of_file_axis(mapcrs)
    return tuple(int(nstart[w.index(3 - j)]) for j in range(3))  # type: ignore[return-value]


def _origin_rule(
    origin_xyz: Sequence[float], nstart: Sequence[int], mapcrs: Sequence[int], vs: Sequence[float]
) -> tuple[float, float, float]:
    if any(float(v) != 0 for v in origin_xyz):
        ox, oy, oz = (float(v) for v in origin_xyz)
        return (oz, oy, ox)
    ns = _nstart_zyx(nstart, mapcrs)
    return tuple(float(n) * float(v) for n, v in zip(ns, vs))  # type: ignore[return-value]


def _decode_label(b: bytes) -> str:
    return b.decode("latin-1").rstrip("\x00 ").rstrip()


def _parse_header(raw: bytes, path: str, compression: str | None = None) -> tuple[MrcHeader, np.ndarray]:
    if len(raw) < HEADER_BYTES:
        raise MapFormatError(
            f"{path}: too short to be an MRC file ({len(raw)} bytes; the header alone is {HEADER_BYTES})"
        )
    raw = bytes(raw[:HEADER_BYTES])
    cands = []
    for bo in ("<", ">"):
        h = np.frombuffer(raw, dtype=_HEADER_DTYPE.newbyteorder(bo), count=1)[0]
        plausible = 0 <= int(h["mode"]) < 1000 and all(0 <= int(h[k]) < 2**28 for k in ("nx", "ny", "nz"))
        cands.append((bo, h, plausible))
    machst = cands[0][1]["machst"]
    preferred = ">" if int(machst[0]) == 0x11 else "<"
    order = sorted(cands, key=lambda c: (not c[2], c[0] != preferred))
    bo, h, _ = order[0]
    le = np.frombuffer(raw, dtype=_HEADER_DTYPE.newbyteorder(bo), count=1).astype(_HEADER_DTYPE.newbyteorder("<"))
    raw_le = le.tobytes()
    h = le[0]

    mode = int(h["mode"])
    if mode not in MODES:
        if mode in _KNOWN_UNSUPPORTED:
            raise MapFormatError(f"{path}: MRC mode {mode} ({_KNOWN_UNSUPPORTED[mode]}) is not supported")
        raise MapFormatError(
            f"{path}: bad MRC mode {mode} (a corrupt header or not an MRC file; modes 0, 1, 2, 6, 12 are read)"
        )
    dims = (int(h["nx"]), int(h["ny"]), int(h["nz"]))
    if any(n <= 0 for n in dims):
        raise MapFormatError(f"{path}: nonsense MRC header: dimensions NX, NY, NZ = {dims} must be positive")
    mapcrs = (int(h["mapc"]), int(h["mapr"]), int(h["maps"]))
    if mapcrs == (0, 0, 0):
        mapcrs = (1, 2, 3)  # some writers leave the axis fields empty
    if sorted(mapcrs) != [1, 2, 3]:
        raise MapFormatError(f"{path}: nonsense MRC header: MAPC/MAPR/MAPS = {mapcrs} is not a permutation of 1, 2, 3")
    nsymbt = int(h["nsymbt"])
    if nsymbt < 0:
        raise MapFormatError(f"{path}: nonsense MRC header: extended header size NSYMBT = {nsymbt}")
    origin_xyz = tuple(float(v) for v in h["origin"])
    if not all(math.isfinite(v) for v in origin_xyz):
        raise MapFormatError(f"{path}: nonsense MRC header: ORIGIN = {origin_xyz} is not finite")
    dtype = MODES[mode]
    if mode == 0 and int(h["imod_stamp"]) == _IMOD_STAMP and not (int(h["imod_flags"]) & 1):
        dtype = "uint8"  # IMOD convention: bytes unsigned unless flagged signed
    nlabl = max(0, min(10, int(h["nlabl"])))
    labels = tuple(_decode_label(bytes(lb)) for lb in h["label"][:nlabl])

    def _fin(v: Any) -> float | None:
        v = float(v)
        return v if math.isfinite(v) else None

    hdr = MrcHeader(
        path=path,
        byte_order=bo,
        mode=mode,
        dtype=dtype,
        file_shape=(dims[2], dims[1], dims[0]),
        nstart=(int(h["nxstart"]), int(h["nystart"]), int(h["nzstart"])),
        sampling=(int(h["mx"]), int(h["my"]), int(h["mz"])),
        cell=tuple(float(v) for v in h["cella"]),  # type: ignore[arg-type]
        cell_angles=tuple(float(v) for v in h["cellb"]),  # type: ignore[arg-type]
        mapcrs=mapcrs,
        origin_xyz=origin_xyz,  # type: ignore[arg-type]
        ispg=int(h["ispg"]),
        nsymbt=nsymbt,
        exttyp=bytes(h["exttyp"]).decode("latin-1").rstrip("\x00 "),
        nversion=int(h["nversion"]),
        labels=labels,
        header_stats={"dmin": _fin(h["dmin"]), "dmax": _fin(h["dmax"]), "dmean": _fin(h["dmean"]), "rms": _fin(h["rms"])},
        raw=raw_le,
        compression=compression,
    )
    return hdr, le


def _check_input(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{path}: no such file")
    if p.is_dir():
        raise InputFileError(f"{path}: is a folder, not an MRC file")
    if not os.access(p, os.R_OK):
        raise InputFileError(f"{path}: not readable (permission denied)")
    if p.stat().st_size == 0:
        raise MapFormatError(f"{path}: empty file (0 bytes)")
    return p


def _compression_of(p: Path) -> str | None:
    with open(p, "rb") as f:
        magic = f.read(3)
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    if magic == b"BZh":
        return "bzip2"
    return None


def _decompress(p: Path, kind: str) -> bytes:
    opener = gzip.open if kind == "gzip" else bz2.open
    try:
        with opener(p, "rb") as f:
            return f.read()
    except (OSError, EOFError, ValueError) as exc:
        raise MapFormatError(f"{p}: corrupt or truncated {kind} file ({exc})") from None


def read_mrc_header(path: str | os.PathLike) -> MrcHeader:
    """Read and check the header of an MRC file (compressed files are decompressed).

    Raises
    ------
    InputFileError
        Missing or unreadable file.
    MapFormatError
        Empty, truncated, bad mode, nonsense dimensions / axis order.
    """
    p = _check_input(path)
    comp = _compression_of(p)
    if comp:
        buf = _decompress(p, comp)
        hdr, _ = _parse_header(buf[:HEADER_BYTES], str(path), comp)
        _check_size(hdr, len(buf))
        return hdr
    with open(p, "rb") as f:
        raw = f.read(HEADER_BYTES)
    hdr, _ = _parse_header(raw, str(path))
    _check_size(hdr, p.stat().st_size)
    return hdr


def _check_size(hdr: MrcHeader, size: int) -> None:
    need = hdr.data_offset + hdr.data_nbytes
    if size < need:
        nz, ny, nx = hdr.file_shape
        raise MapFormatError(
            f"{hdr.path}: truncated MRC file: the header describes {nx}x{ny}x{nz} voxels of mode {hdr.mode} "
            f"(+{hdr.nsymbt} bytes extended header) = {need} bytes, but the file holds {size}"
        )
    if size > need:
        warnings.warn(
            f"{hdr.path}: {size - need} bytes after the map data are ignored", stacklevel=3
        )


# =========================================================================== reading


class _MrcBlockReader:
    """Array-like view of an MRC data block: ``reader[slices]`` -> float32 copy.

    Memory-maps the file on each access (picklable; nothing stays open),
    so dask tasks can run in other processes.
    """

    def __init__(self, path: str, offset: int, shape: tuple[int, int, int], dtype: str):
        self.path = path
        self.offset = offset
        self.shape = shape
        self.file_dtype = dtype
        self.dtype = np.dtype(np.float32)
        self.ndim = 3

    def __getitem__(self, key: Any) -> np.ndarray:
        mm = np.memmap(self.path, dtype=np.dtype(self.file_dtype), mode="r", offset=self.offset, shape=self.shape)
        try:
            return np.array(mm[key], dtype=np.float32)
        finally:
            del mm


def _canonical_chunks(shape: tuple[int, int, int], chunks: int | Sequence[int] | None) -> tuple[int, int, int]:
    if chunks is None or np.ndim(chunks) == 0:
        edge = None if chunks is None else int(chunks)  # type: ignore[arg-type]
        try:
            from ..engine.chunks import auto_chunks
        except ImportError:  # pragma: no cover - engine is part of the package
            from .. import config

            e = int(edge or config.get("chunks", 128))
            return tuple(max(1, min(n, e)) for n in shape)  # type: ignore[return-value]
        return tuple(auto_chunks(shape, edge=edge))  # type: ignore[return-value]
    cs = tuple(int(c) for c in chunks)  # type: ignore[union-attr]
    if len(cs) != 3 or any(c < 1 for c in cs):
        raise ParameterError(f"chunks must be a positive number or 3 positive numbers (z, y, x), got {chunks!r}")
    return tuple(min(c, n) for c, n in zip(cs, shape))  # type: ignore[return-value]


def read_mrc(
    path: str | os.PathLike,
    *,
    chunks: int | Sequence[int] | None = None,
    voxel_size: float | Sequence[float] | None = None,
) -> xr.DataArray:
    """Open an MRC / CCP4 map (optionally gzip / bzip2 compressed) as a lazy Volume.

    See the module docstring for the header rules. Nothing is computed: an
    uncompressed file is memory-mapped chunk by chunk when the data are used.

    Parameters
    ----------
    path
        The file.
    chunks
        Chunk edge (voxels) or (cz, cy, cx) in canonical order.
    voxel_size
        Override of the header voxel size, Å (scalar or (vz, vy, vx)).
    """
    p = _check_input(path)
    comp = _compression_of(p)
    buf = None
    if comp:
        buf = _decompress(p, comp)
        hdr, _ = _parse_header(buf[:HEADER_BYTES], str(path), comp)
        _check_size(hdr, len(buf))
    else:
        with open(p, "rb") as f:
            raw = f.read(HEADER_BYTES)
        hdr, _ = _parse_header(raw, str(path))
        _check_size(hdr, p.stat().st_size)

    if voxel_size is not None:
        vs = as_triple(voxel_size, "voxel_size")
        if not all(math.isfinite(v) and v > 0 for v in vs):
            raise ParameterError(f"{path}: voxel_size must be positive and finite (Å), got {voxel_size!r}")
    else:
        vs = hdr.voxel_size()
    org = hdr.origin(vs)

    header = hdr.to_dict()
    header["source"] = str(path)
    ext = None
    if hdr.nsymbt:
        if buf is not None:
            ext = buf[HEADER_BYTES : hdr.data_offset]
        elif hdr.nsymbt <= _MAX_EXT_KEEP:
            with open(p, "rb") as f:
                f.seek(HEADER_BYTES)
                ext = f.read(hdr.nsymbt)
    header["extended_header"] = (
        base64.b64encode(ext).decode("ascii") if ext is not None and len(ext) <= _MAX_EXT_KEEP else None
    )

    perm = hdr.perm
    cchunks = _canonical_chunks(hdr.shape, chunks)
    file_dtype = np.dtype(hdr.dtype).newbyteorder(hdr.byte_order) if np.dtype(hdr.dtype).itemsize > 1 else np.dtype(hdr.dtype)
    if buf is not None:
        arr = np.frombuffer(buf, dtype=file_dtype, count=int(np.prod(hdr.file_shape)), offset=hdr.data_offset)
        canon = np.ascontiguousarray(arr.reshape(hdr.file_shape).transpose(perm), dtype=np.float32)
        del buf, arr
        data = da.from_array(canon, chunks=cchunks, name=f"mrc-{tokenize(str(p.resolve()), canon)}")
    else:
        inv = tuple(int(i) for i in np.argsort(perm))
        fchunks = tuple(cchunks[inv[k]] for k in range(3))
        st = p.stat()
        reader = _MrcBlockReader(str(p.resolve()), hdr.data_offset, hdr.file_shape, file_dtype.str)
        name = "mrc-" + tokenize(str(p.resolve()), st.st_mtime_ns, st.st_size, hdr.data_offset, file_dtype.str, fchunks)
        fdata = da.from_array(
            reader, chunks=fchunks, name=name, meta=np.empty((0, 0, 0), np.float32), lock=False, fancy=False
        )
        data = fdata.transpose(perm) if perm != (0, 1, 2) else fdata
    return make_volume(data, voxel_size=vs, origin=org, name=_stem(p), header=header)


def _stem(p: Path) -> str:
    name = p.name
    for ext in (".gz", ".bz2"):
        if name.lower().endswith(ext):
            name = name[: -len(ext)]
    return name.rsplit(".", 1)[0] if "." in name else name


# =========================================================================== writing


class _NotRepresentable(Exception):
    """A block holds a value the target mode cannot store exactly."""


def _encode(block: np.ndarray, dtype: np.dtype, check: bool) -> np.ndarray:
    block = np.asarray(block, dtype=np.float32)
    if dtype == np.float32:
        return np.ascontiguousarray(block, dtype="<f4")
    with np.errstate(invalid="ignore", over="ignore"):
        enc = block.astype(dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype)
    if check:
        back = enc.astype(np.float32)
        equal_nan = dtype.kind == "f"
        if not np.array_equal(back, block, equal_nan=equal_nan):
            raise _NotRepresentable(str(dtype))
    return np.ascontiguousarray(enc)


class _BlockWriter:
    """Writes blocks of the file-order array at their byte offsets (picklable)."""

    def __init__(self, path: str, offset: int, file_shape: tuple[int, int, int], dtype: str, check: bool):
        self.path = path
        self.offset = offset
        self.file_shape = file_shape
        self.dtype = dtype
        self.check = check

    def write(self, block: np.ndarray, loc: Sequence[tuple[int, int]]) -> None:
        dt = np.dtype(self.dtype)
        enc = _encode(block, dt, self.check)
        S, R, C = self.file_shape
        (s0, s1), (r0, r1), (c0, c1) = loc
        item = dt.itemsize
        fd = os.open(self.path, os.O_WRONLY)
        try:
            if c0 == 0 and c1 == C and r0 == 0 and r1 == R:
                _pwrite_all(fd, enc, self.offset + s0 * R * C * item)
            elif c0 == 0 and c1 == C:
                for i, s in enumerate(range(s0, s1)):
                    _pwrite_all(fd, enc[i], self.offset + (s * R + r0) * C * item)
            else:
                for i, s in enumerate(range(s0, s1)):
                    for j, r in enumerate(range(r0, r1)):
                        _pwrite_all(fd, enc[i, j], self.offset + ((s * R + r) * C + c0) * item)
        finally:
            os.close(fd)

    def __call__(self, block: np.ndarray, block_info: dict | None = None) -> np.ndarray:
        loc = block_info[0]["array-location"]  # type: ignore[index]
        self.write(block, loc)
        return block_stats(block).reshape(1, 1, -1)


def _pwrite_all(fd: int, arr: np.ndarray, offset: int) -> None:
    mv = memoryview(np.ascontiguousarray(arr)).cast("B")
    done = 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)


def _write_chunks(file_shape: tuple[int, int, int], first: tuple[int, int, int]) -> tuple[int, int, int]:
    """Blocks for writing, in file order (sections, rows, columns).

    A block is written with one ``pwrite`` per contiguous run of bytes: one per
    row when it spans part of the columns, one per section when it spans whole
    rows. Up to :data:`_MERGE_BYTES` of neighbouring input chunks along the
    columns are merged (fewer, longer runs) while each block is cut down along
    the rows to about one input chunk, so memory stays a few input chunks per
    thread whatever the width of the map.
    """
    S, R, C = file_shape
    cs, cr, cx = (max(1, min(int(n), int(c))) for n, c in zip(file_shape, first))
    chunk_bytes = cs * cr * cx * 4
    nx = -(-C // cx)
    k = max(1, min(nx, _MERGE_BYTES // max(1, chunk_bytes)))
    width = C if k >= nx else k * cx
    target = min(max(chunk_bytes, 4 << 20), _WRITE_BLOCK_BYTES)
    rows = max(1, min(R, target // (cs * width * 4)))
    return (cs, int(rows), int(width))


def _mode_dtype(mode: int, h: dict) -> str:
    if mode == 0 and h.get("mode") == 0 and h.get("dtype") in ("int8", "uint8"):
        return str(h["dtype"])
    return MODES[mode]


def _new_header_bytes(fields: dict[str, Any], template: bytes | None) -> bytes:
    h = np.zeros(1, dtype=_HEADER_DTYPE)
    if template is not None and len(template) == HEADER_BYTES:
        h = np.frombuffer(template, dtype=_HEADER_DTYPE, count=1).copy()
    for k, v in fields.items():
        h[0][k] = v
    return h.tobytes()


def _label_block(labels: Sequence[str]) -> np.ndarray:
    out = np.zeros(10, dtype="S80")
    for i, lab in enumerate(labels[:10]):
        out[i] = lab.encode("ascii", "replace")[:80].ljust(80, b" ")
    return out


def write_mrc(
    vol: xr.DataArray,
    path: str | os.PathLike,
    *,
    mode: int | None = None,
    axis_order: str = "keep",
    label: str | None = None,
    overwrite: bool = True,
    progress: bool | None = None,
) -> Path:
    """Write a Volume as an MRC 2014 file, streamed and atomic.

    See the module docstring for the round-trip rules and :func:`chunkem.save`
    for the parameters.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    validate_volume(vol)
    if axis_order not in ("keep", "zyx"):
        raise ParameterError(f"axis_order must be 'keep' or 'zyx', got {axis_order!r}")
    if mode is not None and int(mode) not in MODES:
        raise ParameterError(f"{path}: cannot write MRC mode {mode}; use one of {sorted(MODES)}")
    out = prepare_output(path, overwrite=overwrite)
    if out.is_dir():
        raise OutputError(f"{path}: is a folder")

    h = vol.attrs.get("header") or {}
    if h.get("format") != "mrc":
        h = {}
    shape = tuple(int(n) for n in vol.shape)
    vs = vol_voxel_size(vol)
    org = vol_origin(vol)

    # ---- axis order
    mapcrs = (1, 2, 3)
    if axis_order == "keep" and h.get("mapcrs") and sorted(h["mapcrs"]) == [1, 2, 3]:
        mapcrs = tuple(int(v) for v in h["mapcrs"])  # type: ignore[assignment]
    perm = _axis_perm(mapcrs)
    inv = tuple(int(i) for i in np.argsort(perm))
    file_shape = tuple(shape[inv[k]] for k in range(3))
    S, R, C = file_shape
    # world X, Y, Z (header order) <-> canonical index
    xyz_to_c = (2, 1, 0)

    # ---- voxel size: cell + sampling
    h_cell = h.get("cell")
    h_samp = h.get("sampling")
    cell = [0.0, 0.0, 0.0]
    samp = [0, 0, 0]
    for a in range(3):  # world axis X, Y, Z
        j = xyz_to_c[a]
        kept = False
        if h_cell and h_samp and int(h_samp[a]) > 0:
            if float(np.float32(h_cell[a])) / int(h_samp[a]) == vs[j]:
                cell[a], samp[a], kept = float(h_cell[a]), int(h_samp[a]), True
        if not kept:
            samp[a] = shape[j]
            cell[a] = float(np.float32(vs[j] * shape[j]))
    vs_written = _voxel_from_cell(cell, samp, str(path))

    # ---- origin: ORIGIN and NSTART
    h_oxyz = [float(v) for v in h.get("origin_xyz", (0.0, 0.0, 0.0))]
    h_nstart = [int(v) for v in h.get("nstart", (0, 0, 0))]
    if h and _origin_rule(h_oxyz, h_nstart, mapcrs, vs_written) == tuple(org):
        oxyz, nstart = h_oxyz, h_nstart
    else:
        idx = [o / v for o, v in zip(org, vs_written)]
        whole = all(abs(i - round(i)) <= 1e-6 * max(1.0, abs(i)) for i in idx)
        if h and h.get("origin_from") in ("nstart", "zero") and whole and any(round(i) != 0 for i in idx):
            oxyz = [0.0, 0.0, 0.0]
            ns_zyx = [int(round(i)) for i in idx]
            w = _world_of_file_axis(mapcrs)
            nstart = [ns_zyx[3 - w[k]] for k in range(3)]
        else:
            oxyz = [float(np.float32(org[xyz_to_c[a]])) for a in range(3)]
            nstart = [0, 0, 0]

    # ---- labels, extended header
    labels = list(h.get("labels", []))
    if label:
        labels = labels[:9] + [label[:80]]
    ext = b""
    if h.get("extended_header"):
        ext = base64.b64decode(h["extended_header"])
    template = base64.b64decode(h["raw_header"]) if h.get("raw_header") else None
    fields: dict[str, Any] = {
        "nx": C, "ny": R, "nz": S,
        "nxstart": nstart[0], "nystart": nstart[1], "nzstart": nstart[2],
        "mx": samp[0], "my": samp[1], "mz": samp[2],
        "cella": cell,
        "cellb": [float(v) for v in h.get("cell_angles", (90.0, 90.0, 90.0))],
        "mapc": mapcrs[0], "mapr": mapcrs[1], "maps": mapcrs[2],
        "ispg": int(h.get("ispg", 1)),
        "nsymbt": len(ext),
        "exttyp": (h.get("exttyp") or "").encode("ascii", "replace")[:4] if ext else b"",
        "nversion": int(h["nversion"]) if "nversion" in h else 20141,
        "origin": oxyz,
        "map": b"MAP ",
    }
    tmpl = np.frombuffer(template, _HEADER_DTYPE, count=1)[0] if template is not None else None
    if tmpl is None or int(tmpl["machst"][0]) != 0x44:
        fields["machst"] = [0x44, 0x44, 0, 0]
    tmpl_labels = (
        [_decode_label(bytes(lb)) for lb in tmpl["label"][: max(0, min(10, int(tmpl["nlabl"])))]]
        if tmpl is not None
        else None
    )
    if labels != tmpl_labels:
        fields["label"] = _label_block(labels)
        fields["nlabl"] = len(labels)

    # ---- modes to try: the requested / original mode (exact values only), then float32
    if mode is not None:
        tries = [(int(mode), _mode_dtype(int(mode), h), int(mode) != 2)]
    elif h.get("mode") in MODES and int(h["mode"]) != 2:
        tries = [(int(h["mode"]), _mode_dtype(int(h["mode"]), h), True), (2, "float32", False)]
    else:
        tries = [(2, "float32", False)]

    data = vol.data
    fdata = data.transpose(inv) if inv != (0, 1, 2) else data
    tmp = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    try:
        stats = None
        for k, (m, dtype, check) in enumerate(tries):
            try:
                stats = _stream_data(fdata, tmp, HEADER_BYTES + len(ext), file_shape, dtype, check, ext, progress)
            except _NotRepresentable:
                if k == len(tries) - 1:
                    raise DataValueError(
                        f"{path}: values are not exactly representable in MRC mode {m} ({dtype}); "
                        "write mode 2 (float32) instead"
                    ) from None
                continue
            fields["mode"] = m
            if m == 0:
                # keep IMOD's "signed bytes" flag consistent with the bytes written
                stamp = int(tmpl["imod_stamp"]) if tmpl is not None else 0
                flags = int(tmpl["imod_flags"]) if tmpl is not None else 0
                if dtype == "uint8":
                    fields["imod_stamp"], fields["imod_flags"] = _IMOD_STAMP, flags & ~1
                elif stamp == _IMOD_STAMP:
                    fields["imod_flags"] = flags | 1
            break
        assert stats is not None
        fields["dmin"] = stats.min if stats.count else 0.0
        fields["dmax"] = stats.max if stats.count else 0.0
        fields["dmean"] = stats.mean if stats.count else 0.0
        fields["rms"] = stats.std if stats.count else 0.0
        hb = _new_header_bytes(fields, template)
        fd = os.open(tmp, os.O_WRONLY)
        try:
            _pwrite_all(fd, np.frombuffer(hb, np.uint8), 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out)
    except OSError as exc:
        _unlink(tmp)
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        _unlink(tmp)
        raise
    return out


def _unlink(p: Path) -> None:
    try:
        os.unlink(p)
    except FileNotFoundError:
        pass


def _stream_data(
    fdata: Any,
    tmp: Path,
    offset: int,
    file_shape: tuple[int, int, int],
    dtype: str,
    check: bool,
    ext: bytes,
    progress: bool | None,
):
    """Create ``tmp`` (header placeholder + extended header) and write the data block by block."""
    item = np.dtype(dtype).itemsize
    total = offset + int(np.prod(file_shape, dtype=np.int64)) * item
    with open(tmp, "wb") as f:
        f.write(b"\0" * HEADER_BYTES)
        f.write(ext)
        f.truncate(total)
    writer = _BlockWriter(str(tmp), offset, file_shape, dtype, check)
    if isinstance(fdata, da.Array):
        first = tuple(int(c[0]) for c in fdata.chunks)
        wchunks = _write_chunks(file_shape, first)  # type: ignore[arg-type]
        arr = fdata.rechunk(wchunks)
        out_chunks = ((1,) * len(arr.chunks[0]), (1,) * len(arr.chunks[1]), (7,) * len(arr.chunks[2]))
        parts = arr.map_blocks(
            writer, chunks=out_chunks, dtype=np.float64, meta=np.empty((0, 0, 0), np.float64)
        )
        (res,) = compute(parts, progress=progress, label=f"write {tmp.name.split('.tmp-')[0].lstrip('.')}")
        return merge_stats(res)
    arr = np.asarray(fdata)
    cs, cr, _ = _write_chunks(file_shape, file_shape)  # type: ignore[arg-type]
    partials = []
    for s0 in range(0, file_shape[0], cs):
        for r0 in range(0, file_shape[1], cr):
            s1, r1 = min(s0 + cs, file_shape[0]), min(r0 + cr, file_shape[1])
            blk = arr[s0:s1, r0:r1, :]
            writer.write(blk, ((s0, s1), (r0, r1), (0, file_shape[2])))
            partials.append(block_stats(blk))
    return merge_stats(np.array(partials))
