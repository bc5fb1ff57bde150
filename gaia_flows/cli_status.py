"""``gaia-flows status``: what the state folder holds, from the Dagster instance and MLflow.

One row per asset: when it was last materialised, how many regions are materialised, stale
(their upstream region was materialised again since) or failed, and the last run that touched
it; then the model the ``champion`` alias points at and its accuracy. It reads the same
records the UI shows and starts nothing.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from dagster import AssetKey, DagsterEventType, DagsterInstance
from dagster._core.storage.partition_status_cache import AssetPartitionStatus
from rich.console import Console
from rich.table import Table

from gaia_flows.cli import open_instance
from gaia_flows.layout import StateLayout


@dataclass(frozen=True)
class AssetStatus:
    name: str
    partitioned: bool
    last_materialized: float | None
    materialized: int
    stale: int
    failed: int
    total: int
    last_run: str | None
    last_run_status: str | None


def _latest_ids(instance: DagsterInstance, key: AssetKey) -> dict[str, int]:
    return dict(instance.get_latest_storage_id_by_partition(key, DagsterEventType.ASSET_MATERIALIZATION))


def _entry(instance: DagsterInstance, key: AssetKey):
    record = next(iter(instance.get_asset_records([key])), None)
    return record.asset_entry if record else None


def asset_statuses(instance: DagsterInstance, asset_graph) -> list[AssetStatus]:
    """Each materialisable asset's state in ``instance``, in the graph's topological order.

    Stale counts the regions whose latest materialisation is older than the latest one of the
    same region upstream; an unpartitioned asset counts the upstream regions materialised after
    it (``proper_motion_maps`` after a ``pm_stats`` rerun)."""
    statuses = []
    for key in asset_graph.toposorted_asset_keys:
        node = asset_graph.get(key)
        if not node.is_materializable:
            continue
        entry = _entry(instance, key)
        last = entry.last_materialization_record if entry else None
        own_ids = _latest_ids(instance, key) if node.partitions_def else {}
        own_latest = last.storage_id if last else 0
        stale: set[str] = set()
        for parent in node.parent_keys:
            if not asset_graph.has(parent) or not asset_graph.get(parent).is_materializable:
                continue
            parent_ids = _latest_ids(instance, parent) if asset_graph.get(parent).partitions_def else {}
            if node.partitions_def and asset_graph.get(parent).partitions_def == node.partitions_def:
                stale |= {p for p, sid in parent_ids.items() if p in own_ids and sid > own_ids[p]}
            elif last is not None and parent_ids:
                stale |= {p for p, sid in parent_ids.items() if sid > own_latest}
            elif last is not None:
                parent_entry = _entry(instance, parent)
                parent_last = parent_entry.last_materialization_record if parent_entry else None
                if parent_last is not None and parent_last.storage_id > own_latest:
                    stale.add(parent.to_user_string())
        materialized = failed = total = 0
        if node.partitions_def:
            keys = node.partitions_def.get_partition_keys()
            total = len(keys)
            by_partition = instance.get_status_by_partition(key, keys, node.partitions_def) or {}
            materialized = sum(1 for s in by_partition.values() if s == AssetPartitionStatus.MATERIALIZED)
            failed = sum(1 for s in by_partition.values() if s == AssetPartitionStatus.FAILED)
        run = instance.get_run_by_id(entry.last_run_id) if entry and entry.last_run_id else None
        statuses.append(
            AssetStatus(
                name=key.to_user_string(),
                partitioned=node.partitions_def is not None,
                last_materialized=last.timestamp if last else None,
                materialized=materialized if node.partitions_def else int(last is not None),
                stale=len(stale),
                failed=failed,
                total=total,
                last_run=run.run_id[:8] if run else None,
                last_run_status=run.status.value if run else None,
            )
        )
    return statuses


def champion(mlflow_resource) -> tuple[str, float | None] | None:
    """The ``champion`` model version and its accuracy on the hold-out, or ``None``."""
    from gaia_flows.ml.registry import MODEL_NAME, current_champion

    uri = mlflow_resource.resolved_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None  # no store yet; opening it would create one
    with mlflow_resource.activate() as client:
        try:
            version = current_champion(client)
        except Exception:  # noqa: BLE001 - an empty store has no registry tables yet
            return None
        if version is None:
            return None
        accuracy = client.get_run(version.run_id).data.metrics.get("accuracy") if version.run_id else None
        return f"{MODEL_NAME} v{version.version}", accuracy


def _age(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    seconds = max(0.0, time.time() - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def status_table(statuses: list[AssetStatus]) -> Table:
    table = Table(title="Assets", title_justify="left")
    for column in ("asset", "last materialised", "materialised", "stale", "failed", "last run"):
        table.add_column(
            column, justify="left" if column in ("asset", "last run") else "right", no_wrap=column == "asset"
        )
    for s in statuses:
        table.add_row(
            s.name,
            _age(s.last_materialized),
            f"{s.materialized}/{s.total} regions" if s.partitioned else ("yes" if s.materialized else "no"),
            f"[yellow]{s.stale}[/]" if s.stale else "0",
            f"[red]{s.failed}[/]" if s.failed else "0",
            f"{s.last_run} {s.last_run_status}" if s.last_run else "—",
        )
    return table


def cmd_status(args: argparse.Namespace) -> int:
    from gaia_flows.definitions import defs

    console = Console()
    layout = StateLayout.from_env().ensure()
    instance = open_instance(layout)
    console.print(status_table(asset_statuses(instance, defs.resolve_asset_graph())))
    model = champion(defs.resources["mlflow"])
    if model is None:
        console.print("Champion model: none yet (materialise astrometric_classifier)")
    else:
        name, accuracy = model
        console.print(
            f"Champion model: {name}"
            + (f", accuracy {accuracy:.3f} on the hold-out" if accuracy is not None else ""),
            highlight=False,
        )
    console.print(f"State folder: {layout.home}", highlight=False)
    return 0
