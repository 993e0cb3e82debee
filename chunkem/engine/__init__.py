"""The chunkem engine: where and how chunked computations run.

* :mod:`~chunkem.engine.cluster` — compute sessions (threads, embedded
  LocalCluster, scheduler address, SLURM) and progress-reporting compute;
* :mod:`~chunkem.engine.chunks` — chunk choice;
* :mod:`~chunkem.engine.local` — LOCAL stages: kernels with a halo in Å;
* :mod:`~chunkem.engine.spectral` — GLOBAL-FFT stages and shell reductions.
"""

from __future__ import annotations

from .chunks import auto_chunks
from .cluster import Session, active_client, compute, compute_session, persist
from .local import halo_voxels, run_local
from .spectral import (
    ShellSums,
    Spectrum,
    apply,
    fourier_filter,
    irfft,
    n_shells,
    radial_profile,
    rfft,
    shell_frequencies,
    shell_index,
    shell_sums,
)

__all__ = [
    "auto_chunks",
    "Session",
    "active_client",
    "compute",
    "compute_session",
    "persist",
    "halo_voxels",
    "run_local",
    "Spectrum",
    "ShellSums",
    "apply",
    "fourier_filter",
    "irfft",
    "n_shells",
    "radial_profile",
    "rfft",
    "shell_frequencies",
    "shell_index",
    "shell_sums",
]
