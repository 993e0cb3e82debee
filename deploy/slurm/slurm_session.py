"""chunkem from Python on a SLURM cluster, two ways.

1. Let chunkem start the cluster from the YAML file (compute_session).
2. Make your own dask-jobqueue cluster and Client: chunkem uses the active
   Client for everything it computes.

Run on a login node (or inside a small batch job):  python slurm_session.py
"""

from pathlib import Path

from chunkem.engine.cluster import compute_session, slurm_cluster
from chunkem.io import open_map, save
from chunkem.ops.filter import lowpass

HERE = Path(__file__).resolve().parent
IN = "/shared/project/tomo.mrc"


def with_chunkem_session():
    # starts 4 SLURM jobs from the YAML, closes them when the block ends
    with compute_session(cluster="slurm", cluster_config=HERE / "chunkem-slurm.yaml", workers=4) as session:
        print("computing on", session.describe())
        vol = open_map(IN, chunks=256)              # lazy
        save(lowpass(vol, resolution=20.0), "/shared/project/tomo_lp20.zarr")


def with_your_own_client():
    from dask.distributed import Client

    cluster = slurm_cluster(HERE / "chunkem-slurm.yaml")   # or dask_jobqueue.SLURMCluster(...)
    print(cluster.job_script())                              # what will be submitted
    cluster.scale(jobs=4)
    with Client(cluster):                                    # becomes the default client
        vol = open_map(IN, chunks=256)
        save(lowpass(vol, resolution=20.0), "/shared/project/tomo_lp20.zarr")  # runs on the SLURM workers
    cluster.close()


if __name__ == "__main__":  # needed: dask may spawn processes that re-import this file
    with_chunkem_session()
