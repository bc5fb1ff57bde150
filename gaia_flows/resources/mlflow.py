"""MLflow as a Dagster resource: where runs, artifacts and registered models live.

By default everything sits in the state folder the storage resource owns (``<home>/mlflow``):
an SQLite tracking + registry store and a local artifact directory, so deleting the state folder
resets MLflow with the rest. ``MLFLOW_TRACKING_URI`` (and ``MLFLOW_REGISTRY_URI``) point it at a
server instead, exactly as the MLflow client itself would.

dagster-mlflow's ``mlflow_tracking`` is an old-style config-dict resource that opens one
MLflow run per Dagster run in its constructor; here one asset owns one MLflow run, so this is
our own ``ConfigurableResource``. It keeps dagster-mlflow's convention of tagging every MLflow
run with ``dagster_run_id``, so a run is found from either side.

Secrets: the resource never logs its own configuration. Credentials for a server or an
artifact store travel only in the environment variables MLflow reads itself
(``MLFLOW_TRACKING_TOKEN``, ``AWS_SECRET_ACCESS_KEY``...), and any ``user:password@`` in a URI
is removed before it is shown in metadata or logs.

Open the MLflow browser on the same store (one command, runs :func:`server_command`)::

    .venv/bin/gaia-flows mlflow      # http://127.0.0.1:5000
"""

# No ``from __future__ import annotations``: Dagster reads the ``storage`` annotation at class
# creation to know it is a nested resource, which a string annotation hides.
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlsplit, urlunsplit

from dagster import ConfigurableResource

from gaia_flows.layout import StateLayout
from gaia_flows.resources.storage import StorageResource

if TYPE_CHECKING:  # imported only where a store is used: mlflow takes seconds to import
    import mlflow

DEFAULT_EXPERIMENT = "gaia-flows"
DEFAULT_UI_PORT = 5000
_URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def redact_uri(uri: str) -> str:
    """``scheme://user:secret@host/...`` -> ``scheme://***@host/...``; other URIs unchanged."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
    return uri


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


class MlflowResource(ConfigurableResource):
    """Tracking and registry URIs, artifact location and the experiment assets log to.

    Every field left ``None`` is resolved when a run starts, never at import: first the
    environment (``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI``), then the state folder of
    ``storage`` (``StateLayout.mlflow_tracking_uri`` / ``mlflow_artifacts``).
    """

    storage: StorageResource
    tracking_uri: str | None = None
    registry_uri: str | None = None
    artifact_location: str | None = None
    experiment_name: str = DEFAULT_EXPERIMENT
    ui_url: str | None = None

    # --- resolution ------------------------------------------------------------------------------

    @property
    def layout(self) -> StateLayout:
        """The storage resource's state folder; nothing is created until a store is used."""
        return self.storage.paths

    def resolved_tracking_uri(self) -> str:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or self.layout.mlflow_tracking_uri

    def resolved_registry_uri(self) -> str:
        return self.registry_uri or os.environ.get("MLFLOW_REGISTRY_URI") or self.resolved_tracking_uri()

    def resolved_artifact_location(self) -> str | None:
        """Artifact root for a newly created experiment; ``None`` lets a server decide."""
        if self.artifact_location:
            return self.artifact_location
        if is_local_store(self.resolved_tracking_uri()):
            return self.layout.mlflow_artifacts.as_uri()
        return None

    def resolved_ui_url(self) -> str:
        if self.ui_url:
            return self.ui_url.rstrip("/")
        tracking = self.resolved_tracking_uri()
        if tracking.startswith(("http://", "https://")):
            return redact_uri(tracking).rstrip("/")
        return f"http://127.0.0.1:{DEFAULT_UI_PORT}"

    # --- use -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def activate(self) -> Iterator["mlflow.MlflowClient"]:
        """Point the MLflow client library at this store for the duration of the block.

        MLflow keeps its URIs in process globals; they are restored on exit so two resources
        (two test stores, say) never leak into each other.
        """
        import mlflow

        tracking, registry = self.resolved_tracking_uri(), self.resolved_registry_uri()
        if is_local_store(tracking):
            self.layout.mlflow_dir.mkdir(parents=True, exist_ok=True)
            self.layout.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
        saved_env = {name: os.environ.get(name) for name in _URI_ENV}
        mlflow.set_tracking_uri(tracking)
        mlflow.set_registry_uri(registry)
        try:
            yield mlflow.MlflowClient(tracking_uri=tracking, registry_uri=registry)
        finally:
            # set_*_uri also export the URIs as environment variables: undo both.
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)
            for name, value in saved_env.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def experiment_id(self, client) -> str:
        """The experiment's id, creating it (with the state-folder artifact root) if needed."""
        experiment = client.get_experiment_by_name(self.experiment_name)
        if experiment is not None:
            return experiment.experiment_id
        return client.create_experiment(
            self.experiment_name, artifact_location=self.resolved_artifact_location()
        )

    def run_url(self, experiment_id: str, run_id: str) -> str:
        return f"{self.resolved_ui_url()}/#/experiments/{experiment_id}/runs/{run_id}"

    def model_version_url(self, name: str, version: str | int) -> str:
        return f"{self.resolved_ui_url()}/#/models/{quote(name)}/versions/{version}"

    def describe(self) -> dict[str, str]:
        """Where this resource points, safe to show (credentials removed)."""
        return {
            "tracking_uri": redact_uri(self.resolved_tracking_uri()),
            "registry_uri": redact_uri(self.resolved_registry_uri()),
            "experiment": self.experiment_name,
        }


# --- the MLflow browser on the same store ------------------------------------------------------------


SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
"""Environment for ``mlflow server``: its job runner (huey consumer processes for MLflow's
generative-AI jobs) stays off, since the project uses tracking and the registry only and the
runner's processes would take a core while the server starts."""


def server_command(
    resource: MlflowResource,
    host: str = "127.0.0.1",
    port: int = DEFAULT_UI_PORT,
    workers: int = 1,
) -> list[str]:
    """``mlflow server`` on the resource's store (its state folder by default), bound to loopback;
    run it with :data:`SERVER_ENV`."""
    tracking = resource.resolved_tracking_uri()
    if not is_local_store(tracking):
        raise SystemExit(f"MLflow already runs as a server at {redact_uri(tracking)}: open that URL instead")
    resource.layout.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    return [
        str(mlflow_bin) if mlflow_bin.exists() else "mlflow",
        "server",
        "--backend-store-uri",
        tracking,
        "--registry-store-uri",
        resource.resolved_registry_uri(),
        "--artifacts-destination",
        resource.layout.mlflow_artifacts.as_uri(),
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
