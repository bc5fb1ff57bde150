"""Named jobs a person launches from the UI, a schedule or a sensor."""

from dagster import (
    AssetObservation,
    AssetSelection,
    Failure,
    MetadataValue,
    OpExecutionContext,
    define_asset_job,
    job,
    op,
)

from gaia_flows.cloud.provision import ProvisionError
from gaia_flows.cloud.retry import CloudCallError, redact
from gaia_flows.cloud.settings import RUN_TAG_TEARDOWN_DECISION, RUN_TAG_TEARDOWN_REASON
from gaia_flows.partitions import sky_regions
from gaia_flows.resources.cloud import CloudResource

# Per-region work: ingestion and per-region statistics, one Spark application per run.
catalogue_job = define_asset_job(
    "catalogue_refresh",
    selection=AssetSelection.assets("gaia_source", "pm_stats"),
    partitions_def=sky_regions,
    description="Ingest landing files and recompute per-region proper-motion statistics.",
)

# spark_cluster alone, as the cluster sensor launches it to grow or shrink the workers.
resize_cluster_job = define_asset_job(
    "resize_cluster",
    selection=AssetSelection.assets("spark_cluster"),
    description="Reconcile spark_cluster to the worker count the cluster sensor chose "
    "(grown for a backfill, shrunk to min_workers when idle).",
)


@op(
    description="Destroy every node tagged with the profile's cluster name, then its security group and key pair."
)
def teardown_cluster_nodes(context: OpExecutionContext, cloud: CloudResource) -> dict:
    if not cloud.enabled:
        context.log.info("profile has no cloud: nothing to tear down")
        return {"cluster": None, "destroyed_nodes": []}
    provisioner = cloud.provisioner(logger=context.log)
    try:
        summary = provisioner.teardown()
    except (ProvisionError, CloudCallError) as exc:
        raise Failure(
            description=f"teardown incomplete: {redact(str(exc))}",
            metadata={"api_calls": MetadataValue.json(provisioner.call.summary())},
        ) from exc
    summary["api_calls"] = provisioner.call.summary()
    decision = context.run.tags.get(RUN_TAG_TEARDOWN_DECISION, "requested")
    reason = context.run.tags.get(RUN_TAG_TEARDOWN_REASON, "a person or a job asked for it")
    context.log_event(
        AssetObservation(
            asset_key="spark_cluster",
            metadata={
                "state": "torn down",
                "decision": decision,
                "reason": reason,
                "destroyed_nodes": MetadataValue.json(summary["destroyed_nodes"]),
                "deleted_security_group": str(summary["deleted_security_group"]),
                "deleted_key_pair": str(summary["deleted_key_pair"]),
            },
        )
    )
    context.log.info(
        f"teardown of {summary['cluster']} ({decision}: {reason}): removed {len(summary['destroyed_nodes'])} node(s)"
    )
    return summary


@job(
    name="teardown_cluster",
    description="Remove the profile's Spark cluster: all tagged nodes, its security group and key pair.",
)
def teardown_cluster_job():
    teardown_cluster_nodes()
