"""Shared fixtures.

Real maps and models come from ``../shared/data`` beside the repository (never
copied into it). Tests that need them skip with a clear reason when that
folder is absent (a user's fresh clone).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CHUNKEM_SHARED", REPO.parent / "shared"))
SHARED_DATA = SHARED / "data"
SHARED_REFERENCE = SHARED / "reference"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data not available: {path} is absent (it lives in ../shared beside the repo)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of real maps/models (``../shared/data``); skips when absent."""
    return _need(SHARED_DATA)


@pytest.fixture(scope="session")
def shared_reference() -> Path:
    """Folder of peer-tool reference outputs (``../shared/reference``); skips when absent."""
    return _need(SHARED_REFERENCE)


def data_file(relpath: str) -> Path:
    """Path of one file under ``../shared/data``; skips the calling test when absent."""
    return _need(SHARED_DATA / relpath)


def gemmi_density(st, *, shape, voxel_size, origin, blur: float):
    """gemmi ``DensityCalculatorE`` (z, y, x array) on a periodic cell = the box ``shape`` at ``origin`` (Å).

    The model (a ``gemmi.Structure``, not modified) is shifted by ``-origin``
    so the cell's voxel 0 sits at ``origin``; ``blur`` in Å².
    """
    import gemmi
    import numpy as np

    st = st.clone()
    for ch in st[0]:
        for r in ch:
            for a in r:
                a.pos = gemmi.Position(a.pos.x - origin[2], a.pos.y - origin[1], a.pos.z - origin[0])
    dc = gemmi.DensityCalculatorE()
    dc.grid.set_unit_cell(gemmi.UnitCell(*(shape[ax] * voxel_size[ax] for ax in (2, 1, 0)), 90, 90, 90))
    dc.grid.spacegroup = gemmi.SpaceGroup("P1")
    dc.grid.set_size(shape[2], shape[1], shape[0])
    dc.blur = blur
    dc.put_model_density_on_grid(st[0])
    return np.array(dc.grid, copy=True).transpose(2, 1, 0)


@pytest.fixture(scope="session")
def _two_worker_cluster():
    """One real 2-process dask cluster shared by the whole test session."""
    from distributed import LocalCluster

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, memory_limit="3GB"
    ) as cluster:
        yield cluster


@pytest.fixture
def two_worker_client(_two_worker_cluster):
    """A distributed Client (default for the test's duration) on 2 worker processes."""
    from distributed import Client

    with Client(_two_worker_cluster) as client:
        yield client
