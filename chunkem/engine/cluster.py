"""Where computations run: the compute session and progress-reporting compute.

One context manager, :func:`compute_session`, gives every verb and script the
same choices:

``scheduler="tcp://host:8786"``
    connect a :class:`distributed.Client` to an existing scheduler;
``cluster="threads"``
    dask's threaded scheduler in this process (no extra processes, lowest
    overhead; best for maps that fit comfortably in memory);
``cluster="local"``
    an embedded :class:`distributed.LocalCluster` started in-process with one
    worker process per core (``threads_per_worker`` 1 on machines with at most
    4 cores, else 2) and the machine's memory split evenly between workers;
    workers spill to disk, so maps larger than memory stream through;
``cluster="slurm"``
    a ``dask_jobqueue.SLURMCluster`` built from a YAML file (see
    :func:`slurm_cluster` and ``deploy/slurm``);
``cluster="auto"`` (default)
    the embedded default: ``threads`` when the map has fewer voxels than the
    ``chunkem.threads-max-voxels`` setting (512³), else ``local``.

If a :class:`distributed.Client` is already active in the process (the user
made one in their own dask session) and neither ``scheduler`` nor an explicit
cluster kind is requested, it is reused and left open.

Defaults come from the ``chunkem.*`` dask.config settings (see
:mod:`chunkem.config`), e.g. ``DASK_CHUNKEM__SCHEDULER=tcp://host:8786``.

Rechunking (the transposes of the slab FFT) uses dask's task-based method
inside sessions made here (``chunkem.rechunk-method``, default ``"tasks"``;
``"p2p"`` or ``"auto"`` to let dask choose): on workers with a few GB its
data is managed and spilled by the scheduler, whereas P2P's transfer buffers
count as unmanaged memory and got small workers killed in our measurements.
The embedded LocalCluster also caps the P2P buffers (:func:`worker_settings`).

:func:`compute` is ``dask.compute`` with a progress bar that works on either
kind of scheduler (``dask.diagnostics.ProgressBar`` on threads,
``distributed.progress`` on a Client).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.config

from .. import config
from ..errors import InputFileError, ParameterError

__all__ = [
    "Session",
    "compute_session",
    "compute",
    "persist",
    "active_client",
    "slurm_cluster",
    "read_cluster_config",
    "local_cluster_size",
    "worker_settings",
]

KINDS = ("auto", "threads", "local", "slurm")


@dataclass
class Session:
    """A compute session made by :func:`compute_session`.

    Attributes
    ----------
    kind
        ``"threads"``, ``"local"``, ``"address"``, ``"slurm"`` or
        ``"existing"`` (a Client the caller had already made).
    client
        The :class:`distributed.Client`, or None on the threaded scheduler.
    cluster
        The cluster object started here (LocalCluster, SLURMCluster), if any.
    """

    kind: str
    client: Any = None
    cluster: Any = None
    info: dict = field(default_factory=dict)

    def describe(self) -> str:
        """One line saying where computations run."""
        if self.client is None:
            n = self.info.get("num_workers") or os.cpu_count()
            return f"threads (dask threaded scheduler, {n} threads)"
        try:
            addr = self.client.scheduler.address
        except Exception:  # pragma: no cover - closed client
            addr = "?"
        try:
            nw = len(self.client.scheduler_info(n_workers=-1).get("workers", {}))
        except TypeError:  # older distributed
            nw = len(self.client.scheduler_info().get("workers", {}))
        except Exception:  # pragma: no cover
            nw = "?"
        return f"{self.kind} (scheduler {addr}, {nw} workers)"

    def to_dict(self) -> dict:
        """JSON-ready summary for reports."""
        return {"kind": self.kind, "description": self.describe(), **self.info}


def _parse_bytes(value: Any) -> int | None:
    if value in (None, "auto"):
        return None
    from dask.utils import parse_bytes

    try:
        return int(parse_bytes(value))
    except Exception:
        raise ParameterError(f"--memory-limit: cannot read {value!r} as a memory size (e.g. 4GB)") from None


def local_cluster_size(
    *, workers: int | None = None, threads_per_worker: int | None = None, memory_limit: Any = None
) -> dict:
    """Worker layout of the embedded LocalCluster for this machine.

    One process per core with one thread each on machines with at most 4
    cores (2 threads each above that); memory split evenly between workers
    unless ``memory_limit`` (per worker) is given.
    """
    ncores = os.cpu_count() or 1
    tpw = int(threads_per_worker or (1 if ncores <= 4 else 2))
    if tpw < 1:
        raise ParameterError(f"--threads-per-worker must be at least 1, got {tpw}")
    nw = int(workers or max(1, ncores // tpw))
    if nw < 1:
        raise ParameterError(f"--workers must be at least 1, got {nw}")
    mem = _parse_bytes(memory_limit)
    return {"n_workers": nw, "threads_per_worker": tpw, "memory_limit": mem if mem is not None else "auto"}


def worker_settings(size: dict) -> dict:
    """dask.config settings for workers of ``size`` (see :func:`local_cluster_size`).

    P2P rechunking (the all-to-all transposes of the slab FFT) buffers up to
    1 GiB per worker in memory by default, more than a small worker holds:
    cap the send buffer at 1/16 and the disk-write buffer at 1/32 of the
    worker memory limit, so that big maps stream through bounded memory.
    """
    mem = size.get("memory_limit")
    if mem in (None, "auto"):
        try:
            import psutil

            total = psutil.virtual_memory().total
        except ImportError:  # pragma: no cover
            return {}
        mem = total // max(1, int(size.get("n_workers") or 1))
    mem = int(mem)
    return {
        "distributed.p2p.comm.buffer": int(min(2**30, max(16 * 2**20, mem // 16))),
        "distributed.p2p.storage.buffer": int(min(100 * 2**20, max(8 * 2**20, mem // 32))),
    }


def read_cluster_config(path: str | os.PathLike) -> dict:
    """Read a SLURM cluster YAML file into ``SLURMCluster`` keyword arguments.

    Accepted layouts: dask-jobqueue's own config (``jobqueue: slurm: {...}``),
    ``slurm: {...}``, ``chunkem: slurm: {...}``, or a flat mapping. Dashes in
    keys become underscores (``job-extra-directives`` → ``job_extra_directives``).
    The extra key ``jobs`` is the number of jobs to start.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"{p}: cluster config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputFileError(f"{p}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise InputFileError(f"{p}: expected a mapping of SLURM settings")
    for key in ("chunkem", "jobqueue"):
        if isinstance(data.get(key), dict):
            data = data[key]
    if isinstance(data.get("slurm"), dict):
        data = data["slurm"]
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def slurm_cluster(
    cluster_config: str | os.PathLike | None = None,
    *,
    workers: int | None = None,
    memory_limit: str | None = None,
    threads_per_worker: int | None = None,
    scale: bool = False,
    **overrides: Any,
):
    """A ``dask_jobqueue.SLURMCluster`` from the chunkem config and a YAML file.

    Parameters
    ----------
    cluster_config
        YAML file (see :func:`read_cluster_config`); settings in it override
        the ``chunkem.slurm`` config mapping.
    workers
        Number of SLURM jobs to start (each with ``processes`` workers).
    memory_limit
        Memory per job (``memory`` in SLURMCluster terms), e.g. ``"16GB"``.
    threads_per_worker
        Threads per worker process: sets ``cores = processes * threads``.
    scale
        Submit the jobs now (``cluster.scale(jobs=...)``).
    overrides
        Any other ``SLURMCluster`` keyword.

    Returns
    -------
    dask_jobqueue.SLURMCluster
        Its ``job_script()`` shows the batch script that will be submitted.
    """
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:  # pragma: no cover
        raise ParameterError("--cluster slurm needs the dask-jobqueue package") from None
    kwargs = {str(k).replace("-", "_"): v for k, v in dict(config.get("slurm") or {}).items()}
    if cluster_config is not None:
        kwargs.update(read_cluster_config(cluster_config))
    kwargs.update(overrides)
    jobs = kwargs.pop("jobs", None)
    if workers:
        jobs = int(workers)
    if memory_limit and memory_limit != "auto":
        kwargs["memory"] = memory_limit
    if threads_per_worker:
        kwargs["cores"] = int(kwargs.get("processes") or 1) * int(threads_per_worker)
    for need in ("cores", "memory"):
        if need not in kwargs and dask.config.get(f"jobqueue.slurm.{need}", None) is None:
            raise ParameterError(
                f"--cluster slurm: the cluster config must give '{need}' "
                "(see deploy/slurm/chunkem-slurm.yaml)"
            )
    kwargs.setdefault("silence_logs", "error")
    # the dashboard as for the local cluster: the configured address, else no fixed port (several sessions may
    # share a login node)
    options = dict(kwargs.get("scheduler_options") or {})
    options.setdefault("dashboard_address", config.get("dashboard", None) or ":0")
    kwargs["scheduler_options"] = options
    cluster = SLURMCluster(**kwargs)
    if scale:
        cluster.scale(jobs=int(jobs or 1))
    return cluster


def active_client():
    """The distributed Client that ``dask.compute`` would use now, or None."""
    if "distributed" not in sys.modules:
        return None
    from distributed import Client, default_client

    sched = dask.config.get("scheduler", None)
    if isinstance(sched, Client):
        return sched if sched.status in ("running", "connecting", "newly-created") else None
    if sched is not None and sched not in ("dask.distributed", "distributed"):
        return None

    try:
        return default_client()
    except ValueError:
        return None


def worker_info() -> list[dict]:
    """Scheduler records of the active cluster's workers (``[]`` on threads or when unknown)."""
    client = active_client()
    if client is None:
        return []
    try:
        return list(client.scheduler_info(n_workers=-1)["workers"].values())
    except TypeError:  # pragma: no cover - older distributed
        return list(client.scheduler_info()["workers"].values())
    except Exception:  # pragma: no cover
        return []


def _rechunk_settings() -> dict:
    """``array.rechunk.method`` from the ``chunkem.rechunk-method`` setting ("auto": dask decides)."""
    method = config.get("rechunk-method", "tasks")
    return {} if method in (None, "auto") else {"array.rechunk.method": method}


@contextlib.contextmanager
def _client_session(kind: str, client, cluster=None, info=None) -> Iterator[Session]:
    # the Client was made with set_as_default=True: dask.compute uses it. (Do not put the
    # Client object itself into dask.config: nannies pickle the config into restarted workers.)
    try:
        with dask.config.set(_rechunk_settings()):
            yield Session(kind, client, cluster, dict(info or {}))
    finally:
        with contextlib.suppress(Exception):
            client.close(timeout=10)
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close(timeout=10)


@contextlib.contextmanager
def compute_session(
    *,
    scheduler: str | None = None,
    cluster: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    memory_limit: str | None = None,
    cluster_config: str | None = None,
    nbytes_hint: int | None = None,
) -> Iterator[Session]:
    """Context manager giving the compute session asked for.

    Parameters
    ----------
    scheduler
        Address of an existing scheduler (``tcp://host:8786``); overrides
        ``cluster``. Default: ``chunkem.scheduler`` setting.
    cluster
        ``"auto"`` | ``"threads"`` | ``"local"`` | ``"slurm"`` (see the module
        notes). Default: ``chunkem.cluster`` setting (``"auto"``).
    workers
        Worker processes (``local``) or jobs (``slurm``).
    threads_per_worker
        Threads per worker (``local``, ``slurm``) or size of the thread pool
        (``threads``).
    memory_limit
        Memory per worker (e.g. ``"4GB"``); ``local`` default splits the
        machine's memory evenly.
    cluster_config
        YAML file for ``slurm``.
    nbytes_hint
        Size of the map in bytes, used by ``"auto"``.

    Yields
    ------
    Session
        Inside the block ``dask.compute`` (and :func:`compute`) run there.
        Clients and clusters started here are closed on exit; an existing
        Client is left alone. Scratch files that out-of-core FFT transposes
        wrote during the session (:mod:`chunkem.engine.transpose`) are removed
        on exit.

    Examples
    --------
    >>> with compute_session(cluster="threads") as s:
    ...     s.kind
    'threads'
    """
    from .transpose import clear_scratch, scratch_dirs

    keep = len(scratch_dirs())
    try:
        with _open_session(scheduler=scheduler, cluster=cluster, workers=workers,
                           threads_per_worker=threads_per_worker, memory_limit=memory_limit,
                           cluster_config=cluster_config, nbytes_hint=nbytes_hint) as session:
            yield session
    finally:
        clear_scratch(keep)  # scratch files of out-of-core FFT transposes made in this session


@contextlib.contextmanager
def _open_session(*, scheduler, cluster, workers, threads_per_worker, memory_limit, cluster_config,
                  nbytes_hint) -> Iterator[Session]:
    scheduler = scheduler or config.get("scheduler")
    explicit_kind = cluster is not None
    kind = cluster or config.get("cluster") or "auto"
    if kind not in KINDS:
        raise ParameterError(f"--cluster must be one of {', '.join(KINDS)}, got {kind!r}")
    workers = workers if workers is not None else config.get("workers")
    threads_per_worker = threads_per_worker if threads_per_worker is not None else config.get("threads-per-worker")
    memory_limit = memory_limit if memory_limit is not None else config.get("memory-limit")

    if scheduler:
        from distributed import Client

        try:
            client = Client(str(scheduler), timeout=config.get("connect-timeout", "20s"), set_as_default=True)
        except (OSError, TimeoutError) as exc:
            raise ParameterError(f"--scheduler {scheduler}: cannot connect ({exc})") from None
        with _client_session("address", client, info={"scheduler": str(scheduler)}) as s:
            yield s
        return

    if not explicit_kind or kind == "auto":
        existing = active_client()
        if existing is not None:
            yield Session("existing", existing)
            return

    if kind == "auto":
        limit = int(config.get("threads-max-voxels", 512**3))
        kind = "threads" if nbytes_hint is None or nbytes_hint // 4 < limit else "local"

    if kind == "threads":
        # "tasks" rechunking always: dask would pick P2P (distributed-only) when some Client exists
        settings: dict[str, Any] = {"scheduler": "threads", "array.rechunk.method": "tasks"}
        info: dict[str, Any] = {}
        if threads_per_worker:
            settings["num_workers"] = int(threads_per_worker)
            info["num_workers"] = int(threads_per_worker)
        with dask.config.set(settings):
            yield Session("threads", None, None, info)
        return

    from distributed import Client

    if kind == "local":
        from distributed import LocalCluster

        size = local_cluster_size(workers=workers, threads_per_worker=threads_per_worker, memory_limit=memory_limit)
        with dask.config.set(worker_settings(size)):  # passed on to the worker processes
            dash = config.get("dashboard", None)
            lc = LocalCluster(
                processes=True,
                dashboard_address=dash or ":0",  # no fixed port: several sessions may run at once
                scheduler_kwargs=None if dash else {"dashboard": False},
                silence_logs=logging.ERROR,
                **size,
            )
        client = Client(lc, set_as_default=True)
        with _client_session("local", client, lc, info=size) as s:
            yield s
        return

    # slurm
    sc = slurm_cluster(
        cluster_config, workers=workers, memory_limit=memory_limit, threads_per_worker=threads_per_worker,
        scale=True,
    )
    client = Client(sc, set_as_default=True)
    with _client_session("slurm", client, sc, info={"cluster_config": str(cluster_config)}) as s:
        yield s


def _threads_bar(label: str = ""):
    """A ``dask.diagnostics.ProgressBar`` on stderr, prefixed with ``label``.

    It appears only for computations longer than ``chunkem.progress-minimum`` s.
    """
    from dask.diagnostics import ProgressBar

    class _LabelledBar(ProgressBar):
        def _draw_bar(self, frac, elapsed):  # noqa: D401 - dask hook
            from dask.utils import format_time

            bar = "#" * int(self._width * frac)
            msg = f"\r{label + ' ' if label else ''}[{bar:<{self._width}}] | {int(100 * frac)}% | {format_time(elapsed)}"
            with contextlib.suppress(ValueError):
                if self._file is not None:
                    self._file.write(msg)
                    self._file.flush()

    return _LabelledBar(minimum=float(config.get("progress-minimum", 1.0)), out=sys.stderr)


def _show(progress: bool | None) -> bool:
    return bool(config.get("progress", True) if progress is None else progress)


def compute(*collections: Any, progress: bool | None = None, label: str = "", **kwargs: Any) -> tuple:
    """``dask.compute`` with a progress bar suited to the active scheduler.

    Parameters
    ----------
    collections
        dask collections (dask arrays, xarray objects, delayed); anything else
        is passed through.
    progress
        Show a progress bar (default: the ``chunkem.progress`` setting).
        On threads it goes to stderr after ``chunkem.progress-minimum``
        seconds; on a distributed Client ``distributed.progress`` is used.
    label
        Printed (stderr) before the bar.

    Returns
    -------
    tuple
        One computed result per collection.
    """
    show = _show(progress)
    client = active_client()
    if client is not None:
        futures = client.compute(list(collections), **kwargs)
        if show:
            if label:
                print(f"chunkem: {label}", file=sys.stderr, flush=True)
            from distributed import progress as dprogress

            with contextlib.suppress(Exception):
                dprogress(futures, notebook=False)
        return tuple(client.gather(futures))
    if not show:
        return dask.compute(*collections, **kwargs)
    with _threads_bar(label):
        return dask.compute(*collections, **kwargs)


def memory_budget() -> int:
    """Bytes of memory the active compute can hold results in.

    The sum of the workers' memory limits on a distributed cluster, else
    (threaded scheduler, or workers without limits) the memory available
    to this process.
    """
    import psutil

    total = sum(int(w.get("memory_limit") or 0) for w in worker_info())
    if total > 0:
        return total
    return int(psutil.virtual_memory().available)


def fits_in_memory(nbytes: int, fraction: float = 0.25) -> bool:
    """Whether ``nbytes`` of intermediate results fit in ``fraction`` of :func:`memory_budget`.

    Ops use it to decide whether to persist an intermediate that several
    passes read (then computed once) or to recompute it per pass (bounded
    memory, out of core).
    """
    return int(nbytes) <= fraction * memory_budget()


def persist(*collections: Any, progress: bool | None = None, label: str = "", **kwargs: Any) -> tuple:
    """``dask.persist`` with a progress bar (see :func:`compute`)."""
    show = _show(progress)
    client = active_client()
    if client is not None:
        out = client.persist(list(collections), **kwargs)
        if show:
            if label:
                print(f"chunkem: {label}", file=sys.stderr, flush=True)
            from distributed import progress as dprogress

            with contextlib.suppress(Exception):
                dprogress(out, notebook=False)
        return tuple(out)
    if not show:
        return dask.persist(*collections, **kwargs)
    with _threads_bar(label):
        return dask.persist(*collections, **kwargs)
