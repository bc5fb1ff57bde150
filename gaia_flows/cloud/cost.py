"""What a planned cluster costs before anything is created: machines, money or quota, and time.

``cost_report`` turns a :class:`~gaia_flows.cloud.planner.Plan` into the figures a person
reads before saying yes: each node role with its size, count, vCPU and RAM; the hourly
price where the cloud lists one (a profile's own table, labelled with its source and date,
or libcloud's bundled ``pricing.json``); the quota footprint where it does not (OpenStack:
instances, vCPU and RAM, against the project's quota when the driver can read it); and how
long the workload takes at the per-core rates measured in ``docs/benchmarks.md``. The same
dict goes to ``gaia-flows cluster plan`` and to ``spark_cluster``'s metadata.

``check_budget`` refuses a plan above the profile's ``max_hourly_cost``; the provisioner calls
it before its first cloud call, so a refused plan creates nothing.
"""

from __future__ import annotations

import json
import re
import time
from functools import cache

from gaia_flows.cloud.planner import Plan, Workload

# Rows of gaia_source per input byte: the profiles' data_bytes for Gaia DR3 (600 GB as zstd
# Parquet, resources/*.yaml) over DR3's 1,811,709,771 sources.
BYTES_PER_ROW = 600_000_000_000 / 1_811_709_771
# Measured throughput per core on the 2-core development VM (docs/benchmarks.md, 2026-12-06):
# "Ingestion" table, 10M stars, the slower of the two idle-machine runs (101,461 rows/s/core);
INGEST_ROWS_PER_CORE_S = 101_461
# "Proper motion" table, pm_stats task time: 6.03 M rows per task-second (run 1);
AGGREGATE_ROWS_PER_CORE_S = 6_030_000
# "Classifier" table, score_files (the asset's path): 964,333 rows/s on 2 cores.
CLASSIFY_ROWS_PER_CORE_S = 964_333 // 2
RATE_SOURCE = "docs/benchmarks.md (2-core development VM, 2026-12-06)"
WORKLOAD_RATES: dict[Workload, tuple[str, int]] = {
    Workload.AGGREGATE: ("pm_stats", AGGREGATE_ROWS_PER_CORE_S),
    Workload.CLASSIFICATION: ("classified_sources", CLASSIFY_ROWS_PER_CORE_S),
}


class BudgetExceeded(RuntimeError):
    """A plan costs more per hour than the profile's ``max_hourly_cost`` (or cannot be priced)."""


@cache
def libcloud_pricing_date() -> str:
    """The date libcloud's bundled price list was generated (its ``updated`` field)."""
    from libcloud.pricing import get_pricing_file_path

    with open(get_pricing_file_path()) as fh:
        updated = json.load(fh).get("updated")
    return time.strftime("%Y-%m-%d", time.gmtime(updated)) if updated else "undated"


def price_source(size_name: str, size_id: str, price: float | None, settings) -> str | None:
    """Where a size's price comes from: the profile's table (its label) or libcloud's list."""
    if size_name in settings.prices or size_id in settings.prices:
        return f"profile: {settings.price_source or 'unlabelled table'}"
    if price is not None and price > 0:
        return f"libcloud pricing.json ({libcloud_pricing_date()})"
    return None


def openstack_quota(driver) -> dict[str, dict[str, int]] | None:
    """The project's compute quota and use (Nova ``os-quota-sets``), or None if unreadable.

    Nova wants the project id; a classic compute endpoint ends with it (``.../v2.1/<id>``).
    An endpoint without it, or a cloud that denies the call, gives the footprint alone.
    """
    try:
        endpoint = driver.connection.get_endpoint()
        project = endpoint.rstrip("/").rsplit("/", 1)[-1]
        if re.fullmatch(r"v\d+(\.\d+)?", project):
            return None
        quota = driver.ex_get_quota_set(project)
    except Exception:  # any refusal means the same: no quota figures, show the footprint
        return None
    out = {}
    for key in ("instances", "cores", "ram"):
        item = getattr(quota, key, None)
        if item is not None:
            out[key] = {"limit": int(item.limit), "in_use": int(item.in_use)}
    return out or None


def cost_report(plan: Plan, settings, quota: dict | None = None) -> dict:
    """Nodes, totals, hourly price or quota footprint, and the workload estimate of one plan."""
    spot = settings.cluster.spot_workers  # only ec2 and gce profiles may set it (CloudSettings)
    worker_market = {"ec2": "spot", "gce": "preemptible"}[settings.provider] if spot else "on-demand"
    roles = [
        ("master", plan.master_size, 1, "on-demand"),
        ("worker", plan.size, plan.worker_count, worker_market),
    ]
    nodes = []
    for role, size, count, market in roles:
        nodes.append(
            {
                "role": role,
                "size": size.name,
                "count": count,
                "vcpus": size.vcpus,
                "ram_mb": size.ram_mb,
                # For spot / preemptible workers the listed price is the on-demand one: an upper bound.
                "market": market,
                "price_per_hour": size.price if size.priced else None,
                "price_source": price_source(size.name, size.id, size.price, settings),
            }
        )
    report: dict = {
        "cluster": settings.name,
        "provider": settings.provider,
        "nodes": nodes,
        "instances": 1 + plan.worker_count,
        "vcpus": sum(n["vcpus"] * n["count"] for n in nodes),
        "ram_mb": sum(n["ram_mb"] * n["count"] for n in nodes),
        "executor_cores": plan.total_executor_cores,
        "max_workers": plan.max_workers,  # how far cluster_sensor may grow it for a backfill
        "cost_per_hour": plan.cost_per_hour,
        "max_hourly_cost": settings.cluster.max_hourly_cost,
    }
    if plan.cost_per_hour is None:
        report["quota"] = _footprint(report, quota)
    report["estimate"] = workload_estimate(plan)
    return report


def _footprint(report: dict, quota: dict | None) -> dict:
    """What the cluster takes from the project's quota, and what would be left (if known)."""
    need = {"instances": report["instances"], "cores": report["vcpus"], "ram": report["ram_mb"]}
    out = {}
    for key, value in need.items():
        entry: dict = {"needs": value}
        if quota and key in quota and quota[key]["limit"] >= 0:  # Nova's -1 means unlimited
            entry.update(quota[key])
            entry["free_after"] = quota[key]["limit"] - quota[key]["in_use"] - value
        out[key] = entry
    return out


def workload_estimate(plan: Plan) -> dict:
    """Wall time for the planned data at the measured per-core rates, and its price if known."""
    rows = int(plan.data_bytes / BYTES_PER_ROW)
    cores = plan.total_executor_cores
    stages = [("gaia_source (ingest)", INGEST_ROWS_PER_CORE_S)]
    if plan.workload in WORKLOAD_RATES:
        stages.append(WORKLOAD_RATES[plan.workload])
    out: dict = {"rows": rows, "cores": cores, "rate_source": RATE_SOURCE, "stages": []}
    for name, rate in stages:
        seconds = rows / (rate * cores) if cores else None
        cost = (
            round(seconds / 3600 * plan.cost_per_hour, 4)
            if seconds is not None and plan.cost_per_hour
            else None
        )
        out["stages"].append(
            {
                "stage": name,
                "rows_per_core_s": rate,
                "seconds": None if seconds is None else round(seconds, 1),
                "cost": cost,
            }
        )
    if plan.workload not in WORKLOAD_RATES:
        out["note"] = f"no measured per-core rate for {plan.workload.value}; ingestion only"
    return out


def check_budget(plan: Plan, max_hourly_cost: float | None) -> None:
    """Refuse a plan above ``max_hourly_cost``, or one that cannot be priced against it."""
    if max_hourly_cost is None:
        return
    if plan.cost_per_hour is None:
        raise BudgetExceeded(
            f"max_hourly_cost {max_hourly_cost} is set but the planned sizes ({plan.master_size.name}, "
            f"{plan.size.name}) have no price: add them to cloud.sizes.prices or drop the limit"
        )
    if plan.cost_per_hour > max_hourly_cost:
        raise BudgetExceeded(
            f"plan costs {plan.cost_per_hour:.4f}/h ({plan.worker_count} x {plan.size.name} + master "
            f"{plan.master_size.name}) > max_hourly_cost {max_hourly_cost}: nothing was created"
        )
