"""``gaia-flows status`` reads the instance: materialised, stale and failed regions per asset."""

from dagster import materialize
from rich.console import Console
from support.gaia_files import region_file_range, stars_in_region, write_gaia_file
from support.spark import TEST_SPARK_CONF

from gaia_flows.cli import open_instance
from gaia_flows.cli_status import asset_statuses, champion, status_table
from gaia_flows.definitions import defs
from gaia_flows.partitions import range_tags
from gaia_flows.resources import build_resources
from gaia_flows.resources.mlflow import MlflowResource
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource


def test_status_counts_materialised_stale_and_failed_regions(layout, spark):
    files = {}
    for region, n in (("hpx1-07", 60), ("hpx1-08", 30)):
        lo, hi = region_file_range(region)
        files[region] = write_gaia_file(layout.landing, lo, hi, stars_in_region(region, n, 1))
    instance = open_instance(layout)
    assets = list(defs.assets)
    resources = {**build_resources(), "spark": SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF)}

    def run(selection, first, last):
        return materialize(
            assets,
            selection=selection,
            resources=resources,
            instance=instance,
            tags=range_tags(first, last),
            raise_on_error=False,
        )

    assert run(["gaia_source", "pm_stats"], "hpx1-07", "hpx1-08").success
    assert run(["gaia_source"], "hpx1-07", "hpx1-07").success  # pm_stats of hpx1-07 is now stale
    files["hpx1-08"].write_bytes(files["hpx1-08"].read_bytes()[:100])
    assert not run(["gaia_source"], "hpx1-08", "hpx1-08").success

    by_name = {s.name: s for s in asset_statuses(instance, defs.resolve_asset_graph())}
    source, stats, maps = by_name["gaia_source"], by_name["pm_stats"], by_name["proper_motion_maps"]
    assert (source.materialized, source.stale, source.failed, source.total) == (1, 0, 1, 48)
    assert source.last_run_status == "FAILURE"
    assert (stats.materialized, stats.stale, stats.failed) == (2, 1, 0)
    assert stats.last_run_status == "SUCCESS" and stats.last_materialized is not None
    assert (maps.materialized, maps.last_materialized, maps.last_run) == (0, None, None)
    assert champion(MlflowResource(storage=StorageResource())) is None, (
        "an empty state folder has no champion (and status creates no store)"
    )
    assert not layout.mlflow_dir.joinpath("mlflow.db").exists()

    console = Console(width=140, record=True)
    console.print(status_table(list(by_name.values())))
    text = console.export_text()
    assert "1/48 regions" in text and "2/48 regions" in text
