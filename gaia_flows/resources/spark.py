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

    def _manifest(self) -> dict | None:
        if self.cluster_manifest and Path(self.cluster_manifest).exists():
            return json.loads(Path(self.cluster_manifest).read_text())
        return None

    def resolved_master(self) -> str:
        manifest = self._manifest()
        return manifest["master_url"] if manifest else self.master

    def session(self) -> SparkSession:
        # The planner's executor shape and shuffle partitions belong to the cluster it sized,
        # so on a provisioned cluster they win over the profile's generic settings.
        manifest = self._manifest()
        if manifest is None:
            return spark_factory.session(self.master, self.spark_config)
        return spark_factory.session(manifest["master_url"], {**self.spark_config, **manifest.get("spark_conf", {})})
