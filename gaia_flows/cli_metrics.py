"""``gaia-flows metrics``: the pipeline's own figures as Prometheus metrics.

Spark's servlets and the node exporters show what the machines did; this shows what the
pipeline did, from the same records the Dagster UI reads. At each scrape, for every asset of
the graph, the numbers of its latest materialization's metadata (rows in, accepted and
quarantined, bytes Python tasks read, CPU against wall seconds, ...) become gauges
``gaia_flows_<name>{asset=...}``; the per-host breakdowns become
``gaia_flows_python_host_<figure>{asset, host}`` and ``gaia_flows_spark_host_<figure>{asset, host}``;
and ``gaia_flows_runs{status}`` counts the instance's runs. Prometheus finds the endpoint
through the same file-based service discovery as the clusters
(:func:`gaia_flows.cloud.prometheus.write_pipeline_targets`): the file exists while the
exporter runs.
"""

from __future__ import annotations

import argparse
import re
import signal
import threading
from collections.abc import Iterator

from dagster import AssetKey, DagsterInstance, DagsterRunStatus, RunsFilter
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gaia_flows.cli import open_instance
from gaia_flows.cloud.prometheus import write_pipeline_targets
from gaia_flows.layout import StateLayout

PREFIX = "gaia_flows"
HOST_BREAKDOWNS = {"python_per_host": "python_host", "spark_per_host": "spark_host"}


def _name(*parts: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", "_".join((PREFIX, *parts)))


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class PipelineCollector(Collector):
    """Gauges from ``instance``'s latest materialization of each of ``keys``, read at scrape time."""

    def __init__(self, instance: DagsterInstance, keys: list[AssetKey]):
        self.instance = instance
        self.keys = keys

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families: dict[str, GaugeMetricFamily] = {}

        def gauge(name: str, labels: list[str], documentation: str) -> GaugeMetricFamily:
            if name not in families:
                families[name] = GaugeMetricFamily(name, documentation, labels=labels)
            return families[name]

        for key in self.keys:
            asset = key.to_user_string()
            event = self.instance.get_latest_materialization_event(key)
            if event is None or event.asset_materialization is None:
                continue
            gauge(
                _name("last_materialization_timestamp_seconds"),
                ["asset"],
                "When the asset was last materialized (Unix seconds).",
            ).add_metric([asset], event.timestamp)
            for entry, metadata in event.asset_materialization.metadata.items():
                value = metadata.value
                if entry in HOST_BREAKDOWNS and isinstance(value, dict):
                    for host, figures in value.items():
                        for figure, number in figures.items():
                            if (number := _number(number)) is not None:
                                gauge(
                                    _name(HOST_BREAKDOWNS[entry], figure),
                                    ["asset", "host"],
                                    f"{figure} per executor host ({entry}), latest materialization.",
                                ).add_metric([asset, host], number)
                elif (number := _number(value)) is not None:
                    gauge(
                        _name(entry), ["asset"], f"Metadata '{entry}' of the latest materialization."
                    ).add_metric([asset], number)
        runs = gauge(_name("runs"), ["status"], "Runs in the Dagster instance, by status.")
        for status in DagsterRunStatus:
            runs.add_metric([status.value], self.instance.get_runs_count(RunsFilter(statuses=[status])))
        yield from families.values()


def cmd_metrics(args: argparse.Namespace) -> int:
    from gaia_flows.definitions import defs

    layout = StateLayout.from_env().ensure()
    instance = open_instance(layout)
    keys = list(defs.resolve_asset_graph().toposorted_asset_keys)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(instance, keys))
    server, _ = start_http_server(args.port, addr=args.host, registry=registry)
    port = server.server_port
    targets = write_pipeline_targets(layout.clusters, f"{args.host}:{port}")
    print(f"serving http://{args.host}:{port}/metrics; Prometheus targets in {targets}", flush=True)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    finally:
        targets.unlink(missing_ok=True)
        server.shutdown()
    return 0
