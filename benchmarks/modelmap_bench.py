#!/usr/bin/env python
"""Model-map rendering: chunkem vs gemmi ``DensityCalculatorE``, and a large scene into zarr.

Rows (one table):

1. **5me2 on the 100³ emd_3488 grid** (4468 atoms, 1.05 Å voxels): the
   Gaussian-sum density (electron tables, Refmac-compatible blur, cutoff
   1e-5) — gemmi ``put_model_density_on_grid`` vs chunkem
   :func:`chunkem.kernels.render.render_block` (one block, in process, one
   core), then the same as whole processes pinned to one core
   (``taskset -c 0``: start Python, read the model, render, write an MRC;
   ``/usr/bin/time`` wall and peak RSS). Plus the 3.2 Å model map (render,
   FFT, de-blur, cut): chunkem :func:`~chunkem.ops.modelmap.model_map` vs
   gemmi + ``scipy.fft`` on the same periodic box.
2. **A replicated ~100k-atom model on 400³** (copies of 5me2 on a lattice,
   1.05 Å voxels), in process: gemmi (one core), chunkem ``model_map``
   (``method="gaussian"``, 128³ tiles) on one core (dask synchronous
   scheduler) and on a 2-worker LocalCluster (1 thread each).
3. **A scene**: copies of 5me2 at random positions and orientations rendered
   by :func:`~chunkem.ops.scene.render_scene` (analytic images at d = 2 ×
   voxel) and streamed to a zarr store on a 2-worker LocalCluster; peak
   memory of the whole process tree vs the size of the volume. Default 10⁵
   atoms into 512³ (2 Å voxels); ``--scene-atoms 1e6 --scene-size 1024`` for
   the issue's 10⁶-atom / 1024³ run.

Times: wall seconds, and for in-process rows also the CPU seconds of this
process (``time.process_time``), the fairer per-core measure on a shared,
loaded machine; the load average is printed with the table.

Peak memory: ``ru_maxrss`` / ``/usr/bin/time`` for whole processes; for
in-process rows the growth of this process's RSS sampled every 20 ms
(psutil) over the run; for cluster rows the summed RSS of the process tree
(client + scheduler + workers). CC and scale are against gemmi on the same
grid: ``1 − CC``, scale = Σ chunkem·gemmi / Σ gemmi², and the largest
absolute difference over gemmi's peak.

Usage::

    python benchmarks/modelmap_bench.py
    python benchmarks/modelmap_bench.py --scene-atoms 1e6 --scene-size 1024
    python benchmarks/modelmap_bench.py --skip-big --scene-atoms 2e4 --scene-size 256   # quick
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
DATA = HERE.parent.parent / "shared" / "data" / "emd3488_haemoglobin"
PY = sys.executable


class PeakRSS:
    """Peak RSS (MB) of this process (and, with ``tree=True``, its children) sampled in a thread."""

    def __init__(self, tree: bool = False, interval: float = 0.02):
        import psutil

        self.proc = psutil.Process()
        self.tree = tree
        self.interval = interval
        self.base = self._rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> float:
        procs = [self.proc] + (self.proc.children(recursive=True) if self.tree else [])
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except Exception:  # a worker that just exited
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def cc_scale(a: np.ndarray, g: np.ndarray) -> tuple[float, float, float]:
    """Pearson CC, least-squares scale and max |a − g| / max |g|, in float64 slabs (no big copies)."""
    n = a.size
    s = np.zeros(5)
    dmax = gmax = 0.0
    for i in range(a.shape[0]):
        x = a[i].astype(np.float64).ravel()
        y = g[i].astype(np.float64).ravel()
        s += (x.sum(), y.sum(), x @ x, y @ y, x @ y)
        dmax = max(dmax, float(np.abs(x - y).max()))
        gmax = max(gmax, float(np.abs(y).max()))
    sx, sy, sxx, syy, sxy = s
    cov = sxy - sx * sy / n
    cc = cov / np.sqrt((sxx - sx * sx / n) * (syy - sy * sy / n))
    return float(cc), float(sxy / syy), dmax / gmax


def gemmi_density(structure, shape, vs, blur: float) -> np.ndarray:
    import gemmi

    dc = gemmi.DensityCalculatorE()
    dc.grid.set_unit_cell(gemmi.UnitCell(shape[2] * vs, shape[1] * vs, shape[0] * vs, 90, 90, 90))
    dc.grid.spacegroup = gemmi.SpaceGroup("P1")
    dc.grid.set_size(shape[2], shape[1], shape[0])
    dc.blur = blur
    dc.put_model_density_on_grid(structure[0])
    return np.array(dc.grid, copy=False).transpose(2, 1, 0)


def replicate(structure, n_copies: int, spacing: float):
    """A gemmi structure with ``n_copies`` translated copies of every chain (a cubic lattice)."""
    import gemmi

    st = structure.clone()
    model = st[0]
    chains = [ch.clone() for ch in structure[0]]
    k = int(np.ceil(n_copies ** (1 / 3)))
    lattice = [(i, j, m) for i in range(k) for j in range(k) for m in range(k)][:n_copies]
    for ch in list(model):
        model.remove_chain(ch.name)
    names = iter(f"{a}{b}" for a in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" for b in "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
    for (i, j, m) in lattice:
        shift = gemmi.Position(i * spacing, j * spacing, m * spacing)
        for ch in chains:
            c = ch.clone()
            c.name = next(names)
            for r in c:
                for a in r:
                    a.pos = a.pos + shift
            model.add_chain(c)
    st.setup_entities()
    return st


ROWS: list[dict] = []


def warm_up(session) -> None:
    """Import the renderer on every worker and run one tiny task graph (cluster start-up is not timed)."""
    import dask.array as da

    session.client.run(lambda: __import__("chunkem.ops.scene"))
    session.client.compute(da.ones((64, 64, 64), chunks=32).sum()).result()


def row(case: str, tool: str, mode: str, seconds: float, peak_mb: float | None, cc=None, scale=None,
        diff=None, cpu: float | None = None) -> None:
    ROWS.append(dict(case=case, tool=tool, mode=mode, seconds=seconds, peak_mb=peak_mb, cc=cc, scale=scale,
                     diff=diff, cpu=cpu))
    cpu_s = "" if cpu is None else f" (cpu {cpu:.2f} s)"
    print(f"  {case} | {tool} | {mode}: {seconds:.2f} s{cpu_s}, peak {peak_mb if peak_mb is None else round(peak_mb)} MB"
          + ("" if cc is None else f", 1-CC {1 - cc:.1e}, scale {scale:.6f}, max diff/peak {diff:.1e}"), flush=True)


def _whole_process(code: str) -> tuple[float, float]:
    """Run ``code`` in a fresh Python pinned to CPU 0; return (wall s, peak RSS MB)."""
    out = subprocess.run(["/usr/bin/time", "-f", "%e %M", "taskset", "-c", "0", PY, "-c", code],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    wall, kb = out.stderr.strip().splitlines()[-1].split()
    return float(wall), float(kb) / 1024


# --------------------------------------------------------------------------- 1. 5me2 on 100³
def bench_5me2(repeat: int, tmp: Path, whole: bool) -> None:
    import gemmi
    import scipy.fft

    from chunkem.io import open_map
    from chunkem.io.model import open_model
    from chunkem.kernels.render import Imaging, render_block
    from chunkem.kernels.scattering import refmac_blur
    from chunkem.ops.modelmap import atom_set, model_map

    em = open_map(DATA / "emd_3488.mrc").compute()
    shape, vs = em.shape, em.attrs["voxel_size"][0]
    m = open_model(DATA / "5me2.pdb")
    st = gemmi.read_structure(str(DATA / "5me2.pdb"))
    atoms = atom_set(m)
    blur = refmac_blur((vs,) * 3, float(atoms.b_iso.min()))
    case = f"5me2 ({len(m)} at.) 100³ gaussian"

    def best(fn):
        t, cpu, out = float("inf"), float("inf"), None
        for _ in range(repeat):
            with PeakRSS() as pk:
                t0, c0 = time.perf_counter(), time.process_time()
                out = fn()
                t, cpu = min(t, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
        return t, pk.peak - pk.base, out, cpu

    def gemmi_in_process():
        return gemmi_density(st, shape, vs, blur).copy()

    def chunkem_in_process():
        return render_block(shape, offset=(0.0, 0.0, 0.0), voxel_size=vs, atoms=atoms, imaging=Imaging(blur=blur))

    gemmi_in_process(), chunkem_in_process()  # warm caches and imports
    t, mem, g, cpu = best(gemmi_in_process)
    row(case, "gemmi", "in-process, 1 core", t, mem, cpu=cpu)
    t, mem, c, cpu = best(chunkem_in_process)
    row(case, "chunkem render_block", "in-process, 1 core", t, mem, *cc_scale(c, g), cpu=cpu)

    if whole:
        out_g, out_c = tmp / "g.mrc", tmp / "c.mrc"
        code_g = (
            "import gemmi, numpy as np\n"
            f"st = gemmi.read_structure({str(DATA / '5me2.pdb')!r})\n"
            "dc = gemmi.DensityCalculatorE()\n"
            f"dc.grid.set_unit_cell(gemmi.UnitCell({shape[2] * vs}, {shape[1] * vs}, {shape[0] * vs}, 90, 90, 90))\n"
            f"dc.grid.set_size({shape[2]}, {shape[1]}, {shape[0]}); dc.blur = {blur!r}\n"
            "dc.put_model_density_on_grid(st[0])\n"
            "ccp4 = gemmi.Ccp4Map(); ccp4.grid = dc.grid; ccp4.update_ccp4_header()\n"
            f"ccp4.write_ccp4_map({str(out_g)!r})\n"
        )
        code_c = (
            "import dask; dask.config.set(scheduler='synchronous')\n"
            "from chunkem.io import open_map, open_model, save\n"
            "from chunkem.ops.modelmap import model_map\n"
            f"em = open_map({str(DATA / 'emd_3488.mrc')!r})\n"
            f"mm = model_map(open_model({str(DATA / '5me2.pdb')!r}), like=em, method='gaussian', blur={blur!r})\n"
            f"save(mm, {str(out_c)!r}, progress=False)\n"
        )
        t, mem = _whole_process(code_g)
        row(case, "gemmi", "whole process, 1 core", t, mem)
        t, mem = _whole_process(code_c)
        cw = open_map(out_c).values
        row(case, "chunkem model_map", "whole process, 1 core", t, mem, *cc_scale(cw, g))

    # resolution-limited model map at 3.2 Å on the same periodic box
    d = 3.2
    case = "5me2 100³ model map d=3.2 Å"

    def gemmi_mm():
        rho = gemmi_density(st, shape, vs, blur)
        f = scipy.fft.rfftn(rho)
        kz = np.fft.fftfreq(shape[0], vs)[:, None, None]
        ky = np.fft.fftfreq(shape[1], vs)[None, :, None]
        kx = np.fft.rfftfreq(shape[2], vs)[None, None, :]
        s2 = kz**2 + ky**2 + kx**2
        f *= np.exp(blur * s2 / 4) * (s2 <= 1 / d**2)
        return scipy.fft.irfftn(f, s=shape)

    import dask

    t, mem, gm, cpu = best(gemmi_mm)
    row(case, "gemmi + scipy.fft", "in-process, 1 core", t, mem, cpu=cpu)
    with dask.config.set(scheduler="synchronous"):
        t, mem, cm, cpu = best(lambda: model_map(m, like=em, resolution=d, fft_padding=0).values)
    row(case, "chunkem model_map", "in-process, 1 core", t, mem, *cc_scale(cm, gm), cpu=cpu)


# --------------------------------------------------------------------------- 2. ~100k atoms on 400³
def bench_big(n_atoms: int, size: int) -> None:
    import dask
    import gemmi

    from chunkem.engine.cluster import compute_session
    from chunkem.io.model import model_from_structure
    from chunkem.kernels.scattering import refmac_blur
    from chunkem.ops.modelmap import model_map
    from chunkem.volume import make_volume

    base = gemmi.read_structure(str(DATA / "5me2.pdb"))
    n_base = sum(1 for ch in base[0] for r in ch for a in r)
    n_copies = max(1, round(n_atoms / n_base))
    vs = 1.05
    spacing = size * vs / int(np.ceil(n_copies ** (1 / 3)))
    st = replicate(base, n_copies, spacing)
    m = model_from_structure(st)
    shape = (size,) * 3
    blur = refmac_blur((vs,) * 3, float(m.b_iso.min()))
    case = f"{len(m)} atoms ({n_copies}x 5me2) {size}³ gaussian"

    with PeakRSS() as pk:
        t0, c0 = time.perf_counter(), time.process_time()
        g = gemmi_density(st, shape, vs, blur).copy()
        t, cpu = time.perf_counter() - t0, time.process_time() - c0
    row(case, "gemmi", "in-process, 1 core", t, pk.peak - pk.base, cpu=cpu)

    grid = make_volume(dask.array.zeros(shape, dtype=np.float32, chunks=128), voxel_size=vs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mm = model_map(m, like=grid, method="gaussian", blur=blur)
    with dask.config.set(scheduler="synchronous"), PeakRSS() as pk:
        t0, c0 = time.perf_counter(), time.process_time()
        c = mm.data.compute()
        t, cpu = time.perf_counter() - t0, time.process_time() - c0
    row(case, "chunkem model_map", "in-process, 1 core (synchronous)", t, pk.peak - pk.base, *cc_scale(c, g),
        cpu=cpu)
    del c
    with compute_session(cluster="local", workers=2, threads_per_worker=1) as session:
        warm_up(session)
        with PeakRSS(tree=True) as pk:
            t0 = time.perf_counter()
            c = session.client.compute(mm.data).result()
            t = time.perf_counter() - t0
    row(case, "chunkem model_map", "LocalCluster 2 workers x 1 thread", t, pk.peak, *cc_scale(c, g))


# --------------------------------------------------------------------------- 3. scene into zarr
def bench_scene(n_atoms: int, size: int, voxel: float, tmp: Path) -> None:
    from scipy.spatial.transform import Rotation

    from chunkem.engine.cluster import compute_session
    from chunkem.io import save
    from chunkem.io.model import open_model
    from chunkem.ops.scene import Particles, render_scene

    m = open_model(DATA / "5me2.pdb")
    n_copies = max(1, round(n_atoms / len(m)))
    rng = np.random.default_rng(0)
    extent = size * voxel
    xyz = rng.uniform(40.0, extent - 40.0, (n_copies, 3))
    rot = Rotation.random(n_copies, random_state=1).as_matrix()
    parts = Particles(xyz, rot)
    d = 2.0 * voxel
    vol = render_scene(m, parts, shape=(size,) * 3, voxel_size=voxel, resolution=d, chunks=128)
    gb = vol.size * 4 / 1e9
    case = f"scene {n_copies * len(m)} atoms ({n_copies}x) {size}³ -> zarr, d={d:g} Å ({gb:.2f} GB)"
    out = tmp / "scene.zarr"
    with compute_session(cluster="local", workers=2, threads_per_worker=1) as session:
        warm_up(session)
        with PeakRSS(tree=True) as pk:
            t0 = time.perf_counter()
            save(vol, out, progress=False)
            t = time.perf_counter() - t0
    row(case, "chunkem render_scene", "LocalCluster 2 workers x 1 thread", t, pk.peak)
    shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2, help="in-process timings: best of N (default 2)")
    ap.add_argument("--big-atoms", type=float, default=1e5, help="atoms of the replicated model (default 1e5)")
    ap.add_argument("--big-size", type=int, default=400, help="grid edge of the replicated model (default 400)")
    ap.add_argument("--scene-atoms", type=float, default=1e5, help="atoms in the scene (default 1e5)")
    ap.add_argument("--scene-size", type=int, default=512, help="scene edge in voxels (default 512)")
    ap.add_argument("--scene-voxel", type=float, default=2.0, help="scene voxel size in Å (default 2)")
    ap.add_argument("--skip-big", action="store_true", help="skip the replicated-model row")
    ap.add_argument("--skip-scene", action="store_true", help="skip the scene row")
    ap.add_argument("--no-whole-process", action="store_true", help="skip the whole-process rows")
    args = ap.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="modelmap_bench_") as td:
        tmp = Path(td)
        print("1. 5me2 on the emd_3488 grid", flush=True)
        bench_5me2(args.repeat, tmp, not args.no_whole_process)
        if not args.skip_big:
            print("2. replicated model", flush=True)
            bench_big(int(args.big_atoms), args.big_size)
        if not args.skip_scene:
            print("3. scene", flush=True)
            bench_scene(int(args.scene_atoms), args.scene_size, args.scene_voxel, tmp)
    head = (f"| {'case':<55} | {'tool':<21} | {'mode':<34} | {'time s':>7} | {'cpu s':>7} | {'peak MB':>7} "
            f"| {'1-CC vs gemmi':>13} | {'scale':>8} | {'max diff/peak':>14} |")
    print("\n" + head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in ROWS:
        cc = "" if r["cc"] is None else f"{1 - r['cc']:.1e}"
        sc = "" if r["scale"] is None else f"{r['scale']:.6f}"
        df = "" if r["diff"] is None else f"{r['diff']:.1e}"
        pk = "" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}"
        cp = "" if r["cpu"] is None else f"{r['cpu']:.2f}"
        print(f"| {r['case']:<55} | {r['tool']:<21} | {r['mode']:<34} | {r['seconds']:>7.2f} | {cp:>7} | {pk:>7} | "
              f"{cc:>13} | {sc:>8} | {df:>14} |")
    print(f"\n(load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}; 2 cores)")
    print(f"(total {time.perf_counter() - t0:.0f} s; in-process peaks are RSS growth during the run, cluster rows "
          "the whole process tree)")


if __name__ == "__main__":
    main()
