"""Prometheus metrics of the Spark daemons and machines the platform starts, and where to scrape them.

Metrics of the daemons tell a slow shared filesystem from slow code. Every Spark master and
worker started here (cloud-init on VMs, the local driver's JVMs on loopback) serves Spark's
``PrometheusServlet`` on its web UI port; on VMs, cloud-init also starts Debian's node exporter
(the host's CPU, memory, disk and network, which tell a slow machine from slow code).
``spark_cluster`` writes a Prometheus file-based service-discovery file next to the cluster
manifest. A Prometheus started with ``deployments/prometheus/prometheus.yml`` then scrapes
whichever cluster exists now, and stops when teardown removes the file, with no edits.
``gaia-flows metrics`` adds the pipeline's own figures the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MASTER_UI_PORT = 8080
WORKER_UI_PORT = 8081
# The host's own CPU, memory, disk and network figures: Debian's ``prometheus-node-exporter``,
# baked into the node image and started by cloud-init on this port (its Debian default).
NODE_EXPORTER_PORT = 9100
NODE_EXPORTER_PATH = "/metrics"

# Scrape path of each job, and the Spark metrics instance that serves it.
PATHS = {
    "spark-master": ("master", "/metrics/master/prometheus"),
    "spark-applications": ("applications", "/metrics/applications/prometheus"),
    "spark-worker": ("*", "/metrics/prometheus"),
}
_SERVLET = "org.apache.spark.metrics.sink.PrometheusServlet"


def daemon_java_options(role: str) -> str:
    """``-D`` options for ``SPARK_MASTER_OPTS`` / ``SPARK_WORKER_OPTS`` that turn the servlet on
    at the paths :func:`scrape_targets` names (no metrics.properties file to ship)."""
    jobs = ("spark-master", "spark-applications", "spark-worker") if role == "master" else ("spark-worker",)
    options = [f"-Dspark.metrics.conf.*.sink.prometheusServlet.class={_SERVLET}"]
    options += [
        f"-Dspark.metrics.conf.{PATHS[job][0]}.sink.prometheusServlet.path={PATHS[job][1]}" for job in jobs
    ]
    return " ".join(options)


def _group(job: str, cluster: str, node: dict) -> list[dict]:
    """One target group for ``node`` (a manifest entry, whose ``ui_port`` ``node_summary`` set),
    none if the cloud has not given it an address yet."""
    ips = node.get("private_ips") or node.get("public_ips") or []
    if not ips:
        return []
    port, path = (
        (NODE_EXPORTER_PORT, NODE_EXPORTER_PATH) if job == "node" else (node["ui_port"], PATHS[job][1])
    )
    labels = {"job": job, "gaia_cluster": cluster, "node": node["name"], "__metrics_path__": path}
    return [{"targets": [f"{ips[0]}:{port}"], "labels": labels}]


def scrape_targets(manifest: dict, node_exporters: bool) -> list[dict]:
    """Prometheus ``file_sd`` target groups for a cluster manifest: the master (its own and its
    applications' metrics) and every worker, labelled with the cluster and the node name; with
    ``node_exporters`` (machines cloud-init booted), each node's exporter too (job ``node``)."""
    cluster, nodes = manifest["cluster"], [manifest["master"], *manifest["workers"]]
    groups = [
        g for job in ("spark-master", "spark-applications") for g in _group(job, cluster, manifest["master"])
    ]
    groups += [g for worker in manifest["workers"] for g in _group("spark-worker", cluster, worker)]
    if node_exporters:
        groups += [g for node in nodes for g in _group("node", cluster, node)]
    return groups


def targets_path(manifest_path: Path) -> Path:
    """``<clusters>/<name>.prometheus.json``, the glob ``deployments/prometheus/prometheus.yml`` reads."""
    return manifest_path.with_name(f"{manifest_path.stem}.prometheus.json")


def _write(path: Path, groups: list[dict]) -> Path:
    """Written atomically: Prometheus re-reads the file whenever it changes."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(groups, indent=2))
    os.replace(tmp, path)
    return path


def write_targets(manifest_path: Path, manifest: dict, node_exporters: bool) -> Path:
    return _write(targets_path(manifest_path), scrape_targets(manifest, node_exporters))


# The pipeline's own figures (``gaia-flows metrics``): one target on the orchestrator, found
# through the same glob as the clusters' (the leading underscore keeps it apart from any
# cluster's name).
PIPELINE_JOB = "gaia-flows"
PIPELINE_TARGETS = "_pipeline.prometheus.json"


def write_pipeline_targets(clusters: Path, address: str) -> Path:
    """The ``file_sd`` file naming the exporter at ``address`` (``host:port``)."""
    clusters.mkdir(parents=True, exist_ok=True)
    groups = [{"targets": [address], "labels": {"job": PIPELINE_JOB, "__metrics_path__": "/metrics"}}]
    return _write(clusters / PIPELINE_TARGETS, groups)
