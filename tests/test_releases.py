"""A second data release lands beside DR3 without touching it.

The fake release ``fake`` has its own contract: DR3's without ``ruwe`` and with one new column,
``fake_quality``. DR3 is ingested first and every file it leaves is fingerprinted; then the
fake release is ingested and its statistics and maps computed through the same asset graph
under the ``fake/`` key prefix. DR3's files must come out byte for byte and mtime for mtime
the same, and the fake release's tables must follow its own contract, in its own folders.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from dagster import AssetKey, build_sensor_context, materialize
from support.astrometric_data import publish_synthetic
from support.gaia_files import region_file_range, stars_in_region, write_gaia_file
from support.spark import TEST_SPARK_CONF

from gaia_flows import releases
from gaia_flows.contracts import CONTRACTS_DIR
from gaia_flows.definitions import build_definitions, release_graph
from gaia_flows.layout import (
    CLASSIFIED_TABLE,
    DEFAULT_RELEASE,
    MAPS_TABLE,
    SOURCE_TABLE,
    STATS_TABLE,
    TRAINING_TABLE,
)
from gaia_flows.ml.registry import current_champion
from gaia_flows.partitions import range_tags
from gaia_flows.releases import Release
from gaia_flows.resources.mlflow import MlflowResource
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource
from gaia_flows.science.ecsv import EcsvColumn, format_header
from gaia_flows.sensors import build_landing_files_sensor

REGIONS = ("hpx1-07", "hpx1-08")
REMOVED, ADDED = "ruwe", "fake_quality"
CLASSIFIER = "astrometric_classifier"
STARS = 15_000  # enough nearby and spurious sources for both training classes


@pytest.fixture
def fake_release(tmp_path, monkeypatch) -> Release:
    """Release ``fake`` in the registry, with DR3's contract minus ``ruwe`` plus ``fake_quality``."""
    spec = yaml.safe_load((CONTRACTS_DIR / "gaia_source_dr3.yaml").read_text())
    spec["release"] = "fake"
    spec["columns"] = [c for c in spec["columns"] if c["name"] != REMOVED] + [
        {
            "name": ADDED,
            "datatype": "float32",
            "description": "a column DR3 does not have",
            "min": 0,
            "max": 1,
        }
    ]
    path = tmp_path / "gaia_source_fake.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    release = Release("fake", contract_path=path)
    monkeypatch.setitem(releases.RELEASES, release.name, release)
    return release


def _land(landing: Path, release: Release, n: int, seed: int) -> None:
    """Two files per region, the columns the release's contract knows."""
    contract = release.contract()
    for region in REGIONS:
        lo, hi = region_file_range(region)
        stars = stars_in_region(region, n, seed)
        if not release.is_default:
            stars.pop(REMOVED)
            stars[ADDED] = (stars["source_id"] % 1000) / 1000
        header = format_header([EcsvColumn(name, contract.by_name[name].datatype) for name in stars])
        level8 = stars["source_id"] >> 43
        mid = (lo + hi) // 2
        for start, end in ((lo, mid), (mid + 1, hi)):
            write_gaia_file(
                landing,
                start,
                end,
                {k: v[(level8 >= start) & (level8 <= end)] for k, v in stars.items()},
                header=header,
            )


def _resources(tmp_path: Path) -> dict:
    storage = StorageResource()
    return {
        "spark": SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF),
        "storage": storage,
        "mlflow": MlflowResource(storage=storage, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}"),
    }


def _run(release: Release, names: list[str], resources: dict, tags: dict | None = None, run_config=None):
    assets, checks = release_graph(release)
    result = materialize(
        [*assets, *checks],
        selection=[release.key(name) for name in names],
        resources=resources,
        tags=tags,
        run_config=run_config,
    )
    assert result.success
    failed = [e.check_name for e in result.get_asset_check_evaluations() if not e.passed]
    assert not failed, f"{release.name}: checks failed: {failed}"
    return result


def _materializations(result, key: AssetKey) -> list:
    return [
        event.materialization for event in result.get_asset_materialization_events() if event.asset_key == key
    ]


def _fingerprints(layout) -> dict[str, tuple]:
    """Every file and link in DR3's data folders: content digest and mtime (links: their target)."""
    out = {}
    for root in (layout.landing, layout.warehouse, layout.quarantine, layout.maps, layout.hats):
        for path in sorted(root.rglob("*")) if root.exists() else []:
            stat = path.lstat()
            if path.is_symlink():
                out[str(path)] = ("link", os.readlink(path), stat.st_mtime_ns)
            elif path.is_file():
                out[str(path)] = (hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_mtime_ns)
    return out


def test_second_release_leaves_dr3_untouched(layout, spark, tmp_path, fake_release):
    dr3 = releases.RELEASES[DEFAULT_RELEASE]
    resources = _resources(tmp_path)
    tags = range_tags(*REGIONS)
    _land(layout.landing, dr3, 300, seed=1)
    _run(dr3, [SOURCE_TABLE, STATS_TABLE], resources, tags)
    _run(dr3, [MAPS_TABLE], resources)
    before = _fingerprints(layout)
    assert any("/warehouse/pm_stats/" in p for p in before) and any(p.endswith(".png") for p in before)

    fake = fake_release.layout(layout)
    assert fake.landing == layout.landing / "fake" and fake.warehouse == layout.warehouse / "fake"
    _land(fake.landing, fake_release, 200, seed=2)
    ingested = _run(fake_release, [SOURCE_TABLE, STATS_TABLE], resources, tags)
    mapped = _run(fake_release, [MAPS_TABLE], resources)

    after = _fingerprints(layout)
    release_dirs = [
        str(root / "fake") for root in (layout.landing, layout.warehouse, layout.quarantine, layout.maps)
    ]
    dr3_after = {p: mark for p, mark in after.items() if not p.startswith(tuple(release_dirs))}
    assert dr3_after == before, "adding a release changed, added or removed a DR3 file"

    for region in REGIONS:
        dr3_table = pq.read_table(layout.region_dir(SOURCE_TABLE, region))
        fake_table = pq.read_table(fake.region_dir(SOURCE_TABLE, region))
        assert REMOVED in dr3_table.column_names and ADDED not in dr3_table.column_names
        assert ADDED in fake_table.column_names and REMOVED not in fake_table.column_names
        assert fake_table.num_rows == 200 and dr3_table.num_rows == 300
        stats = pq.read_table(fake.region_dir(STATS_TABLE, region))
        assert sum(stats.column("n_sources").to_pylist()) == 200
    assert fake.region_dir(STATS_TABLE, REGIONS[0]) == layout.warehouse / "fake" / STATS_TABLE / REGIONS[0]

    by_region = {m.partition: m.metadata for m in _materializations(ingested, fake_release.key(SOURCE_TABLE))}
    assert set(by_region) == set(REGIONS)
    assert all(meta["release"].value == "fake" for meta in by_region.values())
    [maps_meta] = [m.metadata for m in _materializations(mapped, fake_release.key(MAPS_TABLE))]
    assert maps_meta["release"].value == "fake" and maps_meta["rows"].value == 2 * 200
    assert all(Path(png).is_relative_to(layout.maps / "fake") for png in maps_meta["pngs"].value)


def test_sensor_watches_each_release_landing_folder(layout, fake_release):
    """DR3's files in the landing folder start DR3's job, the fake release's in landing/fake/
    start its own; one cursor remembers both, by path under the landing folder."""
    sensor = build_landing_files_sensor((releases.RELEASES[DEFAULT_RELEASE], fake_release))
    lo, hi = region_file_range("hpx1-07")
    write_gaia_file(layout.landing, lo, hi, stars_in_region("hpx1-07", 5))
    lo, hi = region_file_range("hpx1-20")
    fake_file = write_gaia_file(layout.landing / "fake", lo, hi, stars_in_region("hpx1-20", 5))
    first = sensor(build_sensor_context(cursor=None))
    assert sorted(
        (r.job_name, r.tags["dagster/asset_partition_range_start"]) for r in first.run_requests
    ) == [
        ("catalogue_refresh", "hpx1-07"),
        ("fake_catalogue_refresh", "hpx1-20"),
    ]
    os.utime(fake_file, ns=(1, 2_000_000_000_000_000_000))
    again = sensor(build_sensor_context(cursor=first.cursor))
    assert [(r.job_name, r.tags["dagster/asset_partition_range_start"]) for r in again.run_requests] == [
        ("fake_catalogue_refresh", "hpx1-20")
    ]


def test_a_release_is_dr3s_graph_under_its_prefix(fake_release):
    """Every DR3 asset and check exists again under ``fake/``, alike in all but key, group and
    op name, depending on the release's own upstream assets; the platform loads as one job."""
    dr3 = releases.RELEASES[DEFAULT_RELEASE]
    defs = build_definitions((dr3, fake_release))
    graph = defs.resolve_asset_graph()
    plain = [
        key for key in graph.get_all_asset_keys() if len(key.path) == 1 and key.path[0] != "spark_cluster"
    ]
    assert {fake_release.key(key.path[0]) for key in plain} == {
        key for key in graph.get_all_asset_keys() if key.path[0] == "fake"
    }
    for key in (key for key in plain if graph.get(key).is_materializable):
        ours, theirs = graph.get(key), graph.get(fake_release.key(key.path[0]))
        assert theirs.group_name == f"fake_{ours.group_name}" and theirs.metadata["release"] == "fake"
        assert {
            p if p.path == ["spark_cluster"] else fake_release.key(p.path[0]) for p in ours.parent_keys
        } == set(theirs.parent_keys)
        for attribute in (
            "partitions_def",
            "automation_condition",
            "kinds",
            "description",
        ):
            assert getattr(ours, attribute) == getattr(theirs, attribute), (key, attribute)
        a, b = graph.assets_def_for_key(key), graph.assets_def_for_key(theirs.key)
        assert (a.backfill_policy, a.op.pool, a.op.required_resource_keys) == (
            b.backfill_policy,
            b.op.pool,
            b.op.required_resource_keys,
        )
        assert b.op.name == f"fake__{a.op.name}"
    checks = {(c.asset_key, c.name) for c in graph.asset_check_keys}
    assert {
        (fake_release.key(k.path[0]), name)
        for k, name in checks
        if len(k.path) == 1 and k.path[0] != "spark_cluster"
    } == {(k, name) for k, name in checks if k.path[0] == "fake"}
    assert defs.resolve_implicit_global_asset_job_def().name == "__ASSET_JOB"
    assert (
        defs.resolve_job_def("fake_catalogue_refresh").partitions_def
        == defs.resolve_job_def("catalogue_refresh").partitions_def
    )
    assert (
        dr3.model_name == "astrometric-quality-rf"
        and fake_release.model_name == "astrometric-quality-rf-fake"
    )


def test_classifier_runs_per_release(layout, spark, tmp_path, monkeypatch):
    """A release's training set, classifier and classified_sources live in its own folders and
    its own registered model; DR3's model is neither created nor consulted."""
    other = Release("other", contract_path=CONTRACTS_DIR / "gaia_source_dr3.yaml")
    monkeypatch.setitem(releases.RELEASES, other.name, other)
    own = other.layout(layout)
    publish_synthetic(own, STARS, seed=7, files=4)
    resources = _resources(tmp_path)
    trained = _run(
        other,
        [TRAINING_TABLE, CLASSIFIER],
        resources,
        run_config={"ops": {"other__astrometric_classifier": {"config": {"forest": {"n_estimators": 10}}}}},
    )
    regions = sorted(own.region_versions(SOURCE_TABLE))[:2]
    classified = _run(other, [CLASSIFIED_TABLE], resources, range_tags(regions[0], regions[-1]))

    [model] = _materializations(trained, other.key(CLASSIFIER))
    assert model.metadata["release"].value == "other"
    assert model.metadata["model"].value.startswith("models:/astrometric-quality-rf-other/")
    with resources["mlflow"].activate() as client:
        assert [m.name for m in client.search_registered_models()] == ["astrometric-quality-rf-other"]
        assert current_champion(client, other.model_name) is not None
    scored = _materializations(classified, other.key(CLASSIFIED_TABLE))
    assert {m.partition for m in scored} == set(regions)
    assert all(m.metadata["path"].value.startswith(str(own.warehouse / CLASSIFIED_TABLE)) for m in scored)
    assert sum(pq.read_table(own.region_dir(CLASSIFIED_TABLE, r)).num_rows for r in regions) > 0
    assert own.table(TRAINING_TABLE).exists()
    assert not [p for p in layout.warehouse.iterdir() if p.name != other.name], "nothing in DR3's warehouse"


def test_release_names_cannot_collide_with_folders_or_tables(layout):
    for name in ("DR4", "dr-4", "gaia_source", "truth", ""):
        with pytest.raises(ValueError, match="release name"):
            Release(name)
    dr4 = layout.for_release("dr4")
    assert layout.for_release(DEFAULT_RELEASE) is layout and dr4.for_release("dr4") is dr4
    assert dr4.hats == layout.hats / "dr4" and dr4.quarantine == layout.quarantine / "dr4"
    with pytest.raises(ValueError, match="no release 'dr5' inside"):
        dr4.for_release("dr5")
