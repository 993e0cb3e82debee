"""chunkem runtime configuration (dask.config style).

All knobs live under the ``chunkem`` namespace of :mod:`dask.config`, so they
can be set in three equivalent ways:

* in Python: ``dask.config.set({"chunkem.chunks": 128})``;
* in a YAML file in ``~/.config/dask/chunkem.yaml`` (or any dask config path)::

      chunkem:
        chunks: 128
        scheduler: tcp://host:8786

* through environment variables: ``DASK_CHUNKEM__CHUNKS=128``,
  ``DASK_CHUNKEM__SCHEDULER=tcp://host:8786``.

The CLI flags of every verb (``--chunks``, ``--scheduler``, ``--workers``,
``--memory-limit``, ``--cluster``) override these values.
"""

from __future__ import annotations

from typing import Any

import dask.config

#: Codecs of zarr output (``chunkem.zarr-compression``, ``--zarr-compression``; see :func:`chunkem.io.zarr.write_zarr`).
ZARR_COMPRESSIONS = ("blosc-lz4", "blosc-zstd", "zstd", "none")

DEFAULTS: dict[str, Any] = {
    # edge length (voxels) of chunks for maps read from disk / written to zarr
    "chunks": 128,
    # codec of zarr output, one of ZARR_COMPRESSIONS ("blosc-lz4": byte-shuffled LZ4, fast)
    "zarr-compression": "blosc-lz4",
    # memory (bytes) above which an FFT is done by slab decomposition rather
    # than by gathering the map into one chunk
    "fft-gather-limit": 1_500_000_000,
    # bytes per z-slab / z-pencil chunk in the slab FFT decomposition
    "fft-slab-bytes": 64 * 2**20,
    # slab <-> pencil exchange of the slab FFT: "auto" | "rechunk" | "disk" (scratch files)
    "fft-transpose": "auto",
    # folder for the scratch files of "disk" transposes (None: dask's temporary-directory,
    # else the system temp folder); name a shared folder to use them on a multi-node cluster
    "fft-scratch": None,
    # bytes per slab / pencil chunk when the exchange goes through disk
    "fft-disk-slab-bytes": 256 * 2**20,
    # bytes of spectrum a pointwise Fourier kernel / shell sum handles at once
    "fft-kernel-bytes": 16 * 2**20,
    # compute backend: "auto" | "threads" | "local" | "slurm"
    "cluster": "auto",
    # address of an existing scheduler (overrides "cluster")
    "scheduler": None,
    "workers": None,
    "threads-per-worker": None,
    "memory-limit": "auto",
    # maps with fewer voxels than this run on the threaded scheduler in "auto"
    "threads-max-voxels": 512**3,
    "slurm": {},
    # progress bars: off for library calls, switched on by the CLI (--no-progress)
    "progress": False,
    # dask rechunk method inside chunkem sessions: "tasks" | "p2p" | "auto" (dask decides)
    "rechunk-method": "tasks",
    # seconds a computation must run before its progress bar shows
    "progress-minimum": 1.0,
    # timeout for connecting to a scheduler given by address
    "connect-timeout": "20s",
    # dashboard address (e.g. ":8787") of an embedded LocalCluster (None = no dashboard) and of a SLURM
    # cluster's scheduler (None = a free port, unless the cluster config's scheduler_options give one)
    "dashboard": None,
}

dask.config.update_defaults({"chunkem": DEFAULTS})


def get(key: str, default: Any = None) -> Any:
    """Return the chunkem setting ``key`` (dots for nesting)."""
    return dask.config.get(f"chunkem.{key}", default=default)
