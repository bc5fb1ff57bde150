"""The Spark cluster as an asset (``teardown_cluster`` in :mod:`gaia_flows.jobs` removes it).

Materialising ``spark_cluster`` plans a cluster for the workload (``cloud.planner``) and
reconciles the cloud to it (``cloud.provision``); its manifest (master URL, nodes, size,
price) is what ``SparkResource`` reads, so downstream assets run on ``local[*]``, a loopback
standalone cluster or cloud VMs without a change.
"""

import json
from pathlib import Path

from dagster import (
    AssetCheckResult,
    AssetExecutionContext,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from gaia_flows.cloud.cost import BudgetExceeded
from gaia_flows.cloud.planner import Plan, PlanError
from gaia_flows.cloud.provision import Provisioner, ProvisioningFailed
from gaia_flows.cloud.retry import CloudCallError, redact
from gaia_flows.cloud.settings import (
    CloudConfigError,
    CloudSettings,
)
from gaia_flows.cloud.stack import StackMismatch, check_cluster, local_stack
from gaia_flows.layout import StateLayout, landing_files
from gaia_flows.resources.cloud import CloudResource
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource
from gaia_flows.science.healpix import files_for_region


class ClusterConfig(Config):
    """Run-time overrides; by default the profile's workload and the landing area's size decide."""

    workload: str | None = None  # aggregate | training | classification
    data_bytes: int | None = None
    workers: int | None = None  # pin the worker count instead of letting the planner choose
    size: str | None = None  # pin the worker size (name or id) to one the profile allows
    regions: int | None = None


def landing_bytes(layout: StateLayout) -> int:
    """Bytes of Gaia bulk files waiting in the landing area: the planner's data size."""
    return sum(p.stat().st_size for p in landing_files(layout.landing))


def region_bytes(layout: StateLayout, regions: list[str]) -> int:
    """Bytes of the landing files that feed ``regions``: what a backfill of them reads."""
    files = landing_files(layout.landing)
    return sum(p.stat().st_size for p in {p for r in regions for p in files_for_region(files, r)})


def plan_for(provisioner: Provisioner, config: ClusterConfig, layout: StateLayout) -> Plan:
    """The plan ``spark_cluster`` reconciles to: the config's overrides, else the landing area's
    size, else the profile's ``data_bytes``. ``gaia-flows cluster plan`` prints the same plan."""
    measured = landing_bytes(layout)
    default = measured or provisioner.settings.cluster.data_bytes
    data_bytes = config.data_bytes if config.data_bytes is not None else default
    return provisioner.plan(data_bytes, config.workload, config.regions, config.workers, config.size)


@asset(
    group_name="platform",
    kinds={"spark"},
    description="Workload-shaped Spark cluster (master + N workers) reconciled through libcloud; "
    "its manifest gives downstream assets the Spark master URL. No-op for profiles without a cloud.",
)
def spark_cluster(
    context: AssetExecutionContext,
    config: ClusterConfig,
    cloud: CloudResource,
    storage: StorageResource,
    spark: SparkResource,
) -> MaterializeResult:
    profile = cloud.load()
    if profile.cloud is None:
        context.log.info(
            f"profile {profile.name!r} has no cloud: Spark runs at {profile.spark_master}, nothing to provision"
        )
        return MaterializeResult(
            metadata={"profile": profile.name, "mode": "no cluster", "master_url": profile.spark_master}
        )

    settings = cloud.settings()
    try:
        settings.driver_conf()
    except CloudConfigError as exc:
        raise Failure(description=str(exc)) from exc
    provisioner = cloud.provisioner(logger=context.log)
    try:
        plan = plan_for(provisioner, config, storage.layout)
    except (PlanError, CloudCallError) as exc:
        raise Failure(description=f"cannot plan cluster {settings.name!r}: {redact(str(exc))}") from exc
    for reason in plan.reasons:
        context.log.info(f"plan: {reason}")
    cost = provisioner.cost(plan)
    cost_metadata = {
        "plan_cost": MetadataValue.json(cost),
        "vcpus_total": cost["vcpus"],
        "ram_mb_total": cost["ram_mb"],
    }

    try:
        result = provisioner.reconcile(plan)
    except BudgetExceeded as exc:
        raise Failure(description=str(exc), metadata=cost_metadata) from exc
    except ProvisioningFailed as exc:
        raise Failure(
            description=str(exc),
            metadata={
                "rolled_back": exc.rolled_back,
                "leftover_nodes": MetadataValue.json(exc.leftover),
                "created_this_run": MetadataValue.json(exc.created),
                "api_calls": MetadataValue.json(provisioner.call.summary()),
            },
        ) from exc

    manifest = result.manifest
    stacks = _check_stacks(context, settings, spark, manifest)
    nodes = [manifest["master"], *manifest["workers"]]
    metadata = {
        "profile": profile.name,
        "provider": settings.provider,
        "cluster": settings.name,
        "master_url": manifest["master_url"],
        "worker_count": manifest["worker_count"],
        "size": plan.size.name,
        "vcpus_per_worker": plan.size.vcpus,
        "ram_mb_per_worker": plan.size.ram_mb,
        "master_size": plan.master_size.name,
        "node_ids": MetadataValue.json([n["id"] for n in nodes]),
        "addresses": MetadataValue.json(
            {n["name"]: {"private": n["private_ips"], "public": n["public_ips"]} for n in nodes}
        ),
        "workload": plan.workload.value,
        "data_bytes": plan.data_bytes,
        "executor": f"{plan.executors_per_worker} x {plan.executor_cores} cores / {plan.executor_memory_mb} MiB per worker",
        "shuffle_partitions": plan.shuffle_partitions,
        "bucket_mib": plan.bucket_bytes // 2**20,
        "files_per_region": MetadataValue.json(plan.files_per_region),
        "spark_conf": MetadataValue.json(manifest["spark_conf"]),
        "plan_reasons": MetadataValue.md("\n".join(f"- {r}" for r in plan.reasons)),
        "created": MetadataValue.json(result.created),
        "destroyed": MetadataValue.json(result.destroyed),
        "kept": MetadataValue.json(result.kept),
        "api_calls": MetadataValue.json(provisioner.call.summary()),
        "reconcile_seconds": result.seconds,
        "manifest": MetadataValue.path(str(settings.manifest_path)),
        **cost_metadata,
    }
    if stacks is not None:
        metadata["worker_stacks"] = MetadataValue.json(stacks)
    if plan.size.price is not None:
        metadata["price_per_worker_hour"] = plan.size.price
    if plan.cost_per_hour is not None:
        metadata["cost_per_hour"] = plan.cost_per_hour
    return MaterializeResult(metadata=metadata)


def _check_stacks(
    context: AssetExecutionContext, settings: CloudSettings, spark: SparkResource, manifest: dict
) -> dict | None:
    """Wait for the workers to run a task and compare their Python stack with the driver's.

    Doubles as the readiness check: VMs the cloud calls running may still be booting Spark.
    The loopback driver's daemons run this very interpreter, so it is skipped there.
    """
    if settings.provider == "local-spark" or not settings.cluster.verify_stack:
        return None
    try:
        stacks = check_cluster(spark.session(), manifest["worker_count"], settings.cluster.wait_timeout_s)
    except StackMismatch as exc:
        raise Failure(description=f"cluster {settings.name!r} is up but unusable: {exc}") from exc
    context.log.info(f"{len(stacks)} worker host(s) run the driver's stack {local_stack()}")
    return stacks


@asset_check(
    asset=spark_cluster,
    description="Every node in the manifest exists and runs (asks the cloud, not the manifest).",
)
def spark_cluster_nodes_running(cloud: CloudResource) -> AssetCheckResult:
    if not cloud.enabled:
        return AssetCheckResult(passed=True, metadata={"mode": "no cluster"})
    settings = cloud.settings()
    path = Path(settings.manifest_path)
    if not path.exists():
        return AssetCheckResult(passed=False, metadata={"reason": f"no manifest at {path}"})
    manifest = json.loads(path.read_text())
    expected = {manifest["master"]["id"], *(w["id"] for w in manifest["workers"])}
    running = {n["id"] for n in cloud.provisioner().inventory()["nodes"] if n["state"] == "running"}
    missing = sorted(expected - running)
    return AssetCheckResult(
        passed=not missing,
        metadata={
            "expected": len(expected),
            "running": len(expected & running),
            "missing": MetadataValue.json(missing),
        },
    )
