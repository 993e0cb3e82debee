"""Helpers shared by the CLI verbs: compute flags, output paths, JSON reports."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ZARR_COMPRESSIONS
from ..errors import OutputError


def add_compute_args(parser: argparse.ArgumentParser) -> None:
    """Add the compute flags every verb shares.

    ``--scheduler``, ``--cluster``, ``--cluster-config``, ``--workers``,
    ``--threads-per-worker``, ``--memory-limit``, ``--chunks``, ``--zarr-compression``,
    ``--no-progress``.
    Defaults come from the chunkem config (``DASK_CHUNKEM__*`` env vars or a
    dask YAML file, see :mod:`chunkem.config`).
    """
    g = parser.add_argument_group("compute")
    g.add_argument("--scheduler", metavar="ADDRESS", default=None,
                   help="address of an existing dask scheduler, e.g. tcp://host:8786")
    g.add_argument("--cluster", choices=["auto", "threads", "local", "slurm"], default=None,
                   help="where to compute when no --scheduler is given (default: auto = threads for "
                        "small maps, an embedded LocalCluster otherwise)")
    g.add_argument("--cluster-config", metavar="YAML", default=None,
                   help="dask-jobqueue config file for --cluster slurm")
    g.add_argument("--workers", type=int, default=None, help="number of worker processes / jobs")
    g.add_argument("--threads-per-worker", type=int, default=None)
    g.add_argument("--memory-limit", default=None, help="memory per worker, e.g. 4GB")
    g.add_argument("--chunks", type=int, default=None, metavar="N",
                   help="chunk edge in voxels for reading/computing (default 128)")
    g.add_argument("--zarr-compression", choices=ZARR_COMPRESSIONS, default=None,
                   help="codec of .zarr outputs (default blosc-lz4: fast; zstd: zarr's own default)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")


@contextlib.contextmanager
def compute_session(args: argparse.Namespace, *, nbytes_hint: int | None = None):
    """Context manager: the compute session the flags ask for (see engine.cluster).

    ``--chunks``, ``--zarr-compression`` and ``--no-progress`` are applied as chunkem config values
    for the duration of the session only.
    """
    import dask.config

    from ..engine.cluster import compute_session as _session

    overrides: dict[str, Any] = {"chunkem.progress": not getattr(args, "no_progress", False)}
    if getattr(args, "chunks", None):
        overrides["chunkem.chunks"] = int(args.chunks)
    if getattr(args, "zarr_compression", None):
        overrides["chunkem.zarr-compression"] = args.zarr_compression
    with dask.config.set(overrides), _session(
        scheduler=getattr(args, "scheduler", None),
        cluster=getattr(args, "cluster", None),
        workers=getattr(args, "workers", None),
        threads_per_worker=getattr(args, "threads_per_worker", None),
        memory_limit=getattr(args, "memory_limit", None),
        cluster_config=getattr(args, "cluster_config", None),
        nbytes_hint=nbytes_hint,
    ) as session:
        yield session


def _import_matplotlib() -> None:
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except Exception:  # pragma: no cover - reported when plotting
        pass


def warm_matplotlib() -> threading.Thread:
    """Import matplotlib's Figure/Agg on a side thread (started; ``join()`` before plotting).

    The import (~0.5 s) then overlaps the computation, which spends its time in
    numpy/scipy code that releases the GIL.
    """
    t = threading.Thread(target=_import_matplotlib, daemon=True)
    t.start()
    return t


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return _jsonable(obj.to_dict())
    return obj


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (temp file + rename)."""
    path = Path(path)
    text = json.dumps(_jsonable(data), indent=2)
    atomic_write_bytes(path, text.encode())
    return path


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write a small file through a temporary name in the same folder."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write here ({exc.strerror})") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def reopen_in_fft_slabs(vol, path: str | os.PathLike, *, strategy: str = "auto", **open_kw: Any):
    """``vol`` reopened from ``path`` in whole-plane z-slabs when its FFT will go through slabs.

    Call it inside :func:`compute_session` (the FFT strategy depends on the
    workers' memory) and only when the user gave no ``--chunks``. A slab FFT
    then reads its slabs directly, aligned with a zarr's stored z-chunks,
    instead of merging many small chunks into slabs (an all-to-all step).
    Otherwise ``vol`` is returned as it is.
    """
    from ..engine.spectral import slab_read_chunks
    from ..io import open_map

    stored = (vol.attrs.get("header") or {}).get("zarr", {}).get("chunks")
    slabs = slab_read_chunks(vol.shape, stored_z=stored[0] if stored else None, strategy=strategy)
    return vol if slabs is None else open_map(path, chunks=slabs, **open_kw)


def sidecar(output: str | os.PathLike, suffix: str) -> Path:
    """Path beside ``output`` with its extension(s) replaced: out.mrc -> out<suffix>."""
    p = Path(output)
    name = p.name
    for ext in (".mrc.gz", ".map.gz", ".mrc", ".map", ".ccp4", ".zarr"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    return p.with_name(name + suffix)


def check_output(output: str | os.PathLike, *inputs: str | os.PathLike | None) -> Path:
    """Refuse an output path that is an input, or whose folder cannot be written."""
    out = Path(output).resolve()
    for i in inputs:
        if i is not None and Path(i).resolve() == out:
            raise OutputError(f"{output}: output would overwrite an input file")
    parent = out.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"{output}: cannot create its folder ({exc.strerror})") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{output}: folder {parent} is not writable")
    return Path(output)
