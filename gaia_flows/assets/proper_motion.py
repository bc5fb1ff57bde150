"""Mean proper motion over the sky: per-region mergeable statistics, then all-sky maps.

``pm_stats`` is the only step that reads Gaia rows (one Spark job per run over the run's
regions); ``proper_motion_maps`` merges the small per-region tables, so rerunning one region
costs that region's scan plus a merge of kilobytes, and a map at another level is a cut of the
stored pyramid (``gaia-flows map``), never a rescan.
"""


import time
from datetime import datetime, timezone
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
from dagster import (
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

from gaia_flows import maps
from gaia_flows.engine.metrics import stage_io
from gaia_flows.engine.pm_stats import (
    InputColumnsError,
    StatsPublisher,
    choose_engine,
    compute_region_stats,
    read_input,
    region_bytes,
    stats_in_region_tasks,
    task_io,
)
from gaia_flows.partitions import sky_regions
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource
from gaia_flows.science import proper_motion as pm
from gaia_flows.science.healpix import npix
from gaia_flows.tables import footer_rows, read_manifest, write_table_files

SOURCE_TABLE = "gaia_source"
STATS_TABLE = maps.STATS_TABLE
MAPS_TABLE = maps.MAPS_TABLE
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
def pm_stats(context: AssetExecutionContext, config: PmStatsConfig, spark: SparkResource, storage: StorageResource) -> MaterializeResult:
    """Per-pixel sufficient statistics of proper motion (count, Σpm, Σpm², Σw, Σw·pm, Σw·pm²
    with w = 1/σ²) at level L_max for each sky region, from ``gaia_source``.

    All regions of a run are one Spark job that never shuffles raw rows: Spark tasks that each
    sum whole regions and publish them, or one ``groupBy`` on ``source_id >> shift`` whose
    per-pixel result comes back to the driver (``engine``). Sources without proper motion are
    counted (``n_pm`` vs ``n_sources``), never averaged as zero.
    """
    layout = storage.layout
    regions = list(context.partition_keys)
    session = spark.session()
    job_group = f"{STATS_TABLE}-{context.run_id}"  # per run: stage_io must not add up earlier runs on a shared session
    session.sparkContext.setJobGroup(job_group, f"proper-motion statistics, {len(regions)} region(s), level {config.level}", interruptOnCancel=True)
    publish = StatsPublisher(
        layout, STATS_TABLE, config.level, maps.region_versions(layout, SOURCE_TABLE), datetime.now(timezone.utc).isoformat(timespec="seconds")
    )
    choice = choose_engine(region_bytes(layout, SOURCE_TABLE, regions), session.sparkContext.defaultParallelism, config.engine)
    context.log.info(f"engine {choice.engine}: {choice.reason}")

    started = time.perf_counter()
    try:
        if choice.engine == "region-tasks":
            published = stats_in_region_tasks(session, layout, SOURCE_TABLE, regions, config.level, publish)
        else:
            per_region = compute_region_stats(read_input(session, layout, SOURCE_TABLE, regions), regions, config.level)
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
            },
            partition_key=record["region"],
        )
    total = {name: sum(record[name] for record in published) for name in ("n_sources", "n_pm", "pixels", "stored_bytes")}
    metadata = {
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
    metadata.update({f"spark_{name}": value for name, value in stage_io(session, job_group).items()})
    python_io = task_io(published)
    if python_io:
        metadata.update({name: MetadataValue.json(value) if name == "per_host" else value for name, value in python_io.items() if value is not None})
    return MaterializeResult(metadata=metadata)


def _stored_rows(layout, table: str, region: str, column: str | None = None) -> int:
    """Rows (or the sum of ``column``) of a published region, read from the files on disk."""
    files = layout.region_files(table, region)
    if column is None:
        return footer_rows(files)
    return sum(int(np.sum(pq.read_table(path, columns=[column]).column(column).to_numpy())) for path in files)


@asset_check(asset=pm_stats, blocking=True, description="Every region's statistics count exactly the rows gaia_source accepted for it.")
def pm_stats_counts_match_gaia_source(storage: StorageResource) -> AssetCheckResult:
    """Σ n_sources over a region's pixels (from the stored statistics) against the rows in the
    gaia_source region's Parquet files and its manifest's ``rows_accepted``. Regions whose
    gaia_source was republished after their statistics are reported as stale, not compared."""
    layout = storage.layout
    source_versions = maps.region_versions(layout, SOURCE_TABLE)
    mismatched, stale, checked, rows = {}, [], 0, 0
    for region in maps.region_versions(layout, STATS_TABLE):
        if read_manifest(layout, STATS_TABLE, region).get("gaia_source_version") != source_versions.get(region):
            stale.append(region)
            continue
        counted = _stored_rows(layout, STATS_TABLE, region, "n_sources")
        on_disk = _stored_rows(layout, SOURCE_TABLE, region)
        accepted = read_manifest(layout, SOURCE_TABLE, region).get("rows_accepted", on_disk)
        checked += 1
        rows += counted
        if not counted == on_disk == accepted:
            mismatched[region] = {"pm_stats": counted, "gaia_source_files": on_disk, "rows_accepted": accepted}
    return AssetCheckResult(
        passed=not mismatched,
        metadata={
            "regions_checked": checked,
            "rows_counted": rows,
            "mismatched": MetadataValue.json(mismatched),
            "stale_regions": MetadataValue.json(stale),
        },
    )


@asset_check(asset=pm_stats, description="Every region's statistics were computed from the gaia_source version published now.")
def pm_stats_current(storage: StorageResource) -> AssetCheckResult:
    layout = storage.layout
    source_versions = maps.region_versions(layout, SOURCE_TABLE)
    stats_regions = maps.region_versions(layout, STATS_TABLE)
    stale = [r for r in stats_regions if read_manifest(layout, STATS_TABLE, r).get("gaia_source_version") != source_versions.get(r)]
    missing = sorted(set(source_versions) - set(stats_regions))
    return AssetCheckResult(
        passed=not stale and not missing,
        severity=AssetCheckSeverity.WARN,
        metadata={"stale_regions": MetadataValue.json(stale), "regions_without_stats": MetadataValue.json(missing)},
    )


# --- all-sky maps --------------------------------------------------------------------------------


class ProperMotionMapsConfig(Config):
    render_levels: list[int] = [6]
    """Levels to render as PNG (each <= the statistics' level); every level 0..L_max is stored."""
    weighted: bool = False
    """Also render the inverse-variance weighted means of pmra and pmdec."""


_PLOTTED = ("pmra", "pmdec", "count")


class _Republished(Exception):
    """A pm_stats region was republished while the pyramid was being written."""


def publish_pyramid(layout, render_levels: list[int]) -> tuple[dict[str, int], maps.Pyramid]:
    """Stream every region's statistics into the stored pyramid (one region in memory at a
    time; a region unchanged since the stored pyramid keeps its file); returns each region's
    level and what was built. Retried if a region is republished meanwhile: the check comes
    before the pyramid is published, so the stored maps always describe the versions their
    manifest names."""
    for _ in range(5):
        before = maps.region_versions(layout, STATS_TABLE)
        if not before:
            raise FileNotFoundError(f"no proper-motion statistics under {layout.table(STATS_TABLE)}: materialize pm_stats first")
        try:
            levels = {region: maps.stored_level(layout, region) for region in before}
            level_max = min(levels.values())
            pyramid = maps.Pyramid(level_max, {lv: [] for lv in render_levels if 0 <= lv <= level_max})

            def manifest() -> dict:
                if maps.region_versions(layout, STATS_TABLE) != before:
                    raise _Republished
                return {**pyramid.manifest(before), "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}

            schema = pm.pyramid(pm.empty_stats(level_max), [level_max]).schema
            write_table_files(maps.pyramid_files(layout, before, pyramid), schema, layout, MAPS_TABLE, manifest, row_group_key="level")
        except (FileNotFoundError, _Republished):
            continue
        return levels, pyramid
    raise RuntimeError("pm_stats regions kept changing while the maps were being built; retry the run")


@asset(
    deps=[pm_stats],
    group_name=GROUP,
    kinds={"parquet", "healpy"},
    automation_condition=AutomationCondition.eager().without(~AutomationCondition.any_deps_missing()),
)
def proper_motion_maps(context: AssetExecutionContext, config: ProperMotionMapsConfig, storage: StorageResource) -> MaterializeResult:
    """All-sky proper-motion maps: the per-region statistics merged and degraded by the nested
    right shift to every level 0..L_max (``warehouse/proper_motion_maps``, one table with a
    ``level`` column), plus Mollweide PNGs of mean pmra, mean pmdec and source counts under
    ``<home>/maps/proper_motion/``. Empty pixels are NaN (grey in the PNGs). No Spark."""
    layout = storage.layout
    started = time.perf_counter()
    levels, pyramid = publish_pyramid(layout, config.render_levels)
    level_max, totals = pyramid.level_max, pyramid.totals
    if len(set(levels.values())) > 1:
        context.log.warning(f"pm_stats regions were computed at different levels {sorted(set(levels.values()))}; maps use the coarsest, {level_max}")
    merge_seconds = time.perf_counter() - started
    # Once per state folder: afterwards a re-plot at any level 0..L_max is a lookup, no healpy.
    new_grids = maps.warm_projection_cache(range(level_max + 1), maps.projection_cache(layout))

    metadata: dict = {}
    rendered = []
    bad_levels = [lv for lv in config.render_levels if not 0 <= lv <= level_max]
    if bad_levels:
        context.log.warning(f"render levels {bad_levels} are outside 0..{level_max}; skipped")
    for level in sorted({lv for lv in config.render_levels if 0 <= lv <= level_max}):
        table = pm.finalise(pyramid.kept(level))
        counts = table.column("n_sources").to_numpy()
        metadata[f"level_{level}_empty_pixels"] = int(np.count_nonzero(counts == 0))
        metadata[f"level_{level}_pixels_without_pm"] = int(np.count_nonzero(table.column("n_pm").to_numpy() == 0))
        variants = [(q, False) for q in _PLOTTED] + ([("pmra", True), ("pmdec", True)] if config.weighted else [])
        for quantity, weighted in variants:
            path = maps.render_map(table, quantity, maps.png_path(layout, level, quantity, weighted), weighted=weighted, cache_dir=maps.projection_cache(layout))
            name = f"{quantity}{'_weighted' if weighted else ''}_level_{level}"
            metadata[f"map_{name}"] = MetadataValue.md(maps.preview_markdown(path.read_bytes(), name))
            metadata[f"png_{name}"] = MetadataValue.path(str(path))
            rendered.append(str(path))
    seconds = time.perf_counter() - started
    metadata.update(
        {
            "level_max": level_max,
            "levels_stored": MetadataValue.json(list(range(level_max + 1))),
            "levels_rendered": MetadataValue.json(sorted({lv for lv in config.render_levels if 0 <= lv <= level_max})),
            "regions_merged": len(levels),
            "regions_reused": len(pyramid.reused),
            "rows": totals["n_sources"],
            "rows_with_pm": totals["n_pm"],
            "rows_without_pm": totals["n_sources"] - totals["n_pm"],
            f"pixels_with_sources_level_{level_max}": totals["pixels"],
            f"sky_fraction_covered_level_{level_max}": round(totals["pixels"] / npix(level_max), 4),
            "table_path": MetadataValue.path(str(layout.table(MAPS_TABLE))),
            "merge_seconds": round(merge_seconds, 3),
            "projection_grids_computed": MetadataValue.json(new_grids),
            "wall_seconds": round(seconds, 3),
            "pngs": MetadataValue.json(rendered),
        }
    )
    return MaterializeResult(metadata=metadata)


@asset_check(asset=proper_motion_maps, description="The stored maps hold every counted source at every level, and a mean wherever there is a proper motion.")
def maps_consistent(storage: StorageResource) -> AssetCheckResult:
    """Totals per level of the stored pyramid against the pm_stats versions it was built from;
    NaN means only in pixels without proper motions."""
    layout = storage.layout
    manifest = maps.maps_manifest(layout)
    if "sky_levels" not in manifest:
        return AssetCheckResult(passed=False, metadata={"reason": "no stored maps"})
    per_level = {}
    for level in manifest["levels"]:
        stats = maps.pyramid_level(layout, level, current_only=False)
        per_level[level] = int(np.sum(stats.column("n_sources").to_numpy()))
    finest = pm.finalise(stats, dense=False)  # the levels ascend: the last one read is L_max
    stats_rows = manifest.get("rows")
    has_pm = finest.column("n_pm").to_numpy() > 0
    nan_with_pm = int(np.count_nonzero(has_pm & ~np.isfinite(finest.column("mean_pmra").to_numpy())))
    current = manifest.get("pm_stats_versions") == maps.region_versions(layout, STATS_TABLE)
    passed = len(set(per_level.values())) == 1 and set(per_level.values()) == {stats_rows} and nan_with_pm == 0
    return AssetCheckResult(
        passed=passed,
        metadata={
            "rows_per_level": MetadataValue.json({str(k): v for k, v in per_level.items()}),
            "rows_in_stats": stats_rows,
            "pixels_with_pm_but_nan_mean": nan_with_pm,
            "built_from_current_pm_stats": current,
        },
    )
