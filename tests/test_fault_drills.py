"""Fault drills: a process killed, a file corrupted, a full or read-only warehouse, two writers at
once. Each drill runs the real pipeline (local Spark, a standalone cluster, the Dagster daemon)
on a real state folder and ends by comparing the region's table with a clean run's."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
from dagster import AssetSelection, DagsterInstance, DagsterRunStatus, materialize
from support.gaia_files import region_file_range, stars_in_region, write_gaia_file
from support.spark import TEST_SPARK_CONF

from gaia_flows import spark as spark_factory
from gaia_flows.assets.catalogue import gaia_landing, gaia_source, parquet_readable, rows_conserved
from gaia_flows.cloud.local_spark import LocalSparkCluster
from gaia_flows.contracts import load_contract
from gaia_flows.engine.ingest import ingest_regions
from gaia_flows.layout import REPO_ROOT, SOURCE_TABLE, StateLayout
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource
from gaia_flows.run_launcher import RUN_WORKER_TAG
from gaia_flows.warehouse import claim_staging, release_staging

REGION = "hpx1-07"
BIN = Path(sys.executable).parent


def _land(landing: Path, n: int, seed: int, files: int = 1) -> None:
    """``n`` stars of REGION in ``files`` bulk files (a file per task for Spark)."""
    lo, hi = region_file_range(REGION)
    cols = stars_in_region(REGION, n, seed)
    level8 = cols["source_id"] >> 43
    bounds = [lo + (hi - lo + 1) * i // files for i in range(files + 1)]
    for start, end in zip(bounds[:-1], bounds[1:]):
        keep = (level8 >= start) & (level8 < end)
        write_gaia_file(landing, start, end - 1, {k: v[keep] for k, v in cols.items()})


def _table(layout: StateLayout, table: str = SOURCE_TABLE):
    return pq.read_table(layout.region_dir(table, REGION)).sort_by("source_id")


def _materialize(layout: StateLayout, check=None, raise_on_error=True, instance=None):
    assets = [gaia_landing, gaia_source, rows_conserved] + ([check] if check else [])
    return materialize(
        assets,
        selection=AssetSelection.assets(gaia_source)
        | (AssetSelection.checks(check) if check else AssetSelection.assets()),
        partition_key=REGION,
        resources={
            "spark": SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF),
            "storage": _storage(layout),
        },
        raise_on_error=raise_on_error,
        instance=instance,
    )


def _storage(layout: StateLayout) -> StorageResource:
    return StorageResource(home=str(layout.home), landing=str(layout.landing))


@pytest.fixture
def clean(tmp_path, _spark_application):
    """A clean run's table of REGION from 3000 stars, and the landing folder it came from."""
    layout = StateLayout.from_env(tmp_path / "clean").ensure()
    _land(layout.landing, 3000, seed=7, files=2)
    assert _materialize(layout).success
    return layout


def _state_from(clean: StateLayout, home: Path) -> StateLayout:
    return StateLayout.from_env(home, clean.landing).ensure()


# --- a published file corrupted ---------------------------------------------------------------


def test_corrupted_parquet_file_is_named_by_the_check_and_a_rerun_repairs_it(clean, tmp_path):
    layout = _state_from(clean, tmp_path / "state")
    assert _materialize(layout, check=parquet_readable).success
    victim = layout.region_files(SOURCE_TABLE, REGION)[0].resolve()
    size = victim.stat().st_size
    with open(victim, "r+b") as handle:  # overwrite bytes inside the data pages, footer intact
        handle.seek(size // 3)
        handle.write(b"\x00\xff" * 64)

    checked = materialize(
        [gaia_landing, gaia_source, parquet_readable],
        selection=AssetSelection.checks(parquet_readable),
        resources={
            "spark": SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF),
            "storage": _storage(layout),
        },
        raise_on_error=False,
    )
    (evaluation,) = checked.get_asset_check_evaluations()
    assert not evaluation.passed
    corrupt = evaluation.metadata["corrupt"].value
    assert list(corrupt) == [REGION]
    assert str(victim) in corrupt[REGION] and SOURCE_TABLE in corrupt[REGION]

    rerun = _materialize(layout, check=parquet_readable)
    assert rerun.success and all(e.passed for e in rerun.get_asset_check_evaluations())
    assert _table(layout).equals(_table(clean))
    assert not victim.exists(), "the damaged version was replaced, not patched"


# --- the warehouse refuses writes ---------------------------------------------------------------


def _root_or_skip():
    if os.geteuid() != 0:
        pytest.skip("mounting a small filesystem under the warehouse needs root")


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def _refused_run(clean: StateLayout, home: Path, refuse) -> tuple[StateLayout, str]:
    """Publish REGION once, make the warehouse refuse writes (``refuse(layout)``), land more
    stars and rerun: returns the layout and the failure's text."""
    layout = _state_from(clean, home)
    assert _materialize(layout).success
    before = _table(layout)
    refuse(layout)
    try:
        landing = Path(tempfile.mkdtemp(dir=home))
        _land(landing, 40_000, seed=8, files=2)
        grown = StateLayout.from_env(layout.home, landing)
        run = materialize(
            [gaia_landing, gaia_source],
            selection=[gaia_source.key],
            partition_key=REGION,
            resources={
                "spark": SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF),
                "storage": _storage(grown),
            },
            raise_on_error=False,
        )
        assert not run.success
        (failure,) = [e for e in run.all_events if e.event_type_value == "STEP_FAILURE"]
        error = failure.step_failure_data.error
        while error.cause is not None and "WarehouseWriteError" not in error.cls_name:
            error = error.cause  # the step error wraps the asset's own
        text = error.message
        assert _table(layout).equals(before), "the previous version stays published and readable"
        assert _table(layout).equals(_table(clean))
        return layout, text
    finally:
        subprocess.run(["umount", "-l", str(layout.warehouse)], capture_output=True)


def test_full_disk_fails_the_run_naming_space_path_and_table_and_keeps_the_previous_version(clean, tmp_path):
    _root_or_skip()

    def fill(layout):
        kept = tmp_path / "kept"
        shutil.copytree(layout.warehouse, kept, symlinks=True)
        kept_kib = sum(p.stat().st_size for p in kept.rglob("*") if p.is_file()) // 1024
        # Room for the published version and a quarter more (plus pages for small files): the
        # rerun's new version, as large again, cannot fit.
        _mount("-t", "tmpfs", "-o", f"size={kept_kib * 5 // 4 + 256}k", "tmpfs", str(layout.warehouse))
        shutil.copytree(kept, layout.warehouse, symlinks=True, dirs_exist_ok=True)

    layout, text = _refused_run(clean, tmp_path / "state", fill)
    assert text.startswith("gaia_flows.warehouse.WarehouseWriteError: no space left on device at "), text
    assert str(layout.warehouse) in text and repr(SOURCE_TABLE) in text and REGION in text


def test_read_only_warehouse_fails_the_run_naming_permission_path_and_table(clean, tmp_path):
    _root_or_skip()

    def freeze(layout):
        _mount("--bind", str(layout.warehouse), str(layout.warehouse))
        _mount("-o", "remount,bind,ro", str(layout.warehouse))

    layout, text = _refused_run(clean, tmp_path / "state", freeze)
    assert text.startswith("gaia_flows.warehouse.WarehouseWriteError: permission denied at "), text
    assert str(layout.warehouse) in text and repr(SOURCE_TABLE) in text


# --- stale staging ---------------------------------------------------------------------------------


def test_next_write_removes_a_dead_runs_staging_but_not_a_live_ones(tmp_path):
    layout = StateLayout.from_env(tmp_path / "state").ensure()
    claim = (
        "import sys, time; from gaia_flows.layout import StateLayout; from gaia_flows.warehouse import claim_staging;"
        f"p = claim_staging(StateLayout.from_env({str(layout.home)!r}), {SOURCE_TABLE!r}); (p / 'parsed').mkdir(parents=True);"
        "print(p, flush=True); time.sleep(120)"
    )
    owners = [
        subprocess.Popen([sys.executable, "-c", claim], stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    try:
        dead, live = (Path(o.stdout.readline().strip()) for o in owners)
        owners[0].send_signal(signal.SIGKILL)
        owners[0].wait()
        other_table = claim_staging(layout, "pm_stats")
        mine = claim_staging(layout, SOURCE_TABLE)
        assert not dead.exists() and live.is_dir() and other_table.parent.is_dir()
        assert sorted(p.name for p in layout.staging_root.iterdir() if not p.name.endswith(".lock")) == [
            live.name
        ], "only the live run's remains; my own is not created yet"
        release_staging(mine)
        release_staging(other_table)
    finally:
        for owner in owners:
            owner.kill()
            owner.wait()


# --- a Spark worker killed ---------------------------------------------------------------------


def _kill_when_running(spark, worker_pids: list[int], killed: dict) -> None:
    """kill -9 a worker that hosts an executor, and that executor, as soon as a task runs."""
    tracker = spark.sparkContext.statusTracker()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not killed:
        for stage in tracker.getActiveStageIds():
            info = tracker.getStageInfo(stage)
            hosts = [pid for pid in worker_pids if psutil.Process(pid).children()]
            if info and info.numActiveTasks > 0 and hosts:
                victims = [psutil.Process(hosts[0]), *psutil.Process(hosts[0]).children(recursive=True)]
                for proc in victims:
                    proc.send_signal(signal.SIGKILL)
                killed.update(stage=stage, pids=[p.pid for p in victims])
                return
        time.sleep(0.05)


@pytest.mark.cluster
def test_spark_worker_killed_mid_ingestion_run_completes_with_the_clean_table(tmp_path, _spark_application):
    landing = tmp_path / "landing"
    _land(landing, 24_000, seed=3, files=6)
    contract = load_contract(SOURCE_TABLE)
    clean = StateLayout.from_env(tmp_path / "clean", landing).ensure()
    faulty = StateLayout.from_env(tmp_path / "faulty", landing).ensure()
    conf = {
        **TEST_SPARK_CONF,
        "spark.executor.memory": "768m",
        "spark.executor.cores": "1",
        "spark.cores.max": "2",
    }
    with LocalSparkCluster(workers=3, cores=1, memory_mb=1024, log_dir=tmp_path / "logs") as cluster:
        try:
            spark = spark_factory.session(cluster.master_url, conf)
            assert not ingest_regions(spark, clean, [REGION], contract, 1 << 20).failures
            killed: dict = {}
            watcher = threading.Thread(
                target=_kill_when_running, args=(spark, [w.pid for w in cluster.workers], killed)
            )
            watcher.start()
            report = ingest_regions(spark, faulty, [REGION], contract, 1 << 20)
            watcher.join()
        finally:
            spark_factory.stop_active()
    assert killed, "the worker was killed while a task ran"
    assert not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        for pid in killed["pids"]
    )
    assert not report.failures and report.rows_read == 24_000
    assert _table(faulty).equals(_table(clean))
    assert (
        pq.read_table(faulty.quarantine_dir(SOURCE_TABLE, REGION)).num_rows
        == pq.read_table(clean.quarantine_dir(SOURCE_TABLE, REGION)).num_rows
    )


# --- the Dagster run worker killed ----------------------------------------------------------------


def _wait(predicate, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _staging_dirs(layout: StateLayout) -> list[Path]:
    root = layout.staging_root
    return sorted(p for p in root.glob(f"{SOURCE_TABLE}-*") if p.is_dir()) if root.exists() else []


def _kill_tree(pid: int) -> None:
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def test_killed_run_worker_is_failed_by_run_monitoring_and_a_rerun_cleans_its_staging(
    tmp_path, monkeypatch, _spark_application
):
    """The real daemon launches a queued run of REGION; mid-ingestion its run worker and the code
    server that spawned it get ``kill -9`` (nothing left that could report the death). Run
    monitoring (deployments/local/dagster.yaml) must mark it failed within a minute and free its
    pool slot; the next run of the table removes the dead run's staging directory and publishes
    exactly the clean table."""
    from gaia_flows import cli

    layout = StateLayout.from_env(tmp_path / "state").ensure()
    _land(layout.landing, 150_000, seed=7, files=8)  # tasks long enough to be killed mid-way
    env = {**cli.dagster_env(layout), "GAIA_FLOWS_PROFILE": "local", "GAIA_FLOWS_HOME": str(layout.home)}
    env.pop("GAIA_FLOWS_LANDING", None)
    # Only the run this drill launches may ingest REGION: the landing sensor (running by
    # default) would queue a run of its own for the landed files, which could publish first.
    stopped = subprocess.run(
        [str(BIN / "dagster"), "sensor", "stop", "landing_files_sensor", "-m", "gaia_flows.definitions"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    daemon_log = open(tmp_path / "daemon.log", "w")
    daemon = subprocess.Popen(
        [str(BIN / "dagster-daemon"), "run", "-m", "gaia_flows.definitions"],
        cwd=REPO_ROOT,
        env=env,
        stdout=daemon_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    monkeypatch.setenv("DAGSTER_HOME", str(layout.dagster_home))
    instance = DagsterInstance.get()
    run_id = str(uuid.uuid4())
    try:
        launch = subprocess.run(
            [
                str(BIN / "dagster"),
                "job",
                "launch",
                "-m",
                "gaia_flows.definitions",
                "-j",
                "catalogue_refresh",
                "--run-id",
                run_id,
                "--tags",
                json.dumps({"dagster/partition": REGION}),
            ],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert launch.returncode == 0, launch.stderr[-3000:]
        worker = _wait(
            lambda: instance.get_run_by_id(run_id).tags.get(RUN_WORKER_TAG), 300, "the run worker to start"
        )
        staged = _wait(lambda: _staging_dirs(layout), 300, "the ingestion to stage files", step=0.05)
        worker_pid = json.loads(worker)["pid"]
        code_server = psutil.Process(worker_pid).parent()
        assert "grpc" in " ".join(code_server.cmdline()), code_server.cmdline()
        killed_at = time.monotonic()
        code_server.send_signal(signal.SIGKILL)
        _kill_tree(worker_pid)  # the run worker, and its Spark JVM with it

        status = _wait(
            lambda: instance.get_run_by_id(run_id).status in (DagsterRunStatus.FAILURE,),
            90,
            "run monitoring to fail the run",
            step=1,
        )
        failed_after = time.monotonic() - killed_at
        assert status and failed_after < 60, f"marked failed after {failed_after:.0f} s"
        messages = [e.message for e in instance.all_logs(run_id)]
        assert any(f"run worker process {worker_pid}" in (m or "") and "is gone" in m for m in messages), (
            messages[-5:]
        )
        assert not layout.region_dir(SOURCE_TABLE, REGION).exists(), "nothing of the killed run was published"
        _wait(
            lambda: not instance.event_log_storage.get_concurrency_info(SOURCE_TABLE).claimed_slots,
            60,
            "the pool slot to be freed",
            step=1,
        )
        assert all(p.exists() for p in staged), "the dead run's staging is still there before the next run"
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
            daemon.wait()
        daemon_log.close()

    assert _materialize(layout, instance=instance).success
    instance.dispose()
    assert _staging_dirs(layout) == [], "the rerun removed the dead run's staging directory"
    reference = StateLayout.from_env(tmp_path / "reference", layout.landing).ensure()
    assert _materialize(reference).success
    assert _table(layout).equals(_table(reference))


# --- two runs of one region at once -------------------------------------------------------------


def _step_window(instance: DagsterInstance, run_id: str) -> tuple[float, float]:
    """When the run's ingestion step started and when it succeeded."""
    events = [e for e in instance.all_logs(run_id) if e.dagster_event and e.step_key == "gaia_source"]
    start = min(e.timestamp for e in events if e.dagster_event.event_type_value == "STEP_START")
    end = max(e.timestamp for e in events if e.dagster_event.event_type_value == "STEP_SUCCESS")
    return start, end


def _rows_in(instance: DagsterInstance, run_id: str) -> int:
    (materialization,) = [
        e.dagster_event.event_specific_data.materialization
        for e in instance.all_logs(run_id)
        if e.dagster_event and e.dagster_event.event_type_value == "ASSET_MATERIALIZATION"
    ]
    return materialization.metadata["rows_in"].value


def _slots_claimed() -> int:
    with DagsterInstance.get() as instance:
        return instance.event_log_storage.get_concurrency_info(SOURCE_TABLE).active_slot_count


def test_two_runs_of_one_region_at_once_take_turns_through_the_pool_and_publish_one_whole_table(
    clean, tmp_path, monkeypatch
):
    """Two ``dagster asset materialize ... --partition hpx1-07`` processes on one state folder and
    instance (deployments/local/dagster.yaml: pool ``gaia_source``, default limit 1), each
    reading its own landing folder (3000 and 2000 stars). The second starts while the first
    holds the pool's slot. Their ingestion steps must not overlap, and the published region must
    be exactly the later run's clean table, never a mixture of the two. Both processes run under
    a deadline and are killed with their Spark JVMs in ``finally``, so a stuck run fails the
    test instead of hanging it.

    The second run is not started in the same instant: two slot claims a few milliseconds apart
    on the local instance's SQLite storage were both granted once (CI, 2026-12-06), a race in
    the storage's claim, not in the pool the assets declare."""
    from gaia_flows import cli

    layout = StateLayout.from_env(tmp_path / "state").ensure()
    other = StateLayout.from_env(tmp_path / "other").ensure()
    _land(other.landing, 2000, seed=9, files=1)
    assert _materialize(other).success
    sources = {3000: clean, 2000: other}
    # The instance's SQLite storage is created once, here: two processes opening a new instance
    # at the same moment can both stamp its schema version, which leaves it unreadable.
    monkeypatch.setenv("DAGSTER_HOME", cli.dagster_env(layout)["DAGSTER_HOME"])
    with DagsterInstance.get():
        pass
    processes: dict[int, subprocess.Popen] = {}
    logs = {rows: open(tmp_path / f"run-{rows}.log", "w") for rows in sources}
    deadline = time.monotonic() + 480
    try:
        for rows, source in sources.items():
            if processes:  # the first run holds the pool's slot before the second starts
                while _slots_claimed() == 0:
                    assert time.monotonic() < deadline, "the first run never claimed the pool's slot"
                    assert all(p.poll() is None for p in processes.values()), "the first run ended early"
                    time.sleep(0.2)
            env = {
                **cli.dagster_env(StateLayout.from_env(layout.home, source.landing)),
                "GAIA_FLOWS_PROFILE": "local",
            }
            processes[rows] = subprocess.Popen(
                [
                    str(BIN / "dagster"),
                    "asset",
                    "materialize",
                    "-m",
                    "gaia_flows.definitions",
                    "--select",
                    "gaia_source",
                    "--partition",
                    REGION,
                ],
                cwd=REPO_ROOT,
                env=env,
                stdout=logs[rows],
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        for process in processes.values():
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in processes.values():
            _kill_tree(process.pid)
            process.wait()
        for log in logs.values():
            log.close()
    output = {rows: (tmp_path / f"run-{rows}.log").read_text()[-3000:] for rows in sources}
    assert all(p.returncode == 0 for p in processes.values()), output

    with DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert len(runs) == 2 and all(r.status == DagsterRunStatus.SUCCESS for r in runs)
        windows = {_rows_in(instance, r.run_id): _step_window(instance, r.run_id) for r in runs}
        blocked = {
            _rows_in(instance, r.run_id)
            for r in runs
            if any(
                f"blocked by limit for pool {SOURCE_TABLE}" in (e.message or "")
                for e in instance.all_logs(r.run_id)
            )
        }
        assert instance.event_log_storage.get_concurrency_info(SOURCE_TABLE).slot_count == 1
    assert set(windows) == set(sources), windows
    first, second = sorted(windows, key=lambda rows: windows[rows][0])
    assert windows[first][1] <= windows[second][0], f"ingestion steps overlapped: {windows}"
    assert blocked == {second}, "the later run waited for the pool's slot, the first did not"
    assert _table(layout).equals(_table(sources[second])), "the later run's table, whole"
    versions = [p for p in (layout.table(SOURCE_TABLE) / ".versions").iterdir() if p.name.startswith(REGION)]
    assert len(versions) == 1, versions
    assert _staging_dirs(layout) == []
