"""OME-Zarr map stores (zarr v3, NGFF 0.5): lazy reads, streamed atomic writes.

Layout written by :func:`write_zarr`::

    map.zarr/                 zarr v3 group
      zarr.json               attributes: "ome" (NGFF 0.5) and "chunkem"
      0/                      level 0: float32 (z, y, x), chunks 128³ by default
      1/, 2/ ...              optional pyramid levels (already downsampled Volumes)

Group attributes::

    {"ome": {"version": "0.5",
             "multiscales": [{"name": ...,
                              "axes": [{"name": "z", "type": "space", "unit": "angstrom"}, ... y, x],
                              "datasets": [{"path": "0", "coordinateTransformations": [
                                              {"type": "scale", "scale": [vz, vy, vx]},
                                              {"type": "translation", "translation": [oz, oy, ox]}]},
                                           ...]}]},
     "chunkem": {"complete": true, "version": ..., "header": {...MRC header facts...},
                 "levels": [{"path": "0", "voxel_size": [...], "origin": [...]}, ...]}}

``translation`` is the position (Å) of the centre of voxel (0, 0, 0), the
same as the Volume origin. ``chunkem.header`` holds the MRC header facts of
the Volume (see :mod:`chunkem.io.mrc`) so that MRC → zarr → MRC is lossless;
voxel size and origin are stored as JSON float64, hence exactly.

Atomicity: the store is written as ``<name>.tmp-<random>`` beside the target
and renamed to its name only when complete (an existing target is first
renamed away, then deleted). ``chunkem.complete`` is set last as well:
:func:`read_zarr` refuses a chunkem store without it. Chunks equal to the
fill value (0) are not stored (zarr's default), which keeps masked maps small.

Stores written by other tools open too when they carry OME-NGFF multiscales
metadata (0.4 or 0.5) with three spatial axes in angstrom, nanometer or
micrometer; a bare zarr array opens when ``voxel_size=`` is given.
"""

from __future__ import annotations

import fcntl
import math
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from ..config import ZARR_COMPRESSIONS as COMPRESSIONS
from ..errors import InputFileError, MapFormatError, OutputError, ParameterError
from ..volume import DIMS, as_triple, make_volume, origin as vol_origin, validate_volume, voxel_size as vol_voxel_size
from .maps import compute, prepare_output

__all__ = ["read_zarr", "write_zarr", "zarr_levels"]

_UNITS = {"angstrom": 1.0, "nanometer": 10.0, "micrometer": 1e4}


def _zarr_chunks(shape: Sequence[int], chunks: int | Sequence[int] | None) -> tuple[int, int, int]:
    if chunks is None or np.ndim(chunks) == 0:
        try:
            from ..engine.chunks import auto_chunks

            return tuple(auto_chunks(tuple(shape), edge=None if chunks is None else int(chunks)))  # type: ignore[arg-type,return-value]
        except ImportError:  # pragma: no cover
            from .. import config

            e = int(chunks or config.get("chunks", 128))  # type: ignore[arg-type]
            return tuple(max(1, min(int(n), e)) for n in shape)  # type: ignore[return-value]
    cs = tuple(int(c) for c in chunks)  # type: ignore[union-attr]
    if len(cs) != 3 or any(c < 1 for c in cs):
        raise ParameterError(f"chunks must be a positive number or 3 positive numbers (z, y, x), got {chunks!r}")
    return tuple(min(c, int(n)) for c, n in zip(cs, shape))  # type: ignore[return-value]


def _jsonable_header(h: dict | None) -> dict | None:
    if not h:
        return None

    def fix(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        if isinstance(v, np.generic):
            v = v.item()
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v

    return fix(dict(h))


# =========================================================================== writing

_LIVE = ".chunkem-writing"


class _GuardedTarget:
    """``da.store`` target writing into a zarr array only while the store is live.

    When a compute fails, tasks already running elsewhere may still finish.
    Each write holds a shared ``flock`` on the store's marker file and checks
    that the marker still exists; :func:`_abort` takes the exclusive lock
    (waiting for writes in flight), removes the marker and only then deletes
    the store, so no late write can recreate part of it.
    """

    def __init__(self, arr: Any, marker: str):
        self.arr = arr
        self.marker = marker
        self.shape = arr.shape
        self.dtype = arr.dtype
        self.ndim = len(arr.shape)

    def __setitem__(self, key: Any, value: Any) -> None:
        try:
            fd = os.open(self.marker, os.O_RDONLY)
        except FileNotFoundError:
            return  # the write was abandoned
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.path.exists(self.marker):
                self.arr[key] = value
        finally:
            os.close(fd)


def _aligned(chunks: tuple[tuple[int, ...], ...], stored: Sequence[int]) -> bool:
    """Every dask chunk covers whole stored chunks (the last one may end at the array's edge)."""
    return all(all(c % int(e) == 0 for c in axis[:-1]) for axis, e in zip(chunks, stored))


def _abort(tmp: Path) -> None:
    marker = tmp / _LIVE
    try:
        fd = os.open(marker, os.O_RDONLY)
    except FileNotFoundError:
        fd = None
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.unlink(marker)
        finally:
            os.close(fd)
    shutil.rmtree(tmp, ignore_errors=True)


def _compressors(name: str | None) -> tuple:
    """zarr v3 compressors for a :data:`COMPRESSIONS` name (None: the ``chunkem.zarr-compression`` setting)."""
    from zarr.codecs import BloscCodec, ZstdCodec

    from .. import config

    name = name if name is not None else (config.get("zarr-compression", "blosc-lz4") or "blosc-lz4")
    if name == "none":
        return ()
    if name == "zstd":
        return (ZstdCodec(level=0),)
    if name in ("blosc-lz4", "blosc-zstd"):
        return (BloscCodec(cname=name.split("-", 1)[1], clevel=5, shuffle="shuffle", typesize=4),)
    raise ParameterError(f"zarr compression must be one of {', '.join(COMPRESSIONS)}, got {name!r}")


def write_zarr(
    vol: xr.DataArray,
    path: str | os.PathLike,
    *,
    chunks: int | Sequence[int] | None = None,
    levels: Sequence[xr.DataArray] | None = None,
    overwrite: bool = True,
    progress: bool | None = None,
    compression: str | None = None,
) -> Path:
    """Write a Volume (and optional pyramid levels) as an OME-Zarr 0.5 store, atomically.

    Parameters
    ----------
    vol
        Level 0. Dask-backed data are streamed chunk by chunk.
    path
        Target ``.zarr`` folder.
    chunks
        Chunk edge or (cz, cy, cx) for every level; default the
        ``chunkem.chunks`` setting (128).
    levels
        Already downsampled Volumes stored as levels 1, 2, ... with their own
        voxel size and origin (see :mod:`chunkem.ops.bin`).
    overwrite
        Replace an existing store.
    progress
        Progress bar (default: the ``chunkem.progress`` setting).
    compression
        Chunk codec: ``"blosc-lz4"`` (byte shuffle + LZ4, several times
        faster than zstd to write and read, about the same size on noisy
        float maps), ``"blosc-zstd"`` (smaller on smooth maps), ``"zstd"``
        (zarr's own default) or ``"none"``; default the
        ``chunkem.zarr-compression`` setting (``"blosc-lz4"``). Readers need
        nothing special: the codec is recorded in the store.

    Returns
    -------
    pathlib.Path
    """
    compressors = _compressors(compression)
    vols = [vol, *(levels or [])]
    for i, v in enumerate(vols):
        validate_volume(v, source=f"{path} level {i}")
    out = prepare_output(path, overwrite=overwrite)
    if out.exists() and not (out.is_dir() and _is_zarr_dir(out)) and not out.is_file():
        raise OutputError(f"{path}: exists and is not a zarr store; refusing to replace it")
    if out.is_dir() and not _is_zarr_dir(out):
        raise OutputError(f"{path}: exists and is not a zarr store; refusing to replace it")

    tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
    header = _jsonable_header(vol.attrs.get("header"))
    if header is not None:
        header.pop("source", None)
        header.pop("zarr", None)
    name = str(vol.name) if vol.name is not None else out.name.rsplit(".", 1)[0]
    try:
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        root.attrs["chunkem"] = {"complete": False}
        (tmp / _LIVE).touch()
        stores = []
        datasets = []
        meta_levels = []
        for i, v in enumerate(vols):
            shape = tuple(int(n) for n in v.shape)
            cs = _zarr_chunks(shape, chunks)
            arr = root.create_array(
                str(i),
                shape=shape,
                chunks=cs,
                dtype="float32",
                fill_value=0.0,
                dimension_names=DIMS,
                compressors=compressors,
            )
            data = v.data
            if isinstance(data, da.Array):
                target = _GuardedTarget(arr, str(tmp / _LIVE))
                if not _aligned(data.chunks, cs):
                    data = data.rechunk(cs)  # else each task writes whole stored chunks: no split
                stores.append(da.store(data, target, lock=False, compute=False))
            else:
                arr[...] = np.asarray(data, dtype=np.float32)
            vs = [float(x) for x in vol_voxel_size(v)]
            org = [float(x) for x in vol_origin(v)]
            datasets.append(
                {
                    "path": str(i),
                    "coordinateTransformations": [
                        {"type": "scale", "scale": vs},
                        {"type": "translation", "translation": org},
                    ],
                }
            )
            meta_levels.append({"path": str(i), "voxel_size": vs, "origin": org, "chunks": list(cs)})
        if stores:
            compute(*stores, progress=progress, label=f"write {out.name}")
        from .. import __version__

        root.attrs.update(
            {
                "ome": {
                    "version": "0.5",
                    "multiscales": [
                        {
                            "name": name,
                            "axes": [{"name": d, "type": "space", "unit": "angstrom"} for d in DIMS],
                            "datasets": datasets,
                        }
                    ],
                },
                "chunkem": {
                    "complete": True,
                    "version": __version__,
                    "name": name,
                    "header": header,
                    "levels": meta_levels,
                },
            }
        )
        os.unlink(tmp / _LIVE)
        _swap_into_place(tmp, out)
    except OSError as exc:
        _abort(tmp)
        raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        _abort(tmp)
        raise
    return out


def _is_zarr_dir(p: Path) -> bool:
    return any((p / n).exists() for n in ("zarr.json", ".zgroup", ".zarray"))


def _swap_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
        return
    old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)
        raise
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.unlink(old)


# =========================================================================== reading


def _multiscales(attrs: dict) -> list | None:
    if "ome" in attrs and isinstance(attrs["ome"], dict):
        return attrs["ome"].get("multiscales")
    return attrs.get("multiscales")  # NGFF 0.4 (zarr v2)


def zarr_levels(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Pyramid levels of a store: ``[{"path", "voxel_size", "origin", "shape"}, ...]`` (z, y, x, Å)."""
    root, ms = _open_group(path)
    out = []
    for i in range(len(ms["datasets"])):
        p, vs, org = _level_geometry(path, ms, i)
        out.append({"path": p, "voxel_size": list(vs), "origin": list(org), "shape": list(root[p].shape)})
    return out


def _open_group(path: str | os.PathLike) -> tuple[Any, dict]:
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{path}: no such file or zarr store")
    if not p.is_dir():
        raise MapFormatError(f"{path}: not a zarr store (a .zarr store is a folder)")
    try:
        node = zarr.open(str(p), mode="r")
    except Exception as exc:  # zarr raises several kinds for non-stores
        raise MapFormatError(f"{path}: not a readable zarr store ({type(exc).__name__}: {exc})") from None
    if isinstance(node, zarr.Array):
        return node, {}
    attrs = dict(node.attrs)
    ck = attrs.get("chunkem")
    if isinstance(ck, dict) and not ck.get("complete", False):
        raise MapFormatError(f"{path}: incomplete chunkem store (its write was interrupted); write it again")
    ms = _multiscales(attrs)
    if not ms:
        raise MapFormatError(f"{path}: zarr group without OME-NGFF multiscales metadata: not a map store")
    return node, ms[0]


def _level_geometry(path: Any, ms: dict, level: int) -> tuple[str, tuple[float, ...], tuple[float, ...]]:
    ds = ms.get("datasets") or []
    if not 0 <= level < len(ds):
        raise ParameterError(f"{path}: level {level} does not exist (the store has {len(ds)} level(s))")
    axes = ms.get("axes") or [{"name": d, "type": "space", "unit": "angstrom"} for d in DIMS]
    names = [a.get("name") if isinstance(a, dict) else a for a in axes]
    if len(axes) != 3 or [n for n in names] != list(DIMS):
        raise MapFormatError(f"{path}: axes {names} are not the 3 spatial axes z, y, x")
    factor = []
    for a in axes:
        unit = (a.get("unit") if isinstance(a, dict) else None) or "angstrom"
        if unit not in _UNITS:
            raise MapFormatError(f"{path}: unsupported axis unit {unit!r} (angstrom, nanometer, micrometer)")
        factor.append(_UNITS[unit])
    scale = [1.0, 1.0, 1.0]
    trans = [0.0, 0.0, 0.0]
    for t in ds[level].get("coordinateTransformations") or []:
        if t.get("type") == "scale":
            scale = [float(s) for s in t["scale"]]
        elif t.get("type") == "translation":
            trans = [float(s) for s in t["translation"]]
    vs = tuple(s * f for s, f in zip(scale, factor))
    org = tuple(o * f for o, f in zip(trans, factor))
    return str(ds[level]["path"]), vs, org


def read_zarr(
    path: str | os.PathLike,
    *,
    level: int = 0,
    chunks: int | Sequence[int] | None = None,
    voxel_size: float | Sequence[float] | None = None,
) -> xr.DataArray:
    """Open one level of an OME-Zarr store as a lazy Volume (nothing computes).

    Parameters
    ----------
    path
        ``.zarr`` folder.
    level
        Pyramid level (0 = full resolution).
    chunks
        Dask chunk edge or (cz, cy, cx); default the stored chunks.
    voxel_size
        Override of the stored voxel size, Å (needed for a bare zarr array).
    """
    node, ms = _open_group(path)
    if isinstance(node, zarr.Array):
        if voxel_size is None:
            raise MapFormatError(f"{path}: a bare zarr array has no voxel size; pass voxel_size= (Å)")
        arr, vs, org, header = node, as_triple(voxel_size, "voxel_size"), (0.0, 0.0, 0.0), {}
    else:
        sub, vs, org = _level_geometry(path, ms, level)
        try:
            arr = node[sub]
        except KeyError:
            raise MapFormatError(f"{path}: level {level} array {sub!r} is missing") from None
        ck = dict(node.attrs).get("chunkem") or {}
        header = dict(ck.get("header") or {}) if level == 0 else {}
        if voxel_size is not None:
            vs = as_triple(voxel_size, "voxel_size")
    if arr.ndim != 3:
        raise MapFormatError(f"{path}: array has {arr.ndim} dimensions; a map has 3 (z, y, x)")
    if not header:
        header = {"format": "ome-zarr"}
    header["source"] = str(path)
    header["zarr"] = {"level": level, "chunks": [int(c) for c in arr.chunks], "dtype": str(arr.dtype)}
    dchunks = arr.chunks if chunks is None else _zarr_chunks(arr.shape, chunks)
    data = da.from_zarr(arr, chunks=dchunks)
    name = (dict(node.attrs).get("chunkem") or {}).get("name") if not isinstance(node, zarr.Array) else None
    return make_volume(data, voxel_size=vs, origin=org, name=name or Path(path).name.rsplit(".", 1)[0], header=header)
