"""Profile ``local-cluster`` end to end: ``spark_cluster`` provisions a real Spark master and
workers on 127.0.0.1 through the local libcloud driver, ``gaia_source`` and ``pm_stats`` for
one region run on that cluster (the master URL comes from the asset's manifest), and the
``teardown_cluster`` job stops every JVM - checked by PID, executors included."""

import json
import re
import urllib.request

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from dagster import AssetSelection, materialize
from support.gaia_files import region_file_range, stars_in_region, write_gaia_file

from gaia_flows import spark as spark_factory
from gaia_flows.assets.catalogue import gaia_landing, gaia_source
from gaia_flows.assets.cluster import spark_cluster
from gaia_flows.assets.proper_motion import pm_stats
from gaia_flows.cloud import local_spark
from gaia_flows.jobs import teardown_cluster_job
from gaia_flows.resources import build_resources

REGION = "hpx1-07"
STARS = 600


def _jvm_pids(state_file) -> list[tuple[int, float]]:
    """(pid, start time) of every daemon the local driver started and every process under it."""
    nodes = json.loads(state_file.read_text())["nodes"].values()
    out = []
    for node in nodes:
        daemon = node["daemon"]
        out.append((daemon["pid"], daemon["create_time"]))
        try:
            out += [(p.pid, p.create_time()) for p in psutil.Process(daemon["pid"]).children(recursive=True)]
        except psutil.NoSuchProcess:
            pass
    return out


def _scrape(targets_file) -> dict[str, list[str]]:
    """GET every target of a Prometheus file_sd file at its metrics path, by job."""
    out: dict[str, list[str]] = {}
    for group in json.loads(targets_file.read_text()):
        for address in group["targets"]:
            assert address.startswith(f"{local_spark.LOOPBACK}:")
            url = f"http://{address}{group['labels']['__metrics_path__']}"
            with urllib.request.urlopen(url, timeout=10) as response:
                out.setdefault(group["labels"]["job"], []).append(response.read().decode())
    return out


def _gauge(text: str, name: str) -> float:
    (value,) = re.findall(rf'^metrics_{name}_Value{{type="gauges"}} (\S+)$', text, re.M)
    return float(value)


@pytest.mark.cluster
def test_local_cluster_profile_runs_gaia_source_and_pm_stats_on_the_provisioned_cluster(
    layout, monkeypatch, _spark_application
):
    monkeypatch.setenv("GAIA_FLOWS_PROFILE", "local-cluster")
    lo, hi = region_file_range(REGION)
    cols = stars_in_region(REGION, STARS, seed=5)
    rng = np.random.default_rng(5)
    cols["pmra_error"] = rng.uniform(0.02, 0.5, STARS)
    cols["pmdec_error"] = rng.uniform(0.02, 0.5, STARS)
    write_gaia_file(layout.landing, lo, hi, cols)
    resources = build_resources()
    state_file = layout.clusters / "local-spark" / "state.json"
    pids: list[tuple[int, float]] = []
    try:
        cluster_run = materialize([spark_cluster], resources=resources)
        meta = {
            k: v.value
            for k, v in cluster_run.asset_materializations_for_node("spark_cluster")[0].metadata.items()
        }
        manifest = json.loads((layout.clusters / "gaia-local.json").read_text())
        assert meta["master_url"] == manifest["master_url"] and meta["master_url"].startswith(
            "spark://127.0.0.1:"
        )
        assert meta["worker_count"] == 2 and len(meta["created"]) == 3
        # What Prometheus would scrape (deployments/prometheus): every daemon, over HTTP.
        scraped = _scrape(layout.clusters / "gaia-local.prometheus.json")
        assert {job: len(texts) for job, texts in scraped.items()} == {
            "spark-master": 1,
            "spark-applications": 1,
            "spark-worker": 2,
        }
        assert _gauge(scraped["spark-master"][0], "master_aliveWorkers") == 2
        cores = manifest["size"]["vcpus"]
        for worker in scraped["spark-worker"]:
            assert _gauge(worker, "worker_coresFree") + _gauge(worker, "worker_coresUsed") == cores

        run = materialize(
            [spark_cluster, gaia_landing, gaia_source, pm_stats],
            selection=AssetSelection.assets(gaia_source, pm_stats),
            partition_key=REGION,
            resources=resources,
        )
        assert run.success
        session = spark_factory.session(meta["master_url"], {})
        assert session.sparkContext.master == meta["master_url"], (
            "the assets ran on the provisioned cluster, not local[*]"
        )
        assert session.conf.get("spark.executor.cores") == manifest["spark_conf"]["spark.executor.cores"], (
            "the plan shaped the executors"
        )
        master = manifest["master"]
        master_daemon = json.loads(state_file.read_text())["nodes"][master["id"]]["daemon"]
        assert local_spark.pid_alive(master_daemon["pid"], master_daemon["create_time"])
        status = local_spark.master_status(master_daemon["webui_port"])
        assert sum(1 for w in status["workers"] if w["state"] == "ALIVE") == 2
        assert any(app["name"] == "gaia-flows" for app in status["activeapps"] + status["completedapps"])
        pids = _jvm_pids(state_file)
        assert len(pids) >= 3 + 2, "master, two workers and their executors"

        source = pq.read_table(layout.region_dir("gaia_source", REGION))
        assert source.num_rows == STARS
        stats = pq.read_table(layout.region_dir("pm_stats", REGION)).to_pandas()
        assert int(stats["n_sources"].sum()) == STARS
        assert int(stats["n_pm"].sum()) == STARS
        # CSV round trip keeps repr(float) exactly; only the summation order differs.
        assert stats["sum_pmra"].sum() == pytest.approx(cols["pmra"].sum(), rel=1e-9, abs=1e-6)
        assert stats["sumw_pmdec"].sum() == pytest.approx(
            (1 / cols["pmdec_error"] ** 2).sum(), rel=1e-6
        )  # errors are float32 in the contract
    finally:
        spark_factory.stop_active()  # release the executors before their workers go
        if not pids and state_file.exists():
            pids = _jvm_pids(state_file)
        torn = teardown_cluster_job.execute_in_process(resources={"cloud": resources["cloud"]})
    assert torn.success
    assert len(torn.output_for_node("teardown_cluster_nodes")["destroyed_nodes"]) == 3
    alive = [pid for pid, started in pids if local_spark.pid_alive(pid, started)]
    assert alive == [], f"JVMs still running after teardown: {alive}"
    assert json.loads(state_file.read_text())["nodes"] == {}
