"""What a Dagster run did, read from its events in the instance: per asset the regions done,
rows in, accepted and quarantined, wall time, and the failure in plain words.

The command line (``gaia-flows demo``) watches a run through this while the run writes its
events, so the progress bar and the summary come from the same records the UI shows, never
from parsing log text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dagster import DagsterEventType, DagsterInstance

WATCHED = {
    DagsterEventType.STEP_START,
    DagsterEventType.STEP_SUCCESS,
    DagsterEventType.STEP_FAILURE,
    DagsterEventType.ASSET_MATERIALIZATION,
    DagsterEventType.RUN_SUCCESS,
    DagsterEventType.RUN_FAILURE,
}

# Metadata names the assets use for a partition's rows: "rows_in"/"rows_accepted"/"rows_rejected"
# where rows are validated (gaia_source), "rows" elsewhere.
ROWS_IN = ("rows_in", "rows")
ACCEPTED = ("rows_accepted",)
QUARANTINED = ("rows_rejected",)


def _number(metadata: dict, names: tuple[str, ...]) -> int | None:
    for name in names:
        if name in metadata:
            value = metadata[name].value
            if isinstance(value, (int, float)):
                return int(value)
    return None


@dataclass
class AssetProgress:
    """One asset's share of a run, built up event by event."""

    name: str
    regions: set[str] = field(default_factory=set)
    rows_in: int = 0
    accepted: int | None = None
    """``None`` for an asset that does not validate rows (nothing to accept or quarantine)."""
    quarantined: int | None = None
    started: float | None = None
    finished: float | None = None
    failure: str | None = None
    failed_regions: list[str] = field(default_factory=list)

    @property
    def wall_seconds(self) -> float | None:
        return None if self.started is None or self.finished is None else self.finished - self.started

    def add(self, partition: str | None, metadata: dict) -> None:
        """Count one materialisation: a partition's own numbers, or a whole unpartitioned asset."""
        if partition is not None:
            self.regions.add(partition)
        self.rows_in += _number(metadata, ROWS_IN) or 0
        accepted, quarantined = _number(metadata, ACCEPTED), _number(metadata, QUARANTINED)
        if accepted is not None:
            self.accepted = (self.accepted or 0) + accepted
        if quarantined is not None:
            self.quarantined = (self.quarantined or 0) + quarantined


@dataclass
class RunReport:
    """Everything the command line says about one run; ``update`` takes records in order."""

    run_id: str
    selection: frozenset[str] = frozenset()
    """The run's assets; other steps (asset checks) are reported only when they fail."""
    assets: dict[str, AssetProgress] = field(default_factory=dict)
    failed_checks: dict[str, str] = field(default_factory=dict)
    status: str = "STARTED"  # STARTED, SUCCESS or FAILURE
    run_failure: str | None = None

    def asset(self, name: str) -> AssetProgress:
        return self.assets.setdefault(name, AssetProgress(name))

    def update(self, record) -> tuple[str, AssetProgress | None]:
        """Apply one event record; returns its type name and the asset it concerns (if any)."""
        entry = record.event_log_entry
        event = entry.dagster_event
        kind = event.event_type
        if kind == DagsterEventType.ASSET_MATERIALIZATION:
            materialization = event.event_specific_data.materialization
            progress = self.asset(materialization.asset_key.to_user_string())
            progress.add(materialization.partition, dict(materialization.metadata))
            return kind.value, progress
        if kind == DagsterEventType.STEP_FAILURE and event.step_key not in self.selection:
            self.failed_checks[event.step_key] = _failure(event.event_specific_data)[0]
            return kind.value, None
        if (
            kind
            in (DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE)
            and event.step_key in self.selection
        ):
            progress = self.asset(event.step_key)
            if kind == DagsterEventType.STEP_START:
                progress.started = entry.timestamp
            else:
                progress.finished = entry.timestamp
            if kind == DagsterEventType.STEP_FAILURE:
                progress.failure, progress.failed_regions = _failure(event.event_specific_data)
            return kind.value, progress
        if kind == DagsterEventType.RUN_SUCCESS:
            self.status = "SUCCESS"
        elif kind == DagsterEventType.RUN_FAILURE:
            self.status = "FAILURE"
            self.run_failure = entry.message or event.message
        return kind.value, None

    @property
    def failed(self) -> list[AssetProgress]:
        return [a for a in self.assets.values() if a.failure is not None]


def _failure(data) -> tuple[str, list[str]]:
    """A step failure's message and the regions it names: a ``Failure``'s description and its
    ``failed_regions`` metadata, or the exception's own first line."""
    user = data.user_failure_data
    if user is not None:
        regions = user.metadata.get("failed_regions") if user.metadata else None
        named = sorted(regions.value) if regions is not None and isinstance(regions.value, dict) else []
        return (user.description or user.label or "failed").strip(), named
    if data.error is not None:
        cause = data.error.cause or data.error
        while cause.cause is not None:
            cause = cause.cause
        return f"{data.error.cls_name}: {data.error.message.strip()}" + (
            f" (caused by {cause.cls_name}: {cause.message.strip()})" if cause is not data.error else ""
        ), []
    return "failed", []


def read_new_events(
    instance: DagsterInstance, report: RunReport, cursor: str | None
) -> tuple[list, str | None]:
    """The watched events written since ``cursor``, applied to ``report``; returns them with
    the next cursor."""
    applied = []
    while True:
        connection = instance.get_records_for_run(report.run_id, cursor=cursor, of_type=WATCHED)
        for record in connection.records:
            applied.append(report.update(record))
        cursor = connection.cursor if connection.records else cursor
        if not connection.has_more:
            return applied, cursor
