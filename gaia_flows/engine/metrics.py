"""What a run read, wrote and waited for: Spark stage IO for a job group, from the driver's
monitoring REST API, and the figures Python tasks measure themselves (:func:`timed_task`).

Every Spark-backed asset reports what its stages and Python tasks read, wrote, shuffled and
spilled, and how the tasks spent their time, so a bottleneck shows in the Dagster UI next to
the row counts, and ``gaia-flows diagnose`` can name it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from pyspark.sql import SparkSession

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
    with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - driver UI on loopback
        return json.loads(response.read())


def stage_io(spark: SparkSession, job_group: str) -> dict[str, int]:
    """Totals over the completed stages of ``job_group``; empty when the Spark UI is off."""
    sc = spark.sparkContext
    base = sc.uiWebUrl
    if not base:
        return {}
    api = f"{base}/api/v1/applications/{sc.applicationId}"
    try:
        jobs = [j for j in _get(f"{api}/jobs") if j.get("jobGroup") == job_group]
        wanted = {s for j in jobs for s in j.get("stageIds", [])}
        stages = [
            s for s in _get(f"{api}/stages") if s["stageId"] in wanted and s.get("status") == "COMPLETE"
        ]
    except OSError:
        return {}
    totals = {name: sum(int(s.get(key, 0)) for s in stages) for key, name in FIELDS.items()}
    totals["stages"] = len(stages)
    return totals


# --- Python tasks ------------------------------------------------------------------------------


def timed_task(files: list[str], work: Callable[[], dict]) -> dict:
    """``work``'s record plus what a Python task read and how it spent its time: Spark's stage
    metrics do not see files a Python task opens with pyarrow, so the task reports them itself
    (``read_bytes``: the sizes of the files it read; CPU against wall seconds: the share spent
    waiting, on the disk or the scheduler; the host, for a per-executor breakdown)."""
    wall, (cpu, queued) = time.perf_counter(), _scheduler_seconds()
    record = work()
    cpu_after, queued_after = _scheduler_seconds()
    return {
        **record,
        "read_bytes": sum(os.path.getsize(path) for path in files),
        "read_files": len(files),
        "task_wall_seconds": time.perf_counter() - wall,
        "task_cpu_seconds": cpu_after - cpu,
        "task_cpu_wait_seconds": queued_after - queued,
        "host": socket.gethostname(),
    }


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
    ``rows`` and ``written`` name the records' own counts of rows read and bytes written."""
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
        "python_read_bytes": read,
        "python_read_files": sum(r["read_files"] for r in records),
        "python_read_rows": sum(r[rows] for r in records),
        "python_written_bytes": sum(r[written] for r in records),
        "task_wall_seconds": round(wall, 3),
        "task_cpu_seconds": round(cpu, 3),
        "task_cpu_wait_seconds": round(cpu_wait, 3),
        "task_cpu_share": round(cpu / wall, 3) if wall else None,
        "read_mb_per_second_per_core": round(read / 2**20 / wall, 1) if wall else None,
        "per_host": {
            name: {k: round(v, 3) if isinstance(v, float) else v for k, v in h.items()}
            for name, h in sorted(hosts.items())
        },
    }
