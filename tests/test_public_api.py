"""The top-level API: every advertised name resolves, and importing is light."""

from __future__ import annotations

import subprocess
import sys

import chunkem
import chunkem.ops


def test_every_public_name_resolves():
    for name in chunkem.__all__:
        assert getattr(chunkem, name) is not None, name
    assert set(chunkem.__all__) - {"__version__", "ChunkemError"} == set(chunkem._LAZY)
    for name in chunkem.ops._LAZY:
        assert callable(getattr(chunkem.ops, name)), name
    assert chunkem.lowpass is chunkem.ops.lowpass


def test_import_does_not_pull_array_stack():
    code = ("import sys, chunkem, chunkem.ops; "
            "print(sorted(m for m in ('dask.array', 'xarray', 'scipy.ndimage', 'matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
