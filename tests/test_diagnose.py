"""``gaia-flows diagnose`` names a run's bound from the figures its tasks measured: here real
region-task records (``timed_task``) of a task that computes and of one whose file reader is
slowed down."""

import time

import pyarrow as pa
import pyarrow.parquet as pq

from gaia_flows.cli_diagnose import name_bound
from gaia_flows.engine.metrics import task_io, timed_task

# CPU seconds of the computing task: long enough that a hiccup of a busy machine (a page
# fault, a read from a cold cache) stays a small share of its wall time.
COMPUTE_S = 1.5


def _files(tmp_path, n: int = 3) -> list[str]:
    paths = []
    for i in range(n):
        path = tmp_path / f"part-{i}.parquet"
        pq.write_table(pa.table({"x": list(range(20_000))}), path)
        paths.append(str(path))
    return paths


def _run(records: list[dict], wall: float, cores: int = 1) -> dict:
    return {
        "wall_seconds": wall,
        "spark_cores": cores,
        **task_io(records, rows="n_sources", written="stored_bytes"),
    }


def _computing(files):
    def work():
        for path in files:
            pq.read_table(path)
        deadline = time.process_time() + COMPUTE_S
        while time.process_time() < deadline:  # the statistics' arithmetic
            sum(i * i for i in range(1000))
        return {"n_sources": 60_000, "stored_bytes": 100}

    return work


def _slow_reader(files):
    def work():
        for path in files:
            with open(path, "rb") as handle:  # a throttled share: 4 KiB, then a wait
                while handle.read(4096):
                    time.sleep(0.01)
        return {"n_sources": 60_000, "stored_bytes": 100}

    return work


def test_task_records_report_the_parquet_bytes_they_read(tmp_path):
    files = _files(tmp_path)
    record = timed_task(files, _computing(files))
    assert record["read_bytes"] == sum((tmp_path / f"part-{i}.parquet").stat().st_size for i in range(3))
    assert (
        record["task_cpu_seconds"] >= COMPUTE_S
        and record["task_wall_seconds"] >= record["task_cpu_seconds"] * 0.9
    )


def test_cpu_bound_run_is_named_cpu(tmp_path):
    files = _files(tmp_path)
    started = time.perf_counter()
    records = [timed_task(files, _computing(files)) for i in range(2)]
    verdict = name_bound("pm_stats", _run(records, time.perf_counter() - started))
    assert verdict.bound == "CPU", verdict


def test_read_throttled_run_is_named_reading(tmp_path):
    files = _files(tmp_path)
    started = time.perf_counter()
    records = [timed_task(files, _slow_reader(files))]
    verdict = name_bound("pm_stats", _run(records, time.perf_counter() - started))
    assert verdict.bound == "reading", verdict
    assert "MB/s per core" in verdict.evidence


def test_idle_cores_and_shuffle_are_named():
    busy = {"task_wall_seconds": 10.0, "task_cpu_seconds": 9.0, "python_read_bytes": 100 << 20}
    assert (
        name_bound("a", {"wall_seconds": 40.0, "spark_cores": 2, **busy}).bound
        == "the driver or waiting for executors"
    )
    assert (
        name_bound(
            "a", {"wall_seconds": 6.0, "spark_cores": 2, **busy, "spark_shuffle_read_bytes": 80 << 20}
        ).bound
        == "shuffle"
    )
    assert name_bound("a", {"wall_seconds": 6.0}) is None
