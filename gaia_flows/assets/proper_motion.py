"""Mean proper motion over the sky, step one: per-region mergeable statistics (``pm_stats``).

``pm_stats`` is the only step that reads Gaia rows (one Spark job per run over the run's
regions); ``proper_motion_maps`` (:mod:`gaia_flows.assets.proper_motion_maps`) merges the small
per-region tables, so rerunning one region costs that region's scan plus a merge of kilobytes.
"""

import time
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetExecutionContext,
    AutomationCondition,
    BackfillPolicy,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)
from pydantic import Field

from gaia_flows.engine.metrics import run_figures, run_job_group
from gaia_flows.engine.pm_stats import (
    InputColumnsError,
    StatsPublisher,
    choose_engine,
    compute_region_stats,
    read_input,
    region_bytes,
    stats_in_region_tasks,
)
from gaia_flows.layout import SOURCE_TABLE, STATS_TABLE
from gaia_flows.partitions import sky_regions
from gaia_flows.releases import release_of
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource
from gaia_flows.science import proper_motion as pm
from gaia_flows.warehouse import footer_rows, read_manifest

GROUP = "proper_motion"


class PmStatsConfig(Config):
    level: int = Field(default=pm.DEFAULT_LEVEL, ge=0, le=12)
    """Finest HEALPix level L_max of the stored statistics (level 8: 786,432 pixels of ~0.05 deg²).
    Maps can be cut at any level <= L_max without reading Gaia rows again."""
    engine: Literal["auto", "region-tasks", "groupby"] = "auto"
    """Spark tasks that each sum whole regions with numpy, or one Spark ``groupBy``; ``auto``
    takes the tasks unless a region is both over 512 MiB and more than one core's share of the
    run (``engine.pm_stats.choose_engine``)."""


@asset(
    partitions_def=sky_regions,
    backfill_policy=BackfillPolicy.single_run(),
    deps=[SOURCE_TABLE],
    group_name=GROUP,
    kinds={"spark", "parquet"},
    automation_condition=AutomationCondition.eager(),
)
def pm_stats(
    context: AssetExecutionContext, config: PmStatsConfig, spark: SparkResource, storage: StorageResource
) -> MaterializeResult:
    """Per-pixel sufficient statistics of proper motion (count, Σpm, Σpm², Σw, Σw·pm, Σw·pm²
    with w = 1/σ²) at level L_max for each sky region, from ``gaia_source``.

    All regions of a run are one Spark job that never shuffles raw rows: Spark tasks that each
    sum whole regions and publish them, or one ``groupBy`` on ``source_id >> shift`` whose
    per-pixel result comes back to the driver (``engine``). Sources without proper motion are
    counted (``n_pm`` vs ``n_sources``), never averaged as zero.
    """
    release = release_of(context)
    layout = release.layout(storage.layout)
    regions = list(context.partition_keys)
    session = spark.session()
    job_group = run_job_group(STATS_TABLE, context.run_id)
    session.sparkContext.setJobGroup(
        job_group,
        f"proper-motion statistics, {len(regions)} region(s), level {config.level}",
        interruptOnCancel=True,
    )
    publish = StatsPublisher(
        layout,
        STATS_TABLE,
        config.level,
        layout.region_versions(SOURCE_TABLE),
        datetime.now(UTC).isoformat(timespec="seconds"),
    )
    choice = choose_engine(
        region_bytes(layout, SOURCE_TABLE, regions), session.sparkContext.defaultParallelism, config.engine
    )
    context.log.info(f"engine {choice.engine}: {choice.reason}")

    started = time.perf_counter()
    try:
        if choice.engine == "region-tasks":
            published = stats_in_region_tasks(session, layout, SOURCE_TABLE, regions, config.level, publish)
        else:
            per_region = compute_region_stats(
                read_input(session, layout, SOURCE_TABLE, regions, release.contract()), regions, config.level
            )
            published = [publish(region, table) for region, table in per_region.items()]
    except InputColumnsError as exc:
        raise Failure(str(exc)) from exc
    spark_seconds = time.perf_counter() - started

    for record in published:
        context.add_asset_metadata(
            {
                "rows": record["n_sources"],
                "rows_with_pm": record["n_pm"],
                "rows_without_pm": record["n_sources"] - record["n_pm"],
                "pixels": record["pixels"],
                "level": config.level,
                "path": MetadataValue.path(str(layout.region_dir(STATS_TABLE, record["region"]))),
                "version": record["version"],
                "release": release.name,
            },
            partition_key=record["region"],
        )
    total = {
        name: sum(record[name] for record in published)
        for name in ("n_sources", "n_pm", "pixels", "stored_bytes")
    }
    metadata = {
        "release": release.name,
        "regions": len(regions),
        "level": config.level,
        "spark_cores": session.sparkContext.defaultParallelism,
        "engine": choice.engine,
        "engine_reason": choice.reason,
        "run_rows": total["n_sources"],
        "run_rows_with_pm": total["n_pm"],
        "run_pixels": total["pixels"],
        "spark_seconds": round(spark_seconds, 3),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "rows_per_second": round(total["n_sources"] / max(spark_seconds, 1e-9)),
        "stored_kib": round(total["stored_bytes"] / 1024, 1),
    }
    metadata.update(run_figures(session, job_group, published, rows="n_sources", written="stored_bytes"))
    return MaterializeResult(metadata=metadata)


def _stored_rows(layout, table: str, region: str, column: str | None = None) -> int:
    """Rows (or the sum of ``column``) of a published region, read from the files on disk."""
    files = layout.region_files(table, region)
    if column is None:
        return footer_rows(files)
    return sum(int(np.sum(pq.read_table(path, columns=[column]).column(column).to_numpy())) for path in files)


@asset_check(
    asset=pm_stats,
    blocking=True,
    description="Every region's statistics count exactly the rows gaia_source accepted for it.",
)
def pm_stats_counts_match_gaia_source(
    context: AssetCheckExecutionContext, storage: StorageResource
) -> AssetCheckResult:
    """Σ n_sources over a region's pixels (from the stored statistics) against the rows in the
    gaia_source region's Parquet files and its manifest's ``rows_accepted``. Regions whose
    gaia_source was republished after their statistics are reported as stale, not compared."""
    layout = release_of(context).layout(storage.layout)
    source_versions = layout.region_versions(SOURCE_TABLE)
    mismatched, stale, checked, rows = {}, [], 0, 0
    for region in layout.region_versions(STATS_TABLE):
        if read_manifest(layout, STATS_TABLE, region).get("gaia_source_version") != source_versions.get(
            region
        ):
            stale.append(region)
            continue
        counted = _stored_rows(layout, STATS_TABLE, region, "n_sources")
        on_disk = _stored_rows(layout, SOURCE_TABLE, region)
        accepted = read_manifest(layout, SOURCE_TABLE, region).get("rows_accepted", on_disk)
        checked += 1
        rows += counted
        if not counted == on_disk == accepted:
            mismatched[region] = {
                "pm_stats": counted,
                "gaia_source_files": on_disk,
                "rows_accepted": accepted,
            }
    return AssetCheckResult(
        passed=not mismatched,
        metadata={
            "regions_checked": checked,
            "rows_counted": rows,
            "mismatched": MetadataValue.json(mismatched),
            "stale_regions": MetadataValue.json(stale),
        },
    )


@asset_check(
    asset=pm_stats,
    description="Every region's statistics were computed from the gaia_source version published now.",
)
def pm_stats_current(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
    layout = release_of(context).layout(storage.layout)
    source_versions = layout.region_versions(SOURCE_TABLE)
    stats_regions = layout.region_versions(STATS_TABLE)
    stale = [
        r
        for r in stats_regions
        if read_manifest(layout, STATS_TABLE, r).get("gaia_source_version") != source_versions.get(r)
    ]
    missing = sorted(set(source_versions) - set(stats_regions))
    return AssetCheckResult(
        passed=not stale and not missing,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "stale_regions": MetadataValue.json(stale),
            "regions_without_stats": MetadataValue.json(missing),
        },
    )
