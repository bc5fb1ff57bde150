"""``gaia_source`` outside the in-process harness: from the ``dagster`` command line against a
state folder, and on a real Spark standalone cluster with the same ingestion code."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from support.gaia_files import region_file_range, stars_in_region, write_gaia_file

from gaia_flows.contracts import load_contract
from gaia_flows.engine.ingest import ingest_regions
from gaia_flows.layout import REPO_ROOT, SOURCE_TABLE
from gaia_flows.warehouse import read_manifest


def _land(layout, region: str, n: int, seed: int) -> None:
    lo, hi = region_file_range(region)
    write_gaia_file(layout.landing, lo, hi, stars_in_region(region, n, seed))


def test_dagster_cli_materialises_one_region(layout, tmp_path):
    _land(layout, "hpx1-07", 250, 7)
    _land(layout, "hpx1-08", 50, 8)
    env = {
        **os.environ,
        "GAIA_FLOWS_HOME": str(layout.home),
        "DAGSTER_HOME": str(layout.dagster_home),
        "GAIA_FLOWS_PROFILE": "local",
    }
    dagster = Path(sys.executable).with_name("dagster")
    cmd = [
        str(dagster),
        "asset",
        "materialize",
        "-m",
        "gaia_flows.definitions",
        "--select",
        "gaia_source",
        "--partition",
        "hpx1-07",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "RUN_SUCCESS" in proc.stderr + proc.stdout
    table = pq.read_table(layout.region_dir("gaia_source", "hpx1-07"))
    assert table.num_rows == 250
    assert not layout.region_dir("gaia_source", "hpx1-08").exists(), "only the asked-for region is built"
    manifest = read_manifest(layout, "gaia_source", "hpx1-07")
    assert manifest["rows_in"] == manifest["rows_accepted"] + manifest["rows_rejected"] == 250
    runs = list((layout.dagster_home / "storage").iterdir())
    assert runs, "the run is recorded in the SQLite instance under the state folder"


@pytest.mark.cluster
def test_standalone_cluster_ingests_a_region_like_local_mode(layout, cluster_spark, standalone_cluster):
    _land(layout, "hpx1-21", 600, 21)
    status = standalone_cluster.status()
    assert len([w for w in status["workers"] if w["state"] == "ALIVE"]) == 2
    assert cluster_spark.sparkContext.master == standalone_cluster.master_url

    outcome = ingest_regions(cluster_spark, layout, ["hpx1-21"], load_contract(SOURCE_TABLE), 128 << 20)
    on_cluster = pq.read_table(layout.region_dir("gaia_source", "hpx1-21")).sort_by("source_id")
    manifest = read_manifest(layout, "gaia_source", "hpx1-21")
    apps = json.loads(_get(standalone_cluster.webui_url + "/json/"))["activeapps"]
    assert any(app["name"] == "gaia-flows" for app in apps), "the work ran as an application on the cluster"

    assert not outcome.failures and outcome.rows_read == 600
    assert on_cluster.num_rows == manifest["rows_accepted"] == 600
    sid = on_cluster.column("source_id").to_numpy()
    assert ((sid >> 57) == 21).all()


def _get(url: str) -> str:
    from urllib.request import urlopen

    with urlopen(url, timeout=10) as response:
        return response.read().decode()
