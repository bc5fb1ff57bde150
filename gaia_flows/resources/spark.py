"""Spark as a Dagster resource, wrapping dagster-pyspark's lazy session."""

from __future__ import annotations

import json
from pathlib import Path

from dagster import ConfigurableResource
from pyspark.sql import SparkSession

from gaia_flows import spark as spark_factory
from gaia_flows.cloud.secret import read_secret, secret_path


class SparkResource(ConfigurableResource):
    """Spark session for the run, started only when an asset first asks for it.

    ``cluster_manifest`` points at the manifest the ``spark_cluster`` asset writes; when it
    exists its master URL wins over ``master``, so the same graph runs on ``local[*]``, a
    loopback standalone cluster or cloud VMs without touching asset code. The manifest also
    carries how the driver reaches the cluster (its address and fixed ports, authentication);
    the cluster's secret is read from its own file, never from the manifest.
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
        conf = {**self.spark_config, **manifest.get("spark_conf", {})}
        if conf.get("spark.authenticate") == "true":
            # The cluster's secret, read now from its 0600 file; Spark redacts it in its UI and logs.
            conf["spark.authenticate.secret"] = read_secret(
                secret_path(Path(self.cluster_manifest).parent, manifest["cluster"])
            )
        return spark_factory.session(manifest["master_url"], conf)
