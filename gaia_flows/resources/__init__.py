"""Dagster resources (Python classes). Not to be confused with the top-level ``resources/``
folder, which holds the YAML deployment profiles these resources are built from."""

from __future__ import annotations

from pathlib import Path

from gaia_flows.layout import StateLayout
from gaia_flows.profiles import Profile, load_profile
from gaia_flows.resources.cloud import CloudResource
from gaia_flows.resources.mlflow import MlflowResource
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource


def build_resources(profile: Profile | None = None) -> dict:
    """The one place that maps a deployment profile to the resources the assets use."""
    profile = profile or load_profile()
    layout = StateLayout.from_env()
    conf = {"spark.local.dir": str(layout.spark_local_dir), **profile.spark_conf}
    storage = StorageResource.from_profile_storage(profile.storage)
    return {
        "storage": storage,
        "spark": SparkResource(
            master=profile.spark_master,
            spark_config=conf,
            cluster_manifest=_cluster_manifest(profile, layout),
        ),
        # The state folder has one owner: the cloud and MLflow resources find theirs through it.
        "cloud": CloudResource(
            storage=storage,
            profile=profile.name,
            profiles_dir=str(profile.directory) if profile.directory else None,
        ),
        "mlflow": MlflowResource(
            storage=storage,
            tracking_uri=profile.storage.get("mlflow_tracking_uri"),
            artifact_location=_mlflow_artifacts(profile.storage),
        ),
    }


def _mlflow_artifacts(storage: dict) -> str | None:
    """Artifacts on the shared file system when the profile has one (``<mount>/mlflow-artifacts``)."""
    if storage.get("mlflow_artifacts"):
        return storage["mlflow_artifacts"]
    return (Path(storage["mount"]) / "mlflow-artifacts").as_uri() if storage.get("mount") else None


def _cluster_manifest(profile: Profile, layout: StateLayout) -> str | None:
    """Manifest the spark_cluster asset writes for a profile with a cloud; its master URL wins."""
    from gaia_flows.cloud.settings import cluster_name_of, manifest_path

    name = cluster_name_of(profile)
    return str(manifest_path(layout.clusters, name)) if name else None
