"""All-sky proper-motion maps: the per-region statistics merged into a stored pyramid of every
level, plus Mollweide PNGs. No Spark: a map at another level is a cut of the stored pyramid
(``gaia-flows map``), never a rescan. Building and reading the pyramid is :mod:`gaia_flows.maps`.
"""

import time

import numpy as np
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetExecutionContext,
    AutomationCondition,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
    asset_check,
)

from gaia_flows import maps
from gaia_flows.assets.proper_motion import GROUP, pm_stats
from gaia_flows.layout import MAPS_TABLE, STATS_TABLE
from gaia_flows.releases import release_of
from gaia_flows.resources.storage import StorageResource
from gaia_flows.science import proper_motion as pm
from gaia_flows.science.healpix import npix


class ProperMotionMapsConfig(Config):
    render_levels: list[int] = [6]
    """Levels to render as PNG (each <= the statistics' level); every level 0..L_max is stored."""
    weighted: bool = False
    """Also render the inverse-variance weighted means of pmra and pmdec."""


_PLOTTED = ("pmra", "pmdec", "count")


@asset(
    deps=[pm_stats],
    group_name=GROUP,
    kinds={"parquet", "healpy"},
    automation_condition=AutomationCondition.eager().without(~AutomationCondition.any_deps_missing()),
)
def proper_motion_maps(
    context: AssetExecutionContext, config: ProperMotionMapsConfig, storage: StorageResource
) -> MaterializeResult:
    """All-sky proper-motion maps: the per-region statistics merged and degraded by the nested
    right shift to every level 0..L_max (``warehouse/proper_motion_maps``, one table with a
    ``level`` column), plus Mollweide PNGs of mean pmra, mean pmdec and source counts under
    ``<home>/maps/proper_motion/`` (``maps/<release>/`` for a release other than DR3). Empty
    pixels are NaN (grey in the PNGs). No Spark."""
    release = release_of(context)
    layout = release.layout(storage.layout)
    started = time.perf_counter()
    levels, pyramid = maps.publish_pyramid(layout, config.render_levels)
    level_max, totals = pyramid.level_max, pyramid.totals
    if len(set(levels.values())) > 1:
        context.log.warning(
            f"pm_stats regions were computed at different levels {sorted(set(levels.values()))}; maps use the coarsest, {level_max}"
        )
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
        metadata[f"level_{level}_pixels_without_pm"] = int(
            np.count_nonzero(table.column("n_pm").to_numpy() == 0)
        )
        variants = [(q, False) for q in _PLOTTED] + (
            [("pmra", True), ("pmdec", True)] if config.weighted else []
        )
        for quantity, weighted in variants:
            path = maps.render_map(
                table,
                quantity,
                maps.png_path(layout, level, quantity, weighted),
                weighted=weighted,
                cache_dir=maps.projection_cache(layout),
            )
            name = f"{quantity}{'_weighted' if weighted else ''}_level_{level}"
            metadata[f"map_{name}"] = MetadataValue.md(maps.preview_markdown(path.read_bytes(), name))
            metadata[f"png_{name}"] = MetadataValue.path(str(path))
            rendered.append(str(path))
    seconds = time.perf_counter() - started
    metadata.update(
        {
            "release": release.name,
            "level_max": level_max,
            "levels_stored": MetadataValue.json(list(range(level_max + 1))),
            "levels_rendered": MetadataValue.json(
                sorted({lv for lv in config.render_levels if 0 <= lv <= level_max})
            ),
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


@asset_check(
    asset=proper_motion_maps,
    description="The stored maps hold every counted source at every level, and a mean wherever there is a proper motion.",
)
def maps_consistent(context: AssetCheckExecutionContext, storage: StorageResource) -> AssetCheckResult:
    """Totals per level of the stored pyramid against the pm_stats versions it was built from;
    NaN means only in pixels without proper motions."""
    layout = release_of(context).layout(storage.layout)
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
    current = manifest.get("pm_stats_versions") == layout.region_versions(STATS_TABLE)
    passed = (
        len(set(per_level.values())) == 1 and set(per_level.values()) == {stats_rows} and nan_with_pm == 0
    )
    return AssetCheckResult(
        passed=passed,
        metadata={
            "rows_per_level": MetadataValue.json({str(k): v for k, v in per_level.items()}),
            "rows_in_stats": stats_rows,
            "pixels_with_pm_but_nan_mean": nan_with_pm,
            "built_from_current_pm_stats": current,
        },
    )
