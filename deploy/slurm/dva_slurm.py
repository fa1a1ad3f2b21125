"""Run a dva command on GPU workers that dask-jobqueue submits as SLURM jobs.

    python deploy/slurm/dva_slurm.py --jobs 8 run STORE.zarr --mask MASK.mrc --filter-res 8 --out RUN

Run it on a login node (it holds the scheduler and dva's driver for the whole run, so use
`tmux`/`screen` or a small CPU job), in the environment where dva and dask-jobqueue are installed
(`pip install -e ".[cuda12,slurm]"`). Every job runs one `dask cuda worker` on one GPU, as
`jobqueue.yaml` beside this file says; the jobs are cancelled when the command ends. `--dry-run`
prints the job script and the dva command and submits nothing.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import dask.config
import yaml
from dask_jobqueue import SLURMCluster
from distributed import Client

CONFIG = Path(__file__).with_name("jobqueue.yaml")


def load_config(path: Path = CONFIG) -> None:
    """Merge a dask config file into dask's config, as dask does with `~/.config/dask/*.yaml`.

    Global on purpose: jobs that `scale` submits later read the config again."""
    with open(path) as f:
        dask.config.update(dask.config.config, yaml.safe_load(f), priority="new")


def make_cluster(path: Path = CONFIG, **kwargs) -> SLURMCluster:
    """A `SLURMCluster` from the settings in `path`; `kwargs` override them."""
    load_config(path)
    return SLURMCluster(**kwargs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, required=True, help="SLURM jobs, one GPU worker each")
    parser.add_argument("--config", type=Path, default=CONFIG, help="dask-jobqueue settings (default: %(default)s)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the job script and the dva command; submit nothing"
    )
    parser.add_argument("dva_args", nargs=argparse.REMAINDER, help="the dva command and its options")
    args = parser.parse_args(argv)
    if not args.dva_args:
        parser.error("give the dva command to run, e.g. run STORE.zarr --mask MASK.mrc --filter-res 8 --out RUN")

    with make_cluster(args.config) as cluster:
        command = ["dva", *args.dva_args, "--scheduler", cluster.scheduler_address]
        if args.dry_run:
            print(cluster.job_script())
            print(shlex.join(command))
            return 0
        with Client(cluster) as client:
            cluster.scale(jobs=args.jobs)
            print(f"dask dashboard: {cluster.dashboard_link}; waiting for {args.jobs} workers", file=sys.stderr)
            # Chunks are dealt to the workers present when dva starts: wait for all of them.
            client.wait_for_workers(args.jobs)
            return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
