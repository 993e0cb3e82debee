"""engine.cluster: compute sessions, progress bars, SLURM job scripts, config."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import dask
import numpy as np
import pytest
import scipy.fft

from chunkem.engine import cluster as cl
from chunkem.errors import InputFileError, ParameterError
from chunkem.ops.filter import lowpass
from chunkem.volume import make_volume


def _lowpass_pair():
    a = np.random.default_rng(0).standard_normal((24, 20, 18)).astype(np.float32)
    v = make_volume(a, voxel_size=1.0).chunk(8)
    return a, lowpass(v, resolution=4.0, width=0.0)


def _lowpass_ref(a):
    k = np.meshgrid(scipy.fft.fftfreq(24), scipy.fft.fftfreq(20), scipy.fft.rfftfreq(18), indexing="ij")
    s = np.sqrt(sum(x**2 for x in k))
    m = np.where(s < 0.25, 1.0, np.where(s == 0.25, 0.5, 0.0))
    return scipy.fft.irfftn(scipy.fft.rfftn(a.astype(np.float64)) * m, s=a.shape)


def test_threads_session_and_progress_bar(capsys):
    a, lp = _lowpass_pair()
    with cl.compute_session(cluster="threads") as s:
        assert s.kind == "threads" and s.client is None
        assert dask.config.get("scheduler") == "threads"
        assert "threads" in s.describe()
        with dask.config.set({"chunkem.progress-minimum": 0, "chunkem.progress": True}):
            (out,) = cl.compute(lp, label="lowpass")
    err = capsys.readouterr().err
    assert "100%" in err and "lowpass" in err
    np.testing.assert_allclose(out.values, _lowpass_ref(a), atol=1e-5)
    # progress off: silent
    with cl.compute_session(cluster="threads"), dask.config.set({"chunkem.progress-minimum": 0}):
        cl.compute(lp, progress=False)
    assert "100%" not in capsys.readouterr().err


def test_auto_picks_threads_for_small_maps():
    with cl.compute_session(nbytes_hint=4 * 64**3) as s:
        assert s.kind == "threads"
    with dask.config.set({"chunkem.cluster": "threads"}), cl.compute_session(nbytes_hint=10**13) as s:
        assert s.kind == "threads"


def test_auto_large_map_starts_local_cluster_and_closes_it(capsys):
    a, lp = _lowpass_pair()
    with cl.compute_session(nbytes_hint=4 * 1024**3, workers=2, threads_per_worker=1, memory_limit="1GB") as s:
        assert s.kind == "local"
        info = s.client.scheduler_info(n_workers=-1)["workers"]
        assert len(info) == 2
        assert all(w["nthreads"] == 1 for w in info.values())
        assert all(w["memory_limit"] == 10**9 for w in info.values())
        assert cl.active_client() is s.client
        (out,) = cl.compute(lp, label="lowpass", progress=True)
        client = s.client
    assert client.status == "closed"
    assert cl.active_client() is None
    np.testing.assert_allclose(out.values, _lowpass_ref(a), atol=1e-5)
    # distributed.progress drew its bar
    assert "100%" in capsys.readouterr().out


def test_existing_client_is_reused_and_left_open():
    from distributed import Client, LocalCluster

    a, lp = _lowpass_pair()
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as lc, Client(lc) as c:
        with cl.compute_session() as s:
            assert s.kind == "existing" and s.client is c
            (out,) = cl.compute(lp, progress=False)
        assert c.status == "running"
        # an explicit kind wins over the user's client; graphs built there rechunk without P2P
        with cl.compute_session(cluster="threads") as s, dask.config.set({"chunkem.fft-slab-bytes": 4096}):
            assert s.kind == "threads" and cl.active_client() is None
            a2 = make_volume(a, voxel_size=1.0).chunk(8)
            (slab,) = cl.compute(lowpass(a2, resolution=4.0, width=0.0, strategy="slab"), progress=False)
        np.testing.assert_allclose(slab.values, _lowpass_ref(a), atol=1e-5)
    np.testing.assert_allclose(out.values, _lowpass_ref(a), atol=1e-5)


def test_worker_settings_cap_p2p_buffers():
    ws = cl.worker_settings({"n_workers": 2, "memory_limit": 2 * 10**9})
    assert ws["distributed.p2p.comm.buffer"] == 2 * 10**9 // 16
    assert ws["distributed.p2p.storage.buffer"] == 2 * 10**9 // 32
    big = cl.worker_settings({"n_workers": 1, "memory_limit": 10**12})
    assert big["distributed.p2p.comm.buffer"] == 2**30  # never above dask's default


def test_local_cluster_size_follows_machine():
    size = cl.local_cluster_size()
    n = os.cpu_count() or 1
    assert size["n_workers"] * size["threads_per_worker"] == (n if n <= 4 else (n // 2) * 2)
    assert cl.local_cluster_size(workers=3, threads_per_worker=2, memory_limit="2GB") == {
        "n_workers": 3, "threads_per_worker": 2, "memory_limit": 2 * 10**9}
    with pytest.raises(ParameterError):
        cl.local_cluster_size(memory_limit="lots")


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ParameterError, match="--cluster"):
        with cl.compute_session(cluster="cloud"):
            pass
    with dask.config.set({"chunkem.connect-timeout": "1s"}):
        with pytest.raises(ParameterError, match="cannot connect"):
            with cl.compute_session(scheduler="tcp://127.0.0.1:1"):
                pass


SLURM_YAML = textwrap.dedent(
    """\
    jobqueue:
      slurm:
        cores: 8
        processes: 2
        memory: 32GB
        queue: gpu
        account: myproj
        walltime: "02:00:00"
        job-extra-directives: ["--gres=gpu:1"]
        interface: lo
    """
)


def test_slurm_job_script_has_configured_resources(tmp_path):
    cfg = tmp_path / "slurm.yaml"
    cfg.write_text(SLURM_YAML)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Port 8787 is already in use": the dashboard has no fixed port
        c = cl.slurm_cluster(cfg)
    try:
        script = c.job_script()
        assert c.scheduler_spec["options"]["dashboard_address"] == ":0"
    finally:
        c.close()
    assert "#SBATCH -p gpu" in script
    assert "#SBATCH -A myproj" in script
    assert "#SBATCH --cpus-per-task=8" in script
    assert "#SBATCH --mem=30G" in script  # 32 GB in GiB, as dask-jobqueue writes it
    assert "#SBATCH -t 02:00:00" in script
    assert "#SBATCH --gres=gpu:1" in script
    assert "--nworkers 2" in script and "--nthreads 4" in script
    # CLI-style overrides: memory per job and threads per worker
    c = cl.slurm_cluster(cfg, memory_limit="64GB", threads_per_worker=3)
    try:
        script = c.job_script()
    finally:
        c.close()
    assert "--cpus-per-task=6" in script and "--mem=60G" in script and "--nthreads 3" in script


def test_slurm_config_layouts_and_errors(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("cores: 4\nmemory: 8GB\nqueue: short\njobs: 3\n")
    kw = cl.read_cluster_config(flat)
    assert kw == {"cores": 4, "memory": "8GB", "queue": "short", "jobs": 3}
    nested = tmp_path / "nested.yaml"
    nested.write_text("chunkem:\n  slurm:\n    cores: 2\n    job-extra-directives: ['--exclusive']\n")
    assert cl.read_cluster_config(nested) == {"cores": 2, "job_extra_directives": ["--exclusive"]}
    with pytest.raises(InputFileError):
        cl.read_cluster_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("queue: short\n")
    with pytest.raises(ParameterError, match="cores"):
        cl.slurm_cluster(bad)


def test_environment_variables_set_the_session():
    code = (
        "import chunkem.config as c\n"
        "from chunkem.engine.cluster import compute_session\n"
        "print(c.get('cluster'), c.get('chunks'))\n"
        "with compute_session() as s: print(s.kind, s.info.get('num_workers'))\n"
    )
    env = dict(os.environ, DASK_CHUNKEM__CLUSTER="threads", DASK_CHUNKEM__CHUNKS="64",
               DASK_CHUNKEM__THREADS_PER_WORKER="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["threads", "64", "threads", "1"]


def test_deploy_slurm_yaml_makes_a_job_script(tmp_path, monkeypatch):
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[2] / "deploy" / "slurm" / "chunkem-slurm.yaml"
    monkeypatch.chdir(tmp_path)  # the config's relative log-directory is made here, not in the checkout
    kw = cl.read_cluster_config(cfg)
    assert kw["jobs"] == 2
    c = cl.slurm_cluster(cfg, interface="lo")  # ib0 does not exist here
    try:
        script = c.job_script()
    finally:
        c.close()
    for line in ("#SBATCH -p cpu", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=30G", "#SBATCH -t 04:00:00",
                 "#SBATCH --exclusive", "source /path/to/venv/bin/activate"):
        assert line in script
    assert "--nworkers 2" in script and "--local-directory /tmp" in script


def test_memory_budget_on_a_cluster(two_worker_client):
    from chunkem.engine.cluster import fits_in_memory, memory_budget

    limits = [w["memory_limit"] for w in two_worker_client.scheduler_info(n_workers=-1)["workers"].values()]
    assert memory_budget() == sum(limits)
    assert fits_in_memory(sum(limits) // 5) and not fits_in_memory(sum(limits) // 3)


def test_memory_budget_on_threads():
    import psutil

    from chunkem.engine.cluster import memory_budget

    avail = psutil.virtual_memory().available
    assert abs(memory_budget() - avail) < 0.2 * avail
