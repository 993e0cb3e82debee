"""Shared helpers of the benchmark scripts: peer virtual environments and whole-process timing.

* :func:`bench_cache` is a script's cache folder;
* :func:`_venv` creates a venv (with an upgraded pip) once and returns its ``bin``;
* :func:`peer_python` is the python of a peer's venv, installed on first use;
* :func:`setup_cctbx` is the python of a venv holding ``cctbx-base`` (installed on
  first use; ``pip install cctbx`` fails on wxPython, see ``../shared/design/PEERS.md``);
* :func:`timed` runs one command under ``/usr/bin/time -v`` and returns its
  wall time, peak RSS of the largest process and the peak RSS summed over the
  whole process tree.

Imported by the scripts in this folder as ``from _peers import ...`` (the
script's own folder is on ``sys.path`` when it is run as a file).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

PY = sys.executable


def bench_cache(name: str) -> Path:
    """``$CHUNKEM_BENCH_CACHE/name`` (default ``/tmp/chunkem-bench/name``), created."""
    d = Path(os.environ.get("CHUNKEM_BENCH_CACHE", "/tmp/chunkem-bench")) / name
    d.mkdir(parents=True, exist_ok=True)
    return d


# --------------------------------------------------------------------------- peer environments
def _run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def _venv(path: Path) -> Path:
    if not (path / "bin" / "python").exists():
        _run([PY, "-m", "venv", path])
        _run([path / "bin" / "python", "-m", "pip", "install", "-q", "--upgrade", "pip"])
    return path / "bin"


def peer_python(venv: Path, probe: str, *installs: list[str]) -> Path:
    """The python of ``venv`` (created on first use) once ``import probe`` works there: else each ``pip
    install`` argument list of ``installs`` is run in turn."""
    bin_ = _venv(venv)
    try:
        _run([bin_ / "python", "-c", f"import {probe}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except Exception:
        for args in installs:
            _run([bin_ / "pip", "install", "-q", *args])
    return bin_ / "python"


def setup_cctbx(cache: Path) -> Path:
    """The python of a venv holding cctbx-base (created and installed on first use)."""
    return peer_python(cache / "venv-cctbx", "cctbx.maptbx.auto_sharpen", ["cctbx-base"])


# --------------------------------------------------------------------------- timing
def _tree_rss(proc) -> tuple[int, int]:
    """(sum, max) RSS in bytes over a psutil process and all its descendants."""
    import psutil

    total = largest = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0, 0
    for p in procs:
        try:
            r = p.memory_info().rss
        except psutil.Error:
            continue
        total += r
        largest = max(largest, r)
    return total, largest


def timed(cmd, cwd: Path, log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v``; wall time, peak RSS (largest process), and the
    peak RSS summed over the whole process tree (psutil, sampled every 0.2 s: workers included)."""
    import psutil

    tfile = log.with_suffix(".time")
    tree_peak = proc_peak = 0
    with open(log, "w") as fh:
        p = subprocess.Popen(["/usr/bin/time", "-v", "-o", str(tfile)] + [str(c) for c in cmd], cwd=cwd,
                             stdout=fh, stderr=subprocess.STDOUT, env=env)
        pp = psutil.Process(p.pid)
        while p.poll() is None:
            tot, big = _tree_rss(pp)
            tree_peak, proc_peak = max(tree_peak, tot), max(proc_peak, big)
            time.sleep(0.2)
        rc = p.returncode
    text = tfile.read_text() if tfile.exists() else ""
    out = {"rc": rc, "wall_s": float("nan"), "rss_mb": float("nan"), "tree_mb": tree_peak / 2**20,
           "largest_proc_mb": proc_peak / 2**20}
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text)
    if m:
        s = 0.0
        for p in m.group(1).split(":"):
            s = s * 60 + float(p)
        out["wall_s"] = s
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if m:
        out["rss_mb"] = int(m.group(1)) / 1024.0
    return out
