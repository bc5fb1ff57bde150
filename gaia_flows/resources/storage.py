"""The state folder and the shared data folders as a Dagster resource."""

from __future__ import annotations

from dagster import ConfigurableResource, InitResourceContext

from gaia_flows.layout import StateLayout


class StorageResource(ConfigurableResource):
    """The state folder and the paths of landing, warehouse, quarantine and maps.

    The one resource that knows where the state folder is: the MLflow and cloud resources take
    it as a nested resource and find their stores under it. ``None`` means "from the environment" (``GAIA_FLOWS_HOME`` / ``GAIA_FLOWS_LANDING``),
    resolved when the run starts, not at import. ``mount`` and the folder fields come from the
    profile's ``storage`` section (:meth:`StateLayout.with_storage`): on a multi-host cluster
    they name the shared file system every node mounts, so executors and driver see one warehouse.
    """

    home: str | None = None
    landing: str | None = None
    mount: str | None = None
    warehouse: str | None = None
    quarantine: str | None = None
    maps: str | None = None

    @property
    def paths(self) -> StateLayout:
        """The folders, resolved from the fields and the environment, none of them created (for
        readers such as ``gaia-flows status`` that must leave an empty state folder empty)."""
        shared = {
            "mount": self.mount,
            "warehouse": self.warehouse,
            "quarantine": self.quarantine,
            "maps": self.maps,
        }
        return StateLayout.from_env(self.home, self.landing).with_storage(shared)

    @property
    def layout(self) -> StateLayout:
        """The folders, created if missing."""
        return self.paths.ensure()

    def setup_for_execution(self, context: InitResourceContext) -> None:
        """Record this run's worker process (host, PID, start time) on the run, so the
        monitoring daemon can mark the run failed if the process dies (gaia_flows.run_launcher)."""
        from gaia_flows.run_launcher import run_worker_tag

        if context.instance is not None and context.dagster_run is not None:
            context.instance.add_run_tags(context.dagster_run.run_id, run_worker_tag())

    @classmethod
    def from_profile_storage(cls, storage: dict) -> StorageResource:
        return cls(**{k: storage.get(k) for k in ("landing", "mount", "warehouse", "quarantine", "maps")})
