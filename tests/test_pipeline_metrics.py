"""``gaia-flows metrics`` serves the pipeline's own figures to Prometheus, found through file_sd."""

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from dagster import materialize
from prometheus_client.parser import text_string_to_metric_families
from support.gaia_files import region_file_range, stars_in_region, write_gaia_file
from support.spark import TEST_SPARK_CONF

from gaia_flows.cli import dagster_env, open_instance
from gaia_flows.cloud.prometheus import PIPELINE_JOB, PIPELINE_TARGETS
from gaia_flows.definitions import defs
from gaia_flows.partitions import range_tags
from gaia_flows.resources import build_resources
from gaia_flows.resources.spark import SparkResource


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_exporter_serves_the_latest_materialization_figures_through_file_sd(layout, spark):
    for region, n in (("hpx1-07", 60), ("hpx1-08", 30)):
        lo, hi = region_file_range(region)
        write_gaia_file(layout.landing, lo, hi, stars_in_region(region, n, 1))
    instance = open_instance(layout)
    result = materialize(
        list(defs.assets),
        selection=["gaia_source"],
        resources={
            **build_resources(),
            "spark": SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF),
        },
        instance=instance,
        tags=range_tags("hpx1-07", "hpx1-08"),
    )
    run = result.asset_materializations_for_node("gaia_source")[0].metadata

    targets = layout.clusters / PIPELINE_TARGETS
    command = [str(Path(sys.executable).with_name("gaia-flows")), "metrics", "--port", "0"]
    log = layout.home / "metrics.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=dagster_env(layout), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not targets.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        (group,) = json.loads(targets.read_text())
        assert group["labels"] == {"job": PIPELINE_JOB, "__metrics_path__": "/metrics"}
        (address,) = group["targets"]
        assert address.startswith("127.0.0.1:")
        samples = _samples(f"http://{address}/metrics")

        def value(name: str, **labels) -> float:
            return samples[(f"gaia_flows_{name}", tuple(sorted(labels.items())))]

        source = {"asset": "gaia_source"}
        assert value("run_rows_in", **source) == run["run_rows_in"].value == 90
        assert value("run_rows_accepted", **source) == run["run_rows_accepted"].value
        assert value("python_read_bytes", **source) == run["python_read_bytes"].value > 0
        host = socket.gethostname()
        assert value("python_host_read_bytes", host=host, **source) == run["python_read_bytes"].value
        assert value("last_materialization_timestamp_seconds", **source) > time.time() - 600
        assert value("runs", status="SUCCESS") == 1 and value("runs", status="FAILURE") == 0
        assert not any(
            name.startswith("gaia_flows_") and dict(labels).get("asset") == "pm_stats"
            for name, labels in samples
        ), "an asset never materialized has no figures"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    assert code == 0, log.read_text()
    assert not targets.exists(), "the target disappears with the exporter"
