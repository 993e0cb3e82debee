"""The engine on a real distributed cluster: a `dask scheduler` and `dask worker`
processes started on 127.0.0.1, connected by address.

Checks scheduler invariance (same answers as whole-array numpy/scipy) and
fault tolerance (a worker killed in the middle of a filter).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import cloudpickle
import dask.array as da
import numpy as np
import pytest
import scipy.fft
import scipy.ndimage as ndi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunkem.engine import spectral as sp
from chunkem.engine.cluster import compute, compute_session
from chunkem.ops.bin import bin_volume
from chunkem.ops.filter import gaussian_smooth, lowpass
from chunkem.volume import make_volume

from .strategies import chunked, volume_cases

pytestmark = pytest.mark.distributed

# test-module functions shipped to workers by value (workers cannot import tests/)
cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_worker(address: str, name: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-nanny",
         "--no-dashboard", "--host", "127.0.0.1", "--name", name, "--memory-limit", "1GB",
         "--death-timeout", "60"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def _stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    t0 = time.time()
    for p in procs:
        try:
            p.wait(timeout=max(0.1, 8 - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


@pytest.fixture(scope="module")
def cluster():
    """A scheduler and three single-threaded workers as separate processes."""
    from distributed import Client

    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    sched = subprocess.Popen(
        [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port),
         "--no-dashboard"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    # two workers for the tests, a third one ("victim") for the fault-tolerance test
    workers = [_start_worker(address, f"w{i}") for i in range(2)]
    victim = _start_worker(address, "victim")
    procs = [*workers, victim, sched]
    client = None
    try:
        client = Client(address, timeout="60s", set_as_default=False)
        client.wait_for_workers(3, timeout=90)
        yield {"address": address, "client": client, "victim": victim}
    finally:
        if client is not None:
            try:  # clean shutdown: the scheduler stops its workers, then itself
                client.shutdown()
            except Exception:
                client.close(timeout=10)
        _stop(procs)


def _lowpass_ref(a, vs, resolution):
    k = np.meshgrid(scipy.fft.fftfreq(a.shape[0], vs[0]), scipy.fft.fftfreq(a.shape[1], vs[1]),
                    scipy.fft.rfftfreq(a.shape[2], vs[2]), indexing="ij")
    s = np.sqrt(sum(x**2 for x in k))
    sc, w = 1.0 / resolution, 0.2 / resolution
    m = 0.5 * (1 + np.cos(np.pi * np.clip((s - (sc - w / 2)) / w, 0, 1)))
    return scipy.fft.irfftn(scipy.fft.rfftn(a.astype(np.float64)) * m, s=a.shape)


def test_connect_by_address_and_progress(cluster, capsys):
    a = np.random.default_rng(0).standard_normal((30, 26, 22)).astype(np.float32)
    vol = make_volume(a, voxel_size=(1.2, 1.0, 0.8)).chunk({"z": 7, "y": 13, "x": 9})
    with compute_session(scheduler=cluster["address"]) as s:
        assert s.kind == "address"
        workers = s.client.scheduler_info(n_workers=-1)["workers"]
        assert len(workers) >= 2 and all(w["nthreads"] == 1 for w in workers.values())
        lp, gs = compute(lowpass(vol, resolution=5.0), gaussian_smooth(vol, sigma=2.0), label="filters",
                         progress=True)
        client = s.client
    assert client.status == "closed"
    assert "100%" in capsys.readouterr().out  # distributed.progress bar
    np.testing.assert_allclose(lp.values, _lowpass_ref(a, (1.2, 1.0, 0.8), 5.0), atol=2e-5)
    np.testing.assert_array_equal(gs.values, ndi.gaussian_filter(a, (2 / 1.2, 2.0, 2 / 0.8), truncate=4.0))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=volume_cases(max_side=32), sigma=st.floats(0.5, 4.0),
       strategy=st.sampled_from(["gather", "slab"]))
def test_ops_equal_numpy_on_cluster(cluster, case, sigma, strategy):
    import dask

    vol = chunked(case)
    a, _, vs, _ = case
    with dask.config.set({"scheduler": cluster["client"], "chunkem.fft-slab-bytes": 8192}):
        spec = sp.rfft(vol, strategy=strategy)
        res = max(2.5 * max(vs), 3.0)
        lp, gs, bn, ss = compute(
            lowpass(vol, resolution=res, strategy=strategy),
            gaussian_smooth(vol, sigma=sigma),
            bin_volume(vol, factor=2, method="mean"),
            sp._shell_arrays(spec, None, False),
            progress=False,
        )
    np.testing.assert_allclose(lp.values, _lowpass_ref(a, vs, res), atol=3e-5 * np.abs(a).max())
    np.testing.assert_array_equal(gs.values, ndi.gaussian_filter(a, [sigma / v for v in vs], truncate=4.0))
    m = [n // 2 for n in a.shape]
    ref_bin = a[: 2 * m[0], : 2 * m[1], : 2 * m[2]].reshape(m[0], 2, m[1], 2, m[2], 2).mean(axis=(1, 3, 5))
    np.testing.assert_allclose(bn.values, ref_bin, rtol=1e-6, atol=1e-6)
    F = np.fft.rfftn(a.astype(np.float64))
    assert ss[2].sum() == pytest.approx(float((np.abs(F[sp.shell_index(*sp.frequencies(a.shape, vs), shape=a.shape, voxel_size=vs) >= 0]) ** 2).sum()), rel=1e-5)


def _kill_when_busy(client, vaddr: str, proc: subprocess.Popen, fut, *, held: int) -> None:
    """SIGKILL worker ``proc`` (address ``vaddr``) once it holds ``held`` results and ``fut`` is still running."""
    deadline = time.time() + 60
    n = 0
    while time.time() < deadline:
        n = len(client.has_what([vaddr]).get(vaddr, ()))
        if n >= held:
            break
        time.sleep(0.05)
    assert n >= held, "the victim worker never got any work"
    assert not fut.done()
    proc.kill()
    proc.wait(timeout=10)


def _slow_copy(block):
    time.sleep(0.25)
    return block.copy()


def test_worker_killed_mid_filter_gives_identical_result(cluster):
    """Kill a worker process (SIGKILL) while a multi-chunk filter runs: same answer."""
    from distributed import Client

    address = cluster["address"]
    a = np.random.default_rng(7).standard_normal((64, 64, 64)).astype(np.float32)
    src = da.from_array(a, chunks=16).map_blocks(_slow_copy, dtype=np.float32)  # 64 blocks, 0.25 s each
    vol = make_volume(src, voxel_size=(1.0, 1.1, 0.9))
    filtered = gaussian_smooth(vol, sigma=2.5)
    ref = ndi.gaussian_filter(a, (2.5, 2.5 / 1.1, 2.5 / 0.9), truncate=4.0)

    victim = cluster["victim"]
    with Client(address, timeout="30s", set_as_default=False) as client:
        vaddr = next(w for w, info in client.scheduler_info(n_workers=-1)["workers"].items()
                     if info["name"] == "victim")
        n_before = len(client.scheduler_info(n_workers=-1)["workers"])
        fut = client.compute(filtered.data)
        _kill_when_busy(client, vaddr, victim, fut, held=3)
        out = fut.result(timeout=120)
        remaining = client.scheduler_info(n_workers=-1)["workers"]
        assert vaddr not in remaining and len(remaining) == n_before - 1
    np.testing.assert_array_equal(out, ref)


def test_worker_killed_mid_disk_transpose_gives_identical_result(cluster):
    """SIGKILL a worker while a low-pass exchanges its slabs and pencils through scratch files: the
    lost tasks rerun (pieces are written atomically and kept), and the result is bit-identical to a
    clean run and equal to the whole-array numpy filter."""
    import dask
    from distributed import Client

    from chunkem.engine.transpose import clear_scratch

    address = cluster["address"]
    victim = _start_worker(address, "victim2")
    a = np.random.default_rng(11).standard_normal((48, 40, 44)).astype(np.float32)
    vs = (1.0, 1.2, 0.9)
    try:
        with Client(address, timeout="30s", set_as_default=False) as client:
            deadline = time.time() + 90
            while time.time() < deadline:  # until victim2 has joined
                vaddr = next((w for w, info in client.scheduler_info(n_workers=-1)["workers"].items()
                              if info["name"] == "victim2"), None)
                if vaddr is not None:
                    break
                time.sleep(0.2)
            assert vaddr is not None, "the extra worker did not join"
            with dask.config.set({"chunkem.fft-transpose": "disk", "chunkem.fft-disk-slab-bytes": 24_000}):
                def build(tag):  # distinct keys for each run
                    src = da.from_array(a, chunks=16, name=f"input-{tag}").map_blocks(_slow_copy, dtype=np.float32)
                    return lowpass(make_volume(src, voxel_size=vs), resolution=4.0, strategy="slab").data

                clean = client.compute(build("clean")).result(timeout=120)
                killed = build("killed")
                assert any(str(k).startswith("('disk-rechunk-") for k in dict(killed.__dask_graph__()))
                fut = client.compute(killed)
            _kill_when_busy(client, vaddr, victim, fut, held=2)
            out = fut.result(timeout=120)
            assert vaddr not in client.scheduler_info(n_workers=-1)["workers"]
    finally:
        _stop([victim])
        clear_scratch()
    np.testing.assert_array_equal(out, clean)
    np.testing.assert_allclose(out, _lowpass_ref(a, vs, 4.0), rtol=0, atol=2e-5 * np.abs(a).max())
