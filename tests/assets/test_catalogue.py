"""``gaia_source`` materialised in process: two regions in one run, reruns, and bad input."""

import gzip
import os
import re

import pyarrow.parquet as pq
import pytest
from dagster import DagsterInstance, materialize
from support.gaia_files import (
    COLUMNS,
    header_for,
    region_file_range,
    render_rows,
    set_token,
    stars_in_region,
    write_gaia_file,
)
from support.spark import TEST_SPARK_CONF

from gaia_flows.assets.catalogue import gaia_landing, gaia_source, rows_conserved
from gaia_flows.engine.ingest import file_groups
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource
from gaia_flows.science import healpix

RANGE = {"dagster/asset_partition_range_start": "hpx1-07", "dagster/asset_partition_range_end": "hpx1-08"}


def _resources():
    return {
        "spark": SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF),
        "storage": StorageResource(),
    }


def _run(tags=RANGE, partition_key=None, raise_on_error=True, instance=None):
    return materialize(
        [gaia_landing, gaia_source, rows_conserved],
        selection=[gaia_source.key],
        resources=_resources(),
        tags=tags if partition_key is None else None,
        partition_key=partition_key,
        raise_on_error=raise_on_error,
        instance=instance,
    )


def _land_two_regions(layout, n7=400, n8=300):
    for region, n, seed in (("hpx1-07", n7, 1), ("hpx1-08", n8, 2)):
        lo, hi = region_file_range(region)
        mid = (lo + hi) // 2
        cols = stars_in_region(region, n, seed)
        level8 = cols["source_id"] >> 43
        for start, end in ((lo, mid), (mid + 1, hi)):  # two files per region, like DR3's many
            part = {k: v[(level8 >= start) & (level8 <= end)] for k, v in cols.items()}
            write_gaia_file(layout.landing, start, end, part)


def _region_table(layout, region):
    return pq.read_table(layout.region_dir("gaia_source", region))


def test_two_regions_in_one_run(layout, spark):
    _land_two_regions(layout)
    result = _run()
    assert result.success
    t7, t8 = _region_table(layout, "hpx1-07"), _region_table(layout, "hpx1-08")
    assert (t7.num_rows, t8.num_rows) == (400, 300)
    for table, pixel in ((t7, 7), (t8, 8)):
        sid = table.column("source_id").to_numpy()
        assert (sid[1:] > sid[:-1]).all(), "rows sorted by source_id, no duplicates"
        assert ((sid >> 57) == pixel).all()
    assert set(COLUMNS) <= set(t7.column_names)
    materializations = result.asset_materializations_for_node("gaia_source")
    by_partition = {m.partition: m.metadata for m in materializations}
    assert set(by_partition) == {"hpx1-07", "hpx1-08"}
    assert by_partition["hpx1-07"]["rows_in"].value == 400
    assert by_partition["hpx1-07"]["rows_rejected"].value == 0
    checks = result.get_asset_check_evaluations()
    assert [c.passed for c in checks] == [True]


def test_run_reports_the_bytes_its_python_tasks_read_and_wrote(layout, spark):
    """Spark's stage metrics do not see the landing files the tasks open with pyarrow: the tasks
    report them, and what they wrote, themselves."""
    _land_two_regions(layout)
    result = _run()
    run = result.asset_materializations_for_node("gaia_source")[0].metadata
    landed = sorted(layout.landing.glob("*.csv.gz"))
    assert run["python_read_bytes"].value == sum(p.stat().st_size for p in landed) > 0
    assert run["python_read_files"].value == len(landed) == 4
    assert run["python_read_rows"].value == run["run_rows_in"].value == 700
    written = [
        p
        for region in ("hpx1-07", "hpx1-08")
        for p in layout.region_dir("gaia_source", region).glob("*.parquet")
    ]
    assert run["python_written_bytes"].value == sum(p.stat().st_size for p in written)
    assert 0 < run["task_cpu_seconds"].value <= run["task_wall_seconds"].value * 1.05
    (host,) = run["python_per_host"].value.values()
    assert host["read_bytes"] == run["python_read_bytes"].value


def test_rerun_is_idempotent_and_leaves_other_regions_alone(layout, spark):
    _land_two_regions(layout)
    _run()
    before7 = _region_table(layout, "hpx1-07")
    version8 = os.readlink(layout.region_dir("gaia_source", "hpx1-08"))
    assert _run(tags=None, partition_key="hpx1-07").success
    after7 = _region_table(layout, "hpx1-07")
    assert after7.equals(before7)
    assert os.readlink(layout.region_dir("gaia_source", "hpx1-08")) == version8
    assert len(list((layout.table("gaia_source") / ".versions").iterdir())) == 2, "old version removed"


def test_bad_rows_are_quarantined_with_reasons_and_counts_conserved(layout, spark):
    region = "hpx1-07"
    cols = stars_in_region(region, 50, 3)
    rows = render_rows(cols)
    rows[3] = set_token(rows[3], "ra", "361.5")
    rows[4] = set_token(rows[4], "pmra", "fast")
    rows.append(rows[10])  # duplicate source_id: the first is kept
    rows.append(set_token(rows[11], "dec", "null"))  # duplicate that is also bad
    lo, hi = region_file_range(region)
    write_gaia_file(layout.landing, lo, hi, cols, rows=rows)
    result = _run(tags=None, partition_key=region)
    assert result.success
    accepted = _region_table(layout, region)
    quarantine = pq.read_table(layout.quarantine_dir("gaia_source", region)).to_pandas().sort_values("_line")
    assert accepted.num_rows == 48
    assert len(quarantine) == 4 and accepted.num_rows + len(quarantine) == len(rows)
    assert quarantine["_rule"].tolist() == ["range:ra", "parse:pmra", "duplicate:source_id", "null:dec"]
    first_data_line = header_for(COLUMNS).count("\n") + 1
    assert quarantine["_line"].tolist() == [
        first_data_line + 3,
        first_data_line + 4,
        first_data_line + 50,
        first_data_line + 51,
    ]
    assert set(quarantine["_file"].map(os.path.basename)) == {f"GaiaSource_{lo:06d}-{hi:06d}.csv.gz"}
    assert int(cols["source_id"][10]) in accepted.column("source_id").to_pylist()
    meta = result.asset_materializations_for_node("gaia_source")[0].metadata
    assert meta["rows_in"].value == 52 and meta["rows_rejected"].value == 4


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _wrong_column_count(path):
    text = gzip.decompress(path.read_bytes()).decode().splitlines()
    text[-5] = ",".join(text[-5].split(",")[:-2])
    path.write_bytes(gzip.compress(("\n".join(text) + "\n").encode()))


def _no_ecsv_header(path):
    text = gzip.decompress(path.read_bytes()).decode().splitlines()
    path.write_bytes(
        gzip.compress(("\n".join(line for line in text if not line.startswith("#")) + "\n").encode())
    )


def _garbled_header(path):
    text = gzip.decompress(path.read_bytes()).decode().splitlines()
    names_line = next(i for i, line in enumerate(text) if not line.startswith("#"))
    text[names_line] = text[names_line].replace("ra,ra_error", "ra_error,ra")
    path.write_bytes(gzip.compress(("\n".join(text) + "\n").encode()))


@pytest.mark.parametrize(
    "damage, message",
    [
        (_truncated, r"line \d+: unreadable after line \d+ .*truncated or corrupt file"),
        (_wrong_column_count, r"line \d+: wrong column count: expected 13, found 11"),
        (_no_ecsv_header, r"line 1: missing ECSV header"),
        (_garbled_header, r"line \d+: garbled header: CSV column names disagree"),
    ],
)
def test_bad_file_fails_its_region_only_and_keeps_the_previous_version(layout, spark, damage, message):
    _land_two_regions(layout, n7=3000)
    instance = DagsterInstance.ephemeral()
    assert _run(instance=instance).success
    previous = _region_table(layout, "hpx1-07")
    previous_version = os.readlink(layout.region_dir("gaia_source", "hpx1-07"))
    lo, hi = region_file_range("hpx1-07")
    victim = layout.landing / f"GaiaSource_{lo:06d}-{(lo + hi) // 2:06d}.csv.gz"
    damage(victim)
    result = _run(raise_on_error=False, instance=instance)
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data.user_failure_data
    assert victim.name in failure.description and "hpx1-07" in failure.description
    assert re.search(message, failure.description), failure.description
    assert "hpx1-08" not in failure.metadata["failed_regions"].value
    assert os.readlink(layout.region_dir("gaia_source", "hpx1-07")) == previous_version
    assert _region_table(layout, "hpx1-07").equals(previous)


def test_unknown_file_name_is_named(layout, spark):
    _land_two_regions(layout)
    stray = layout.landing / "gaia_extract_2024.csv.gz"
    stray.write_bytes(gzip.compress(b"a,b\n1,2\n"))
    result = _run(raise_on_error=False)
    assert not result.success
    text = "\n".join(str(e.event_specific_data) for e in result.all_events if e.is_step_failure)
    assert "gaia_extract_2024.csv.gz" in text and "unknown file name" in text


def test_conservation_check_fails_when_rows_go_missing(layout, spark):
    _land_two_regions(layout)
    _run()
    victim = next(layout.region_dir("gaia_source", "hpx1-08").glob("*.parquet"))
    victim.unlink()
    result = _run(tags=None, partition_key="hpx1-07", raise_on_error=False)
    assert not result.success, "the check is blocking"
    check = result.get_asset_check_evaluations()[0]
    assert not check.passed
    assert "hpx1-08" in check.metadata["mismatched"].value


def test_stars_landed_twice_are_deduplicated_first_file_kept(layout, spark):
    region = "hpx1-07"
    lo, hi = region_file_range(region)
    mid = (lo + hi) // 2
    cols = stars_in_region(region, 200, 5)
    write_gaia_file(layout.landing, lo, hi, cols)
    again = {k: v[(cols["source_id"] >> 43) <= mid] for k, v in cols.items()}
    again["pmra"] = again["pmra"] + 100.0  # tells which copy was kept
    write_gaia_file(layout.landing, lo, mid, again)  # overlaps the first file's range
    n_again = len(again["source_id"])
    assert 0 < n_again < 200
    result = _run(tags=None, partition_key=region)
    assert result.success
    accepted = _region_table(layout, region)
    sid = accepted.column("source_id").to_numpy()
    assert accepted.num_rows == 200 and (sid[1:] > sid[:-1]).all(), "every star once, sorted"
    pmra = dict(zip(sid.tolist(), accepted.column("pmra").to_pylist()))
    first = healpix.file_name(lo, mid)  # sorts before GaiaSource_<lo>-<hi>: its copies are kept
    assert all(abs(pmra[int(s)] - p) < 1e-3 for s, p in zip(again["source_id"], again["pmra"]))
    quarantine = pq.read_table(layout.quarantine_dir("gaia_source", region))
    assert quarantine.num_rows == n_again
    assert set(quarantine.column("_rule").to_pylist()) == {"duplicate:source_id"}
    assert (
        {os.path.basename(f) for f in quarantine.column("_file").to_pylist()}
        == {healpix.file_name(lo, hi)}
        != {first}
    )
    assert sorted(quarantine.column("source_id").to_pylist()) == sorted(again["source_id"].tolist())
    meta = result.asset_materializations_for_node("gaia_source")[0].metadata
    assert meta["rows_in"].value == 200 + n_again and meta["rejected_by_rule"].value == {
        "duplicate:source_id": n_again
    }


def test_files_with_overlapping_ranges_are_grouped_and_others_not():
    names = [
        healpix.file_name(*r) for r in ((0, 99), (100, 199), (150, 160), (161, 250), (300, 399), (300, 399))
    ]
    names[-1] = names[-1].replace(".csv.gz", ".csv")  # the same range landed as .csv and .csv.gz
    groups = file_groups([f"/landing/{n}" for n in reversed(names)])
    as_ranges = [[healpix.parse_file_range(p) for p in group] for group in groups]
    assert as_ranges == [[(0, 99)], [(100, 199), (150, 160), (161, 250)], [(300, 399), (300, 399)]]
