"""``gaia-flows cluster plan | up | status | down``: the profile's Spark cluster from a shell.

Thin wrappers over the code the Dagster graph runs: ``plan`` prints the plan and cost report
``spark_cluster`` would act on (``assets.cluster.plan_for``, ``Provisioner.cost``); ``up``
materialises ``spark_cluster`` and ``down`` runs ``teardown_cluster``, both as runs in the
state folder's Dagster instance, so the UI, the idle sensor and ``gaia-flows status`` see them;
``status`` reads the manifest and asks the cloud what exists.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from gaia_flows.layout import StateLayout
from gaia_flows.profiles import Profile, load_profile

if TYPE_CHECKING:  # rich, Dagster and libcloud load only when a cluster command runs
    from rich.console import Console


def add_cluster_command(sub) -> None:
    cluster = sub.add_parser("cluster", help="plan, create, inspect and remove the profile's Spark cluster")
    commands = cluster.add_subparsers(dest="cluster_command", required=True)
    plan = commands.add_parser("plan", help="what `up` would create and what it costs; creates nothing")
    up = commands.add_parser("up", help="materialise spark_cluster (plan, then reconcile the cloud to it)")
    status = commands.add_parser("status", help="the cluster's manifest and what the cloud holds for it")
    down = commands.add_parser("down", help="run teardown_cluster: every tagged node, the group and key")
    for parser in (plan, up, status, down):
        parser.add_argument(
            "--profile",
            help="profile name in resources/ or a path to a profile YAML (default: GAIA_FLOWS_PROFILE)",
        )
    for parser in (plan, up):
        parser.add_argument("--workers", type=int, help="pin the worker count")
        parser.add_argument("--size", help="pin the worker size (a name or id the profile allows)")
        parser.add_argument("--workload", choices=["aggregate", "training", "classification"])
        parser.add_argument(
            "--data-bytes", type=int, help="plan for this much data instead of the landing area"
        )
    for parser in (plan, status):
        parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    plan.set_defaults(func=cmd_plan)
    up.set_defaults(func=cmd_up)
    status.set_defaults(func=cmd_status)
    down.set_defaults(func=cmd_down)


def _profile(args: argparse.Namespace) -> Profile:
    if args.profile and args.profile.endswith((".yaml", ".yml")):
        path = Path(args.profile).expanduser().resolve()
        return load_profile(path.stem, path.parent)
    return load_profile(args.profile)


def _cloud(profile: Profile):
    from gaia_flows.resources import build_resources

    return build_resources(profile)


def _config(args: argparse.Namespace) -> dict:
    values = {
        "workers": args.workers,
        "size": args.size,
        "workload": args.workload,
        "data_bytes": args.data_bytes,
    }
    return {k: v for k, v in values.items() if v is not None}


def cmd_plan(args: argparse.Namespace) -> int:
    from rich.console import Console

    from gaia_flows.assets.cluster import ClusterConfig, plan_for
    from gaia_flows.cloud.cost import BudgetExceeded, check_budget

    profile = _profile(args)
    console = Console()
    if profile.cloud is None:
        console.print(f"profile {profile.name!r} has no cloud: Spark runs at {profile.spark_master}")
        return 0
    resources = _cloud(profile)
    provisioner = resources["cloud"].provisioner()
    plan = plan_for(provisioner, ClusterConfig(**_config(args)), resources["storage"].layout)
    report = provisioner.cost(plan)
    try:
        check_budget(plan, provisioner.settings.cluster.max_hourly_cost)
        refusal = None
    except BudgetExceeded as exc:
        refusal = str(exc)
    report["refused"] = refusal
    if args.json:
        print(json.dumps({**report, "reasons": list(plan.reasons)}, indent=2))
    else:
        _print_plan(console, report, list(plan.reasons))
    return 1 if refusal else 0


def _money(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _print_plan(console: Console, report: dict, reasons: list[str]) -> None:
    from rich.table import Table

    nodes = Table(title=f"Cluster {report['cluster']} on {report['provider']}", title_justify="left")
    for column in ("role", "size", "count", "market", "vCPU", "RAM MiB", "price/h each", "price source"):
        nodes.add_column(column)
    for n in report["nodes"]:
        nodes.add_row(
            n["role"],
            n["size"],
            str(n["count"]),
            n["market"],
            str(n["vcpus"]),
            str(n["ram_mb"]),
            _money(n["price_per_hour"]),
            n["price_source"] or "none listed",
        )
    nodes.add_row(
        "total", "", str(report["instances"]), "", str(report["vcpus"]), str(report["ram_mb"]),
        _money(report["cost_per_hour"]), "per hour, whole cluster",
    )  # fmt: skip
    console.print(nodes)
    if "quota" in report:
        quota = Table(title="Quota footprint (no prices listed)", title_justify="left")
        for column in ("resource", "needs", "in use", "limit", "free after"):
            quota.add_column(column)
        for key, q in report["quota"].items():
            quota.add_row(
                key, str(q["needs"]), *(str(q.get(k, "unknown")) for k in ("in_use", "limit", "free_after"))
            )
        console.print(quota)
    estimate = report["estimate"]
    time_table = Table(
        title=f"Estimate: {estimate['rows']:,} rows on {estimate['cores']} executor cores "
        f"(rates: {estimate['rate_source']})",
        title_justify="left",
    )
    for column in ("stage", "rows/s/core", "seconds", "cost"):
        time_table.add_column(column)
    for stage in estimate["stages"]:
        seconds = "-" if stage["seconds"] is None else f"{stage['seconds']:,.1f}"
        time_table.add_row(stage["stage"], f"{stage['rows_per_core_s']:,}", seconds, _money(stage["cost"]))
    console.print(time_table)
    if estimate.get("note"):
        console.print(estimate["note"])
    for reason in reasons:
        console.print(f"  plan: {reason}")
    if report["max_hourly_cost"] is not None:
        console.print(f"max_hourly_cost: {report['max_hourly_cost']}")
    if report["refused"]:
        console.print(f"[bold red]refused:[/] {report['refused']}")


def cmd_up(args: argparse.Namespace) -> int:
    from dagster import materialize
    from rich.console import Console

    from gaia_flows.assets.cluster import spark_cluster
    from gaia_flows.cli import open_instance

    profile = _profile(args)
    result = materialize(
        [spark_cluster],
        resources=_cloud(profile),
        run_config={"ops": {"spark_cluster": {"config": _config(args)}}},
        instance=open_instance(StateLayout.from_env()),
        raise_on_error=False,
    )
    console = Console()
    if not result.success:
        failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        for event in failures:
            data = event.step_failure_data
            message = data.user_failure_data.description if data.user_failure_data else data.error.message
            console.print(f"[bold red]spark_cluster failed[/] (run {result.run_id}): {message}")
        return 1
    (event,) = result.asset_materializations_for_node("spark_cluster")
    meta = {k: v.value for k, v in event.metadata.items()}
    console.print(
        f"cluster {meta.get('cluster', profile.name)} up (run {result.run_id}): "
        f"master {meta['master_url']}, {meta.get('worker_count', 0)} worker(s) of {meta.get('size', '-')}, "
        f"created {len(meta.get('created', []))}, kept {len(meta.get('kept', []))}"
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from gaia_flows.cli import open_instance
    from gaia_flows.sensors import cluster_idleness

    profile = _profile(args)
    console = Console()
    if profile.cloud is None:
        console.print(f"profile {profile.name!r} has no cloud: Spark runs at {profile.spark_master}")
        return 0
    cloud = _cloud(profile)["cloud"]
    settings = cloud.settings()
    path = Path(settings.manifest_path)
    manifest = json.loads(path.read_text()) if path.exists() else None
    inventory = cloud.provisioner().inventory()
    idleness = None
    if manifest is not None:
        verdict = cluster_idleness(
            open_instance(StateLayout.from_env()), manifest, settings.cluster.idle_minutes, time.time()
        )
        idleness = {"idle": verdict.idle, "reason": verdict.reason}
    out = {
        "cluster": settings.name,
        "provider": settings.provider,
        "manifest": str(path) if manifest else None,
        "master_url": manifest["master_url"] if manifest else None,
        "cost_per_hour": manifest.get("cost_per_hour") if manifest else None,
        "updated_at": manifest.get("updated_at") if manifest else None,
        "idle": idleness,
        **inventory,
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    table = Table(
        title=f"Cluster {settings.name} on {settings.provider} (the cloud's view)", title_justify="left"
    )
    for column in ("node", "role", "state", "private", "size"):
        table.add_column(column)
    for n in inventory["nodes"]:
        table.add_row(n["name"], n["role"] or "-", n["state"], ", ".join(n["private_ips"]), n["size"] or "-")
    console.print(table)
    console.print(
        f"security group: {inventory['security_group'] or 'none'}; key pair: {inventory['key_pair'] or 'none'}"
    )
    if manifest is None:
        console.print(f"no manifest at {path}: nothing provisioned through this state folder")
    else:
        console.print(
            f"manifest {path}: master {manifest['master_url']}, cost/h {_money(manifest.get('cost_per_hour'))}, "
            f"updated {manifest['updated_at']}"
        )
        console.print(f"idle teardown: {'due' if idleness['idle'] else 'not due'} ({idleness['reason']})")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from rich.console import Console

    from gaia_flows.cli import open_instance
    from gaia_flows.cloud.settings import RUN_TAG_TEARDOWN_DECISION, RUN_TAG_TEARDOWN_REASON
    from gaia_flows.jobs import teardown_cluster_job

    profile = _profile(args)
    result = teardown_cluster_job.execute_in_process(
        resources={"cloud": _cloud(profile)["cloud"]},
        instance=open_instance(StateLayout.from_env()),
        tags={RUN_TAG_TEARDOWN_DECISION: "requested", RUN_TAG_TEARDOWN_REASON: "gaia-flows cluster down"},
        raise_on_error=False,
    )
    console = Console()
    if not result.success:
        console.print(f"[bold red]teardown failed[/] (run {result.run_id}); see `gaia-flows ui` for its log")
        return 1
    summary = result.output_for_node("teardown_cluster_nodes")
    console.print(
        f"cluster {summary['cluster']} down (run {result.run_id}): removed "
        f"{len(summary['destroyed_nodes'])} node(s), group {summary.get('deleted_security_group')}, "
        f"key {summary.get('deleted_key_pair')}"
    )
    return 0
