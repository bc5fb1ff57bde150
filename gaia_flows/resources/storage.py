"""The state folder as a Dagster resource."""

from __future__ import annotations

from dagster import ConfigurableResource, InitResourceContext

from gaia_flows.layout import StateLayout


class StorageResource(ConfigurableResource):
    """Paths of landing, warehouse, quarantine and maps; ``None`` means "from the environment"
    (``GAIA_FLOWS_HOME`` / ``GAIA_FLOWS_LANDING``), resolved when the run starts, not at import."""

    home: str | None = None
    landing: str | None = None

    @property
    def layout(self) -> StateLayout:
        return StateLayout.from_env(self.home, self.landing).ensure()

    def setup_for_execution(self, context: InitResourceContext) -> None:
        """Record this run's worker process (host, PID, start time) on the run, so the
        monitoring daemon can mark the run failed if the process dies (gaia_flows.run_launcher)."""
        from gaia_flows.run_launcher import run_worker_tag

        if context.instance is not None and context.dagster_run is not None:
            context.instance.add_run_tags(context.dagster_run.run_id, run_worker_tag())
