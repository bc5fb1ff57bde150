"""The Prometheus file_sd targets a cluster manifest turns into: the Spark daemons everywhere,
the node exporter only on machines cloud-init booted."""

from gaia_flows.cloud.prometheus import scrape_targets

MANIFEST = {
    "cluster": "c",
    "master": {"name": "c-master", "private_ips": ["10.0.0.2"], "ui_port": 8080},
    "workers": [
        {"name": "c-worker-0", "private_ips": ["10.0.0.3"], "ui_port": 8081},
        {"name": "c-worker-1", "private_ips": [], "public_ips": [], "ui_port": 8081},  # no address yet
    ],
}


def _by_job(groups: list[dict]) -> dict[str, dict[str, list[str]]]:
    jobs: dict[str, dict[str, list[str]]] = {}
    for group in groups:
        labels = group["labels"]
        assert labels["gaia_cluster"] == "c"
        jobs.setdefault(labels["job"], {})[labels["node"]] = [*group["targets"], labels["__metrics_path__"]]
    return jobs


def test_vms_are_scraped_for_their_node_exporter_on_9100():
    jobs = _by_job(scrape_targets(MANIFEST, node_exporters=True))
    assert jobs["node"] == {
        "c-master": ["10.0.0.2:9100", "/metrics"],
        "c-worker-0": ["10.0.0.3:9100", "/metrics"],
    }
    assert jobs["spark-worker"] == {"c-worker-0": ["10.0.0.3:8081", "/metrics/prometheus"]}
    assert set(jobs) == {"spark-master", "spark-applications", "spark-worker", "node"}


def test_local_processes_have_only_their_spark_targets():
    local = scrape_targets(MANIFEST, node_exporters=False)
    assert local == [g for g in scrape_targets(MANIFEST, node_exporters=True) if g["labels"]["job"] != "node"]
    assert set(_by_job(local)) == {"spark-master", "spark-applications", "spark-worker"}
