"""What a run read, wrote and waited for: Spark stage IO for a job group, from the driver's
monitoring REST API, and the figures Python tasks measure themselves (:func:`timed_task`).

Every Spark-backed asset reports what its stages and Python tasks read, wrote, shuffled and
spilled, and how the tasks spent their time, so a bottleneck shows in the Dagster UI next to
the row counts, and ``gaia-flows diagnose`` can name it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from pyspark.accumulators import Accumulator, AccumulatorParam
from pyspark.sql import SparkSession

LOG = logging.getLogger(__name__)
FIELDS = {
    "inputBytes": "input_bytes",
    "inputRecords": "input_records",
    "outputBytes": "output_bytes",
    "shuffleReadBytes": "shuffle_read_bytes",
    "shuffleWriteBytes": "shuffle_write_bytes",
    "memoryBytesSpilled": "memory_spilled_bytes",
    "diskBytesSpilled": "disk_spilled_bytes",
    "executorRunTime": "executor_run_ms",
    "executorCpuTime": "executor_cpu_ns",
}


def _get(url: str) -> list | dict:
    # The first request of an application starts the UI's REST layer: 3 s on an idle machine.
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310 - driver UI on loopback
        return json.loads(response.read())


# Per executor of a stage (the REST API's ExecutorStageSummary), summed per executor host.
EXECUTOR_FIELDS = {
    "inputBytes": "input_bytes",
    "outputBytes": "output_bytes",
    "shuffleRead": "shuffle_read_bytes",
    "shuffleWrite": "shuffle_write_bytes",
    "memoryBytesSpilled": "memory_spilled_bytes",
    "diskBytesSpilled": "disk_spilled_bytes",
    "taskTime": "task_ms",
    "succeededTasks": "tasks",
}


SETTLE_SECONDS = 10.0


def run_job_group(table: str, run_id: str) -> str:
    """The Spark job group of one run's work on ``table``: per run, so that :func:`stage_io`
    never adds up an earlier run's stages on a session that outlives runs."""
    return f"{table}-{run_id}"


def stage_io(spark: SparkSession, job_group: str) -> dict:
    """Totals over the completed stages of ``job_group``, and the same per executor host
    (``per_host``); empty when the Spark UI is off."""
    sc = spark.sparkContext
    base = sc.uiWebUrl
    if not base:
        return {}
    api = f"{base}/api/v1/applications/{sc.applicationId}"
    try:
        # The UI's store learns of the last stage's end shortly after the action returns.
        deadline = time.monotonic() + SETTLE_SECONDS
        while True:
            jobs = [j for j in _get(f"{api}/jobs") if j.get("jobGroup") == job_group]
            wanted = {s for j in jobs for s in j.get("stageIds", [])}
            listed = [s for s in _get(f"{api}/stages") if s["stageId"] in wanted]
            settled = all(j.get("status") != "RUNNING" for j in jobs) and not any(
                s.get("status") in ("ACTIVE", "PENDING") for s in listed
            )
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        stages = [s for s in listed if s.get("status") == "COMPLETE"]
        hosts = {e["id"]: e["hostPort"].rsplit(":", 1)[0] for e in _get(f"{api}/allexecutors")}
        summaries = [
            _get(f"{api}/stages/{s['stageId']}/{s['attemptId']}").get("executorSummary", {}) for s in stages
        ]
    except OSError as exc:
        LOG.warning("Spark stage figures of %s unavailable: %s at %s", job_group, exc, api)
        return {}
    totals: dict = {name: sum(int(s.get(key, 0)) for s in stages) for key, name in FIELDS.items()}
    totals["stages"] = len(stages)
    per_host: dict[str, dict[str, int]] = {}
    for summary in summaries:
        for executor, figures in summary.items():
            host = per_host.setdefault(
                hosts.get(executor, executor), dict.fromkeys(EXECUTOR_FIELDS.values(), 0)
            )
            for key, name in EXECUTOR_FIELDS.items():
                host[name] += int(figures.get(key, 0))
    if per_host:
        totals["per_host"] = dict(sorted(per_host.items()))
    return totals


# --- Python tasks ------------------------------------------------------------------------------


class _Records(AccumulatorParam):
    """Lists of task records, concatenated."""

    def zero(self, value: list) -> list:
        return []

    def addInPlace(self, value1: list, value2: list) -> list:  # noqa: N802 - PySpark's name
        value1.extend(value2)
        return value1


def task_records(spark: SparkSession) -> Accumulator:
    """An accumulator that collects :func:`timed_task`-style records from tasks whose results
    are rows of a DataFrame (``mapInArrow``, ``mapInPandas``), not records sent back."""
    return spark.sparkContext.accumulator([], _Records())


class TaskClock:
    """CPU, run-queue and wall seconds of the calling thread since the clock started: what
    :func:`timed_task` measures, for work that yields its output batch by batch."""

    def __init__(self):
        self.wall, (self.cpu, self.queued) = time.perf_counter(), _scheduler_seconds()

    def record(self, files: Sequence[str] = (), **figures) -> dict:
        cpu, queued = _scheduler_seconds()
        return {
            **figures,
            "read_bytes": sum(os.path.getsize(path) for path in files),
            "read_files": len(files),
            "task_wall_seconds": time.perf_counter() - self.wall,
            "task_cpu_seconds": cpu - self.cpu,
            "task_cpu_wait_seconds": queued - self.queued,
            "host": task_host(),
        }


def timed_task(files: list[str], work: Callable[[], dict]) -> dict:
    """``work``'s record plus what a Python task read and how it spent its time: Spark's stage
    metrics do not see files a Python task opens with pyarrow, so the task reports them itself
    (``read_bytes``: the sizes of the files it read; CPU against wall seconds: the share spent
    waiting, on the disk or the scheduler; the host, for a per-executor breakdown)."""
    clock = TaskClock()
    return clock.record(files, **work())


def task_host() -> str:
    """The executor's address as Spark knows it (``SPARK_LOCAL_IP``, set on cluster nodes, so
    the Python figures line up with ``stage_io``'s ``per_host``); the host name where that is
    unset or loopback (one machine, local mode)."""
    address = os.environ.get("SPARK_LOCAL_IP", "")
    return address if address and not address.startswith("127.") else socket.gethostname()


def _scheduler_seconds() -> tuple[float, float]:
    """This thread's seconds on a CPU and waiting in the run queue for one (Linux schedstat):
    a task that waits for a core is CPU-bound (more work than cores), not waiting for data."""
    try:
        on_cpu, queued, _ = Path("/proc/thread-self/schedstat").read_text().split()
        return int(on_cpu) / 1e9, int(queued) / 1e9
    except (OSError, ValueError):
        return time.thread_time(), 0.0


HOST_FIGURES = ("read_bytes", "task_wall_seconds", "task_cpu_seconds", "task_cpu_wait_seconds")


def task_io(records: list[dict], rows: str = "rows", written: str = "written_bytes") -> dict:
    """Run totals of :func:`timed_task` records, with MB/s per core and a per-host breakdown;
    ``rows`` and ``written`` name the records' own counts of rows read and bytes written (0 for
    tasks whose output Spark writes: ``spark_output_bytes`` counts it)."""
    if not records or "read_bytes" not in records[0]:
        return {}
    hosts: dict[str, dict] = {}
    for record in records:
        host = hosts.setdefault(record["host"], {"tasks": 0, **dict.fromkeys(HOST_FIGURES, 0)})
        host["tasks"] += 1
        for name in HOST_FIGURES:
            host[name] += record[name]
    wall = sum(r["task_wall_seconds"] for r in records)
    cpu = sum(r["task_cpu_seconds"] for r in records)
    cpu_wait = sum(r["task_cpu_wait_seconds"] for r in records)
    read = sum(r["read_bytes"] for r in records)
    return {
        "python_tasks": len(records),
        "python_read_bytes": read,
        "python_read_files": sum(r["read_files"] for r in records),
        "python_read_rows": sum(r.get(rows, 0) for r in records),
        "python_written_bytes": sum(r.get(written, 0) for r in records),
        "task_wall_seconds": round(wall, 3),
        "task_cpu_seconds": round(cpu, 3),
        "task_cpu_wait_seconds": round(cpu_wait, 3),
        "task_cpu_share": round(cpu / wall, 3) if wall else None,
        "read_mb_per_second_per_core": round(read / 2**20 / wall, 1) if wall else None,
        "python_per_host": {
            name: {k: round(v, 3) if isinstance(v, float) else v for k, v in h.items()}
            for name, h in sorted(hosts.items())
        },
    }


def run_figures(
    spark: SparkSession,
    job_group: str,
    records: list[dict] | None = None,
    rows: str = "rows",
    written: str = "written_bytes",
) -> dict:
    """One run's evidence as asset metadata: Spark's stage figures of ``job_group`` (``spark_*``,
    with ``spark_per_host``) and the totals of its Python tasks' ``records`` (:func:`task_io`).
    Dagster shows the dicts as JSON and plots the numbers over runs."""
    figures = {f"spark_{name}": value for name, value in stage_io(spark, job_group).items()}
    figures.update(task_io(records or [], rows=rows, written=written))
    return {name: value for name, value in figures.items() if value is not None}
