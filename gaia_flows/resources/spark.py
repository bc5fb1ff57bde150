"""Spark as a Dagster resource, wrapping dagster-pyspark's lazy session."""

from __future__ import annotations

import json
from pathlib import Path

from dagster import ConfigurableResource
from pyspark.sql import SparkSession

from gaia_flows import spark as spark_factory


class SparkResource(ConfigurableResource):
    """Spark session for the run, started only when an asset first asks for it.

    ``cluster_manifest`` points at the manifest the ``spark_cluster`` asset writes; when it
    exists its master URL wins over ``master``, so the same graph runs on ``local[*]``, a
    loopback standalone cluster or cloud VMs without touching asset code.
    """

    master: str = "local[*]"
    spark_config: dict[str, str] = {}
    cluster_manifest: str | None = None

    def resolved_master(self) -> str:
        if self.cluster_manifest and Path(self.cluster_manifest).exists():
            return json.loads(Path(self.cluster_manifest).read_text())["master_url"]
        return self.master

    def session(self) -> SparkSession:
        return spark_factory.session(self.resolved_master(), self.spark_config)
