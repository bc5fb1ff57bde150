"""The run launcher of the single-machine instances (local, local-cluster, openstack, aws):
Dagster's ``DefaultRunLauncher``, plus the worker health check that run monitoring needs.

``DefaultRunLauncher`` cannot tell whether a run's process still lives, so a run worker killed
together with its code server (``kill -9``, OOM killer, a reboot) stays ``STARTED`` forever and
holds a slot of the run queue. Every run worker records where it runs (host, PID and process
start time, a run tag written by :class:`~gaia_flows.resources.storage.StorageResource`), and
the monitoring daemon asks this launcher whether that process is still the one that started.
"""

from __future__ import annotations

import json
import os
import socket

import psutil
from dagster import DagsterRun, DefaultRunLauncher
from dagster._core.launcher import CheckRunHealthResult, WorkerStatus

RUN_WORKER_TAG = "gaia_flows/run_worker"


def run_worker_tag() -> dict[str, str]:
    """The tag a run worker writes about itself."""
    me = psutil.Process(os.getpid())
    return {
        RUN_WORKER_TAG: json.dumps({"host": socket.gethostname(), "pid": me.pid, "started": me.create_time()})
    }


def run_worker_health(run: DagsterRun) -> CheckRunHealthResult:
    """RUNNING while the recorded process lives; FAILED once it is gone (or its PID was reused).
    A run without the tag, or whose worker runs on another host, cannot be judged here: it is
    reported RUNNING and left to ``run_monitoring.max_runtime_seconds``."""
    recorded = run.tags.get(RUN_WORKER_TAG)
    if not recorded:
        return CheckRunHealthResult(WorkerStatus.RUNNING, "no run worker recorded yet")
    worker = json.loads(recorded)
    if worker["host"] != socket.gethostname():
        return CheckRunHealthResult(WorkerStatus.RUNNING, f"run worker on another host ({worker['host']})")
    try:
        alive = abs(psutil.Process(worker["pid"]).create_time() - worker["started"]) < 1.0
    except psutil.NoSuchProcess:
        alive = False
    if alive:
        return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=str(worker["pid"]))
    return CheckRunHealthResult(
        WorkerStatus.FAILED,
        f"run worker process {worker['pid']} on {worker['host']} is gone",
        run_worker_id=str(worker["pid"]),
    )


class LocalRunLauncher(DefaultRunLauncher):
    """``DefaultRunLauncher`` whose runs the monitoring daemon can check (see the module doc)."""

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        return run_worker_health(run)
