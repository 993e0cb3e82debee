"""``chunkem demo``: the embedded default main job.

Builds a realistic phantom (a procedurally generated protein-like model
rendered to two noisy half maps with a spatially varying blur, see
:mod:`chunkem.phantoms`), stores it as OME-Zarr, reopens it lazily and runs
every capability chunkem has, each as one *stage*. Every stage is a function
``demo_stage(ctx) -> dict`` living beside its op; ``ctx`` holds

* ``"phantom"``: the :class:`chunkem.phantoms.Phantom` (numpy-backed Volumes
  and the model, with the ground truth),
* ``"half1"``, ``"half2"``, ``"mask"``: the same maps reopened lazily from
  the zarr stores (dask-backed),
* ``"outdir"``: the folder where stages write their outputs.

A stage returns a small dict of summary numbers; the demo prints them and
writes them all to ``demo_report.json``.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.config

__all__ = ["STAGES", "DemoResult", "run_demo"]

#: (stage name, module holding ``demo_stage``), run in this order. A module
#: that does not exist yet (capability not built) is skipped; any other error
#: in a stage is raised.
STAGES: list[tuple[str, str]] = [
    ("engine", "chunkem.ops.filter"),
    ("fsc", "chunkem.ops.fsc"),
    ("modelmap", "chunkem.ops.modelmap"),
    ("spiral", "chunkem.ops.spiral"),
    ("locres", "chunkem.ops.locres"),
    ("locscale", "chunkem.ops.locscale"),
]


@dataclass
class DemoResult:
    """What the demo did: folder, phantom parameters, per-stage summaries and times (s)."""

    outdir: Path
    phantom: dict[str, Any]
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "outdir": str(self.outdir),
            "phantom": self.phantom,
            "stages": self.stages,
            "times_s": self.times,
        }


def _load_stage(module: str) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name == module:
            return None
        raise
    return getattr(mod, "demo_stage", None)


def run_demo(
    outdir: str | Path = "chunkem-demo",
    *,
    box: int | None = None,
    seed: int = 0,
    stages: list[str] | None = None,
    log: Callable[[str], None] | None = print,
) -> DemoResult:
    """Build the phantom in ``outdir`` and run every available stage on it.

    Parameters
    ----------
    outdir
        Folder for the phantom (zarr stores, model) and every output.
    box
        Phantom box edge in voxels (default: the phantom module's default).
    seed
        Random seed of the phantom (model and noise).
    stages
        Names of stages to run (default: all available, see :data:`STAGES`).
    log
        Where progress lines go (``None`` for silence).

    Returns
    -------
    DemoResult
    """
    from ..io import open_map, save
    from ..phantoms import make_phantom

    say = log or (lambda _msg: None)
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {"seed": seed}
    if box is not None:
        kwargs["box"] = box
    phantom = make_phantom(**kwargs)
    pdir = outdir / "phantom"
    pdir.mkdir(exist_ok=True)
    phantom.write(pdir)
    lazy: dict[str, Any] = {}
    for key in ("half1", "half2", "mask"):
        path = pdir / f"{key}.zarr"
        save(getattr(phantom, key), path)
        lazy[key] = open_map(path)
    t_phantom = time.perf_counter() - t0
    result = DemoResult(outdir=outdir, phantom=dict(phantom.params))
    result.times["phantom"] = round(t_phantom, 2)
    shape = tuple(phantom.truth.shape)
    say(
        f"phantom: {len(phantom.model)} atoms, box {shape} at "
        f"{phantom.truth.attrs['voxel_size'][0]:.2f} Å, stored as zarr in {pdir} ({t_phantom:.1f} s)"
    )

    ctx: dict[str, Any] = {"phantom": phantom, "outdir": outdir, **lazy}
    for name, module in STAGES:
        if stages is not None and name not in stages:
            continue
        fn = _load_stage(module)
        if fn is None:
            continue
        t = time.perf_counter()
        with dask.config.set({"chunkem.progress": False}):  # one summary line per stage instead
            summary = fn(ctx) or {}
        dt = time.perf_counter() - t
        result.stages[name] = summary
        result.times[name] = round(dt, 2)
        nums = ", ".join(f"{k}={_fmt(v)}" for k, v in summary.items() if not isinstance(v, (dict, list)))
        say(f"{name}: {nums} ({dt:.1f} s)")
    result.times["total"] = round(time.perf_counter() - t0, 2)
    from ..cli.common import write_json

    write_json(outdir / "demo_report.json", result.to_dict())
    say(f"demo finished in {result.times['total']:.1f} s; report: {outdir / 'demo_report.json'}")
    return result


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
