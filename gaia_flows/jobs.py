"""Named jobs a person launches from the UI, a schedule or a sensor."""

import functools

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
from gaia_flows.layout import DEFAULT_RELEASE, SOURCE_TABLE, STATS_TABLE
from gaia_flows.partitions import sky_regions
from gaia_flows.releases import RELEASES, Release
from gaia_flows.resources.cloud import CloudResource


@functools.cache
def release_catalogue_job(release: Release):
    """Per-region work of one release: ingestion and per-region statistics, one Spark
    application per run (``catalogue_refresh`` for DR3, ``<release>_catalogue_refresh`` else).
    One object per release, as ``Definitions`` wants for the schedule's, the sensor's and its
    own reference."""
    return define_asset_job(
        "catalogue_refresh" if release.is_default else f"{release.name}_catalogue_refresh",
        selection=AssetSelection.assets(release.key(SOURCE_TABLE), release.key(STATS_TABLE)),
        partitions_def=sky_regions,
        description=f"Ingest {release.name}'s landing files and recompute its per-region proper-motion statistics.",
    )


catalogue_job = release_catalogue_job(RELEASES[DEFAULT_RELEASE])

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
