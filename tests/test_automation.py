"""Sensor and schedule decide which regions to run, from the landing folder alone."""

import os

from dagster import build_schedule_context, build_sensor_context
from support.gaia_files import region_file_range, stars_in_region, write_gaia_file

from gaia_flows.schedules import nightly_refresh
from gaia_flows.sensors import affected_regions, contiguous_runs, landing_files_sensor


def test_contiguous_runs_group_neighbouring_regions():
    assert contiguous_runs(["hpx1-03", "hpx1-01", "hpx1-02", "hpx1-07", "hpx1-47"]) == [
        ("hpx1-01", "hpx1-03"),
        ("hpx1-07", "hpx1-07"),
        ("hpx1-47", "hpx1-47"),
    ]


def test_sensor_launches_only_regions_with_new_or_changed_files(layout):
    for region in ("hpx1-07", "hpx1-20"):
        lo, hi = region_file_range(region)
        write_gaia_file(layout.landing, lo, hi, stars_in_region(region, 5))
    first = landing_files_sensor(build_sensor_context(cursor=None))
    assert [
        (r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"])
        for r in first.run_requests
    ] == [
        ("hpx1-07", "hpx1-07"),
        ("hpx1-20", "hpx1-20"),
    ]
    quiet = landing_files_sensor(build_sensor_context(cursor=first.cursor))
    assert "no new or changed files" in quiet.skip_message

    lo, hi = region_file_range("hpx1-20")
    changed = write_gaia_file(layout.landing, lo, hi, stars_in_region("hpx1-20", 9))
    os.utime(changed, ns=(1, 2_000_000_000_000_000_000))
    again = landing_files_sensor(build_sensor_context(cursor=first.cursor))
    assert [r.tags["dagster/asset_partition_range_start"] for r in again.run_requests] == ["hpx1-20"]
    assert again.run_requests[0].run_key != first.run_requests[1].run_key


def test_file_straddling_two_regions_triggers_both(layout):
    lo7, _ = region_file_range("hpx1-07")
    _, hi8 = region_file_range("hpx1-08")
    path = write_gaia_file(layout.landing, lo7 + 10, hi8 - 10, stars_in_region("hpx1-07", 3))
    assert affected_regions([path]) == ["hpx1-07", "hpx1-08"]


def test_nightly_schedule_is_one_run_over_all_regions():
    request = nightly_refresh(build_schedule_context())
    assert request.tags["dagster/asset_partition_range_start"] == "hpx1-00"
    assert request.tags["dagster/asset_partition_range_end"] == "hpx1-47"


def test_first_look_skips_files_already_ingested(layout):
    """After `make demo` the daemon's first tick must not ingest the catalogue again: a file older
    than its region's published version is skipped; a newer one (or an unpublished region) runs."""
    old = []
    for region in ("hpx1-07", "hpx1-20"):
        lo, hi = region_file_range(region)
        old.append(write_gaia_file(layout.landing, lo, hi, stars_in_region(region, 5)))
    manifest = layout.region_dir("gaia_source", "hpx1-07") / "_region.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{}")
    os.utime(old[0], ns=(1, manifest.stat().st_mtime_ns - 1_000_000_000))
    first = landing_files_sensor(build_sensor_context(cursor=None))
    assert [r.tags["dagster/asset_partition_range_start"] for r in first.run_requests] == ["hpx1-20"]

    os.utime(old[0], ns=(1, manifest.stat().st_mtime_ns + 1_000_000_000))  # rewritten after publishing
    again = landing_files_sensor(build_sensor_context(cursor=None))
    assert [r.tags["dagster/asset_partition_range_start"] for r in again.run_requests] == [
        "hpx1-07",
        "hpx1-20",
    ]
