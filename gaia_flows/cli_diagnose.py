"""``gaia-flows diagnose RUN_ID``: what bound a run, with the numbers that say so.

A slow shared filesystem looks like slow code until the numbers say otherwise. Each Spark-backed
asset records per run what its tasks read and how they spent their
time (Spark stage metrics, plus what Python tasks read with pyarrow: ``engine.metrics.task_io``);
this command reads those figures back from the instance and names the bound:

- **the driver / waiting for executors**: the tasks kept the cores busy for only a small share of
  the step's wall time;
- **shuffle**: the stages moved more bytes through the shuffle than they read;
- **CPU**: the tasks were on a CPU, or runnable and waiting for one (more work than cores; on a
  shared cloud host, other tenants), for most of their time;
- **reading**: the tasks waited for most of their time, reading at a low rate per core.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

BUSY_MIN = 0.5
"""Below this share of (wall seconds x cores) spent in tasks, the cores mostly waited for work."""
CPU_SHARE_MIN = 0.7
"""At or above this share of task time on a CPU or queued for one, a task is computing rather
than waiting for data."""
SHUFFLE_SHARE_MIN = 0.5
"""Shuffled bytes above this share of the bytes read make the exchange the cost to look at."""


@dataclass(frozen=True)
class Verdict:
    asset: str
    bound: str
    evidence: str


def _figure(metadata: dict, *names: str) -> float:
    return sum(float(metadata.get(name) or 0) for name in names)


def name_bound(asset: str, metadata: dict) -> Verdict | None:
    """The bound of one asset's step from its run metadata, or ``None`` without task figures."""
    wall = _figure(metadata, "wall_seconds")
    cores = _figure(metadata, "spark_cores") or 1.0
    # Python tasks measure themselves (engine.metrics.timed_task); Spark's executor run time of
    # such a task is the same wall time seen from the JVM, which waits for the Python worker,
    # so Spark's task figures count only where no Python task figures exist.
    python = "task_wall_seconds" in metadata
    task_wall = (
        _figure(metadata, "task_wall_seconds")
        if python
        else _figure(metadata, "spark_executor_run_ms") / 1000
    )
    if not wall or not task_wall:
        return None
    task_cpu = (
        _figure(metadata, "task_cpu_seconds") if python else _figure(metadata, "spark_executor_cpu_ns") / 1e9
    )
    cpu_wait = _figure(metadata, "task_cpu_wait_seconds")
    read = _figure(metadata, "python_read_bytes", "spark_input_bytes")
    shuffled = _figure(metadata, "spark_shuffle_read_bytes", "spark_shuffle_write_bytes")
    busy = task_wall / (wall * cores)
    cpu_share = task_cpu / task_wall
    wants_cpu = (task_cpu + cpu_wait) / task_wall
    rate = read / 2**20 / task_wall
    numbers = f"{wall:.1f} s wall on {cores:.0f} core(s), tasks {task_wall:.1f} s ({busy:.0%} of the cores' time), on a CPU {cpu_share:.0%} of it and waiting for one {cpu_wait / task_wall:.0%}, reading {read / 2**20:.1f} MiB at {rate:.1f} MB/s per core, shuffle {shuffled / 2**20:.1f} MiB"
    if busy < BUSY_MIN:
        return Verdict(
            asset,
            "the driver or waiting for executors",
            f"the cores were busy in tasks for only {busy:.0%} of the step: {numbers}",
        )
    if read and shuffled > SHUFFLE_SHARE_MIN * read:
        return Verdict(
            asset, "shuffle", f"the stages shuffled {shuffled / read:.0%} of the bytes they read: {numbers}"
        )
    if wants_cpu >= CPU_SHARE_MIN:
        return Verdict(
            asset,
            "CPU",
            f"tasks were on a CPU or queued for one for {wants_cpu:.0%} of their time: {numbers}",
        )
    return Verdict(
        asset,
        "reading",
        f"tasks were blocked (not computing, not queued for a CPU) for {1 - wants_cpu:.0%} of their time while reading at {rate:.1f} MB/s per core: {numbers}",
    )


def run_metadata(instance, run_id: str) -> dict[str, dict]:
    """Each asset's run-level metadata in ``run_id`` (the last materialisation of each asset)."""
    from dagster import DagsterEventType

    records = instance.get_records_for_run(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION).records
    found: dict[str, dict] = {}
    for record in records:
        materialization = record.event_log_entry.dagster_event.event_specific_data.materialization
        found[materialization.asset_key.to_user_string()] = {
            k: v.value for k, v in materialization.metadata.items()
        }
    return found


def cmd_diagnose(args: argparse.Namespace) -> int:
    from gaia_flows.cli import open_instance
    from gaia_flows.layout import StateLayout

    instance = open_instance(StateLayout.from_env())
    run = instance.get_run_by_id(args.run_id) or next(
        (r for r in instance.get_runs() if r.run_id.startswith(args.run_id)), None
    )
    if run is None:
        print(f"no run {args.run_id!r} in this state folder's instance")
        return 2
    verdicts = [
        v
        for asset, metadata in run_metadata(instance, run.run_id).items()
        if (v := name_bound(asset, metadata))
    ]
    if not verdicts:
        print(f"run {run.run_id[:8]} recorded no task figures (no Spark-backed asset materialised)")
        return 1
    for verdict in verdicts:
        print(f"{verdict.asset}: bound by {verdict.bound}. {verdict.evidence}")
    return 0
