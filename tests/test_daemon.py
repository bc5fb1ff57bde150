"""New landing files flow through the whole graph with the real ``dagster-daemon`` alone: the
landing sensor ingests the affected regions, then the automation sensor (declared RUNNING in
``Definitions``) brings ``proper_motion_maps`` and ``classified_sources`` up to date, and
nothing else runs again."""

import shutil
import sys
import time
from pathlib import Path

import pytest
from dagster import AssetKey, DagsterEventType, DagsterInstance, materialize
from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter
from support.servers import ServerProcess
from support.spark import TEST_SPARK_CONF

from gaia_flows.cli import dagster_env
from gaia_flows.contracts import load_contract
from gaia_flows.definitions import defs
from gaia_flows.layout import REPO_ROOT
from gaia_flows.partitions import range_tags, sky_regions
from gaia_flows.resources import build_resources
from gaia_flows.resources.spark import SparkResource
from gaia_flows.science.synthetic import generate
from gaia_flows.sensors import affected_regions

pytestmark = pytest.mark.daemon

STARS, SEED, FILES = 30_000, 3, 8
DOWNSTREAM = ["gaia_source", "pm_stats", "proper_motion_maps", "classified_sources"]
FLOW_TIMEOUT = 480


def _latest(instance: DagsterInstance, asset: str) -> dict[str | None, int]:
    """Storage id of the latest materialisation of each partition (``None``: unpartitioned)."""
    key = AssetKey(asset)
    if defs.resolve_asset_graph().get(key).partitions_def is None:
        record = instance.get_asset_records([key])
        entry = record[0].asset_entry.last_materialization_record if record else None
        return {None: entry.storage_id} if entry else {}
    return dict(instance.get_latest_storage_id_by_partition(key, DagsterEventType.ASSET_MATERIALIZATION))


def _snapshot(instance: DagsterInstance) -> dict[str, dict]:
    return {
        key.to_user_string(): _latest(instance, key.to_user_string())
        for key in defs.resolve_asset_graph().materializable_asset_keys
    }


def _changed(before: dict, after: dict) -> dict[str, set]:
    return {
        asset: {p for p, sid in ids.items() if before[asset].get(p) != sid}
        for asset, ids in after.items()
        if any(before[asset].get(p) != sid for p, sid in ids.items())
    }


@pytest.fixture
def built_world(layout, spark, monkeypatch, tmp_path):
    """The whole graph materialised in-process from all but one synthetic file; that file is
    returned, to be dropped into the landing folder later."""
    env = dagster_env(layout)
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    side = tmp_path / "download"
    generate(STARS, SEED, side, load_contract(), files=FILES, processes=1, progress=False)
    files = sorted(side.glob("GaiaSource_*.csv.gz"))
    held_back = files[len(files) // 2]
    for path in files:
        if path != held_back:
            shutil.copy(path, layout.landing / path.name)
    shutil.copytree(side / "truth", layout.landing / "truth")
    instance = DagsterInstance.get()
    resources = {**build_resources(), "spark": SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF)}
    assets = list(defs.assets)
    keys = sky_regions.get_partition_keys()
    everywhere = range_tags(keys[0], keys[-1])
    steps = [
        (["gaia_source", "pm_stats"], everywhere, {}),
        (
            ["proper_motion_maps", "astrometric_training_set", "astrometric_classifier"],
            {},
            {"ops": {"astrometric_classifier": {"config": {"forest": {"n_estimators": 20}}}}},
        ),
        (["classified_sources"], everywhere, {}),
    ]
    for selection, tags, run_config in steps:
        result = materialize(
            assets,
            selection=selection,
            resources=resources,
            instance=instance,
            tags=tags,
            run_config=run_config,
        )
        assert result.success
    return held_back


def test_new_file_flows_to_maps_and_classifications_with_the_daemon_alone(layout, built_world):
    instance = DagsterInstance.get()
    before = _snapshot(instance)
    known_runs = {r.run_id for r in instance.get_runs()}
    new_file = shutil.copy(built_world, layout.landing / built_world.name)
    regions = set(affected_regions([Path(new_file)]))
    assert regions and len(regions) < len(sky_regions.get_partition_keys())

    daemon = ServerProcess(
        "dagster-daemon",
        [str(Path(sys.executable).with_name("dagster-daemon")), "run", "-w", "workspace.yaml"],
        env=dagster_env(layout),
        log_dir=layout.home,
        cwd=REPO_ROOT,
    )
    daemon.launch()
    try:
        expected = {
            "gaia_source": regions,
            "pm_stats": regions,
            "proper_motion_maps": {None},
            "classified_sources": regions,
        }
        deadline = time.monotonic() + FLOW_TIMEOUT
        while time.monotonic() < deadline:
            changed = _changed(before, _snapshot(instance))
            if all(expected[a] <= changed.get(a, set()) for a in expected):
                break
            failed = [
                r
                for r in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.FAILURE]))
                if r.run_id not in known_runs
            ]
            assert not failed, f"run {failed[0].run_id} failed: see {daemon.log_path} and the instance"
            assert daemon.proc.poll() is None, daemon.log_path.read_text()[-3000:]
            time.sleep(2)
        else:
            pytest.fail(
                f"after {FLOW_TIMEOUT} s only {changed} of {expected} were materialised; daemon log {daemon.log_path}"
            )

        after = _snapshot(instance)
        assert after["pm_stats"][min(regions)] > after["gaia_source"][min(regions)], (
            "pm_stats follows gaia_source"
        )
        assert after["proper_motion_maps"][None] > max(after["pm_stats"][r] for r in regions), (
            "the maps follow pm_stats"
        )
        assert all(after["classified_sources"][r] > after["gaia_source"][r] for r in regions)

        # Nothing else: the automation sensor evaluates once more after the last materialisation.
        flowed = time.time()
        settle = time.monotonic() + 120
        while time.monotonic() < settle and not _ticked_since(instance, flowed):
            time.sleep(2)
        assert _ticked_since(instance, flowed), "the automation sensor did not tick again"
        assert _changed(before, _snapshot(instance)) == expected, (
            "only the new file's regions and what depends on them ran"
        )
    finally:
        daemon.stop()


def _ticked_since(instance: DagsterInstance, since: float) -> bool:
    """The automation sensor finished a tick that started after ``since`` (epoch seconds)."""
    from dagster._core.scheduler.instigation import TickStatus

    state = next(s for s in instance.all_instigator_state() if s.name == "automation_sensor")
    ticks = instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=5)
    return any(t.status in (TickStatus.SKIPPED, TickStatus.SUCCESS) and t.timestamp > since for t in ticks)
