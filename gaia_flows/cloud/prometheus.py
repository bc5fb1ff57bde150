"""Prometheus metrics of the Spark daemons the platform starts, and where to scrape them.

Metrics of the daemons tell a slow shared filesystem from slow code. Every Spark master and
worker started here (cloud-init on VMs, the local driver's JVMs on loopback) serves Spark's ``PrometheusServlet`` on its web UI port, and
``spark_cluster`` writes a Prometheus file-based service-discovery file next to the cluster
manifest. A Prometheus started with ``deployments/prometheus/prometheus.yml`` then scrapes
whichever cluster exists now, and stops when teardown removes the file, with no edits.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

MASTER_UI_PORT = 8080
WORKER_UI_PORT = 8081

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
    labels = {"job": job, "gaia_cluster": cluster, "node": node["name"], "__metrics_path__": PATHS[job][1]}
    return [{"targets": [f"{ips[0]}:{node['ui_port']}"], "labels": labels}]


def scrape_targets(manifest: dict) -> list[dict]:
    """Prometheus ``file_sd`` target groups for a cluster manifest: the master (its own and its
    applications' metrics) and every worker, labelled with the cluster and the node name."""
    cluster = manifest["cluster"]
    groups = [
        g for job in ("spark-master", "spark-applications") for g in _group(job, cluster, manifest["master"])
    ]
    return groups + [g for worker in manifest["workers"] for g in _group("spark-worker", cluster, worker)]


def targets_path(manifest_path: Path) -> Path:
    """``<clusters>/<name>.prometheus.json``, the glob ``deployments/prometheus/prometheus.yml`` reads."""
    return manifest_path.with_name(f"{manifest_path.stem}.prometheus.json")


def write_targets(manifest_path: Path, manifest: dict) -> Path:
    """Written atomically: Prometheus re-reads the file whenever it changes."""
    path = targets_path(manifest_path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(scrape_targets(manifest), indent=2))
    os.replace(tmp, path)
    return path
