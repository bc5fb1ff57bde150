"""Spark stage IO for a job group, from the driver's monitoring REST API.

Every Spark-backed asset reports what its stages read, shuffled and spilled, so a slow shared
filesystem or a shuffle-bound stage shows in the Dagster UI next to the row counts, instead of
being mistaken for slow code.
"""

from __future__ import annotations

import json
import urllib.request

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
