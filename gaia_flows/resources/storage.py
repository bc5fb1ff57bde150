"""The state folder as a Dagster resource."""

from __future__ import annotations

from dagster import ConfigurableResource

from gaia_flows.layout import StateLayout


class StorageResource(ConfigurableResource):
    """Paths of landing, warehouse, quarantine and maps; ``None`` means "from the environment"
    (``GAIA_FLOWS_HOME`` / ``GAIA_FLOWS_LANDING``), resolved when the run starts, not at import."""

    home: str | None = None
    landing: str | None = None

    @property
    def layout(self) -> StateLayout:
        return StateLayout.from_env(self.home, self.landing).ensure()
