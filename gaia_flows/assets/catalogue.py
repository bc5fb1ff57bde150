"""The catalogue: Gaia bulk files in the landing folder become ``gaia_source``, one Parquet
directory per sky region, rows sorted by ``source_id`` so neighbours share files."""

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetExecutionContext,
    AssetSpec,
    BackfillPolicy,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from gaia_flows.engine.ingest import IngestReport, ingest_regions
from gaia_flows.engine.metrics import run_figures, run_job_group
from gaia_flows.layout import SOURCE_TABLE
from gaia_flows.partitions import sky_regions
from gaia_flows.releases import release_of
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource
from gaia_flows.warehouse import (
    CorruptTableError,
    footer_rows,
    published_regions,
    read_manifest,
    verify_region,
    warehouse_errors,
)

GROUP = "catalogue"

gaia_landing = AssetSpec(
    "gaia_landing",
    description="Gaia bulk files (GaiaSource_<hpx8start>-<hpx8end>.csv.gz) of one data release, in $GAIA_FLOWS_LANDING "
    "(landing/<release>/ for a release other than DR3); written by the archive download or `gaia-flows generate`, "
    "never by this graph.",
    group_name=GROUP,
    kinds={"csv"},
)


class GaiaSourceConfig(Config):
    bucket_mb: int = 128
    """Compressed input one ingestion task takes at most (more tasks when the cores need
    them): a task writes one sorted Parquet part per region it touches, so this bounds a
    region file's size (dataset size / buckets ~ worker memory)."""


@asset(
    partitions_def=sky_regions,
    backfill_policy=BackfillPolicy.single_run(),
    deps=[gaia_landing, "spark_cluster"],
    group_name=GROUP,
    kinds={"spark", "parquet"},
    # Runs that write this table take turns (the instance's pools default_limit is 1): two runs
    # of the same region would otherwise both ingest it, and the later publish would win.
    pool=SOURCE_TABLE,
)
def gaia_source(
    context: AssetExecutionContext, config: GaiaSourceConfig, spark: SparkResource, storage: StorageResource
) -> MaterializeResult:
    """Gaia sources of each sky region, validated against the release's contract
    (``data_contracts/gaia_source_dr3.yaml`` for DR3).

    A run over many regions is one Spark application (single-run backfill), because a cold
    Spark start costs more than ingesting a small region. Bad rows go to the quarantine with a
    reason; a bad file fails only the regions it feeds, and their previous versions stay.
    """
    release = release_of(context)
    layout = release.layout(storage.layout)
    contract = release.contract()
    session = spark.session()
    job_group = run_job_group(SOURCE_TABLE, context.run_id)
    session.sparkContext.setJobGroup(
        job_group, f"{SOURCE_TABLE}, run {context.run_id}", interruptOnCancel=True
    )
    with warehouse_errors(layout, SOURCE_TABLE, context.partition_keys):
        report = ingest_regions(
            session, layout, list(context.partition_keys), contract, config.bucket_mb << 20
        )
    for region, result in report.regions.items():
        context.add_asset_metadata(
            {
                "rows_in": result.rows_in,
                "rows_accepted": result.accepted,
                "rows_rejected": result.rejected,
                "rejected_by_rule": MetadataValue.json(result.rejected_by_rule),
                "input_files": len(result.input_files),
                "parquet_files": result.output_files,
                "bytes": MetadataValue.int(result.output_bytes),
                "path": MetadataValue.path(result.path),
                "release": release.name,
            },
            partition_key=region,
        )
    if report.failures:
        raise Failure(
            description=_failure_text(report),
            metadata={
                "failed_regions": MetadataValue.json(report.failures),
                "published_regions": sorted(report.regions),
            },
        )
    metadata = _run_metadata(report, run_figures(session, job_group, report.task_records))
    metadata["spark_cores"] = session.sparkContext.defaultParallelism
    metadata["release"] = release.name
    metadata["contract"] = MetadataValue.path(str(contract.source))
    return MaterializeResult(metadata=metadata)


def _failure_text(report: IngestReport) -> str:
    lines = [f"{region}: {error}" for region, error in sorted(report.failures.items())]
    published = f"; {len(report.regions)} other region(s) were published" if report.regions else ""
    return (
        f"{len(report.failures)} region(s) not published, previous versions kept{published}:\n"
        + "\n".join(lines)
    )


def _run_metadata(report: IngestReport, figures: dict) -> dict:
    accepted = sum(r.accepted for r in report.regions.values())
    rejected = sum(r.rejected for r in report.regions.values())
    seconds = max(report.seconds, 1e-9)
    metadata = {
        "regions": len(report.regions),
        "run_rows_in": report.rows_read,
        "run_rows_accepted": accepted,
        "run_rows_rejected": rejected,
        "wall_seconds": round(report.seconds, 2),
        "rows_per_second": round(report.rows_read / seconds),
    }
    metadata.update(figures)
    if figures.get("spark_input_bytes"):
        metadata["spark_input_mb_per_second"] = round(figures["spark_input_bytes"] / 2**20 / seconds, 1)
    return metadata


@asset_check(
    asset=gaia_source,
    blocking=True,
    description="Every row read is accepted or quarantined: rows in = accepted + rejected.",
)
def rows_conserved(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
    """Counts come from the Parquet footers on disk, not from the Spark job that wrote them."""
    layout = release_of(context).layout(storage.layout)
    broken, totals = {}, {"rows_in": 0, "accepted": 0, "rejected": 0}
    for region in published_regions(layout, SOURCE_TABLE):
        manifest = read_manifest(layout, SOURCE_TABLE, region)
        accepted = footer_rows(layout.region_dir(SOURCE_TABLE, region).glob("*.parquet"))
        rejected = footer_rows(
            layout.quarantine_dir(SOURCE_TABLE, region).glob("*.parquet")
        )  # no folder when nothing was rejected: 0
        rows_in = manifest.get("rows_in", -1)
        totals["rows_in"] += max(rows_in, 0)
        totals["accepted"] += accepted
        totals["rejected"] += rejected
        if rows_in != accepted + rejected:
            broken[region] = {"rows_in": rows_in, "accepted": accepted, "rejected": rejected}
    return AssetCheckResult(
        passed=not broken,
        metadata={
            **totals,
            "regions_checked": len(published_regions(layout, SOURCE_TABLE)),
            "mismatched": MetadataValue.json(broken),
        },
    )


@asset_check(
    asset=gaia_source,
    description="Every published Parquet file reads back, page checksums verified; a failure names file and region.",
)
def parquet_readable(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
    """Catches files damaged after publishing (overwritten bytes, truncation). Reads every data
    page once, so it costs a full scan of the table; rerunning a named region repairs it."""
    layout = release_of(context).layout(storage.layout)
    corrupt, rows = {}, 0
    for region in published_regions(layout, SOURCE_TABLE):
        try:
            rows += verify_region(layout, SOURCE_TABLE, region)
        except CorruptTableError as error:
            corrupt[region] = str(error)
    return AssetCheckResult(
        passed=not corrupt,
        description="\n".join(corrupt.values()) or None,
        metadata={
            "rows_read": rows,
            "regions_checked": len(published_regions(layout, SOURCE_TABLE)),
            "corrupt": MetadataValue.json(corrupt),
        },
    )
