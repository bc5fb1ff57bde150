"""Proper-motion sufficient statistics per HEALPix pixel, computed inside Spark.

One ``groupBy`` on ``source_id >> shift`` (the nested pixel at the chosen level, see
:mod:`gaia_flows.science.healpix`) with plain sums. Spark aggregates each input split
before the exchange (partial aggregation), and the region tables are sorted by
``source_id``, so every task emits one small row per pixel it saw: raw rows are never
shuffled. The asset's statistics are written by the executors, one table per sky region
(:func:`write_region_stats`); :func:`compute_pm_stats` brings a result to the driver as Arrow
instead, for comparisons. The column definitions match :mod:`gaia_flows.science.proper_motion`, whose numpy
version is the reference these sums are tested against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from gaia_flows.layout import StateLayout
from gaia_flows.maps import STATS_TABLE
from gaia_flows.science import healpix
from gaia_flows.science import proper_motion as pm
from gaia_flows.tables import region_paths, write_regions

LISTING_THRESHOLD = "spark.sql.sources.parallelPartitionDiscovery.threshold"


@contextmanager
def driver_listing(session: SparkSession, paths: int) -> Iterator[None]:
    """Let the driver list up to ``paths`` input paths itself.

    Above 32 paths (Spark's default threshold) a read lists them with a Spark job: ~0.7 s of
    task scheduling per run for the 48 region directories of an all-sky run, longer than the
    listing itself. The threshold is a session setting, so it is restored afterwards.
    """
    previous = session.conf.get(LISTING_THRESHOLD, None)
    session.conf.set(LISTING_THRESHOLD, str(max(paths, int(previous or 32))))
    try:
        yield
    finally:
        if previous is None:
            session.conf.unset(LISTING_THRESHOLD)
        else:
            session.conf.set(LISTING_THRESHOLD, previous)


def read_input(session: SparkSession, layout: StateLayout, table: str, regions: list[str]) -> DataFrame:
    """The columns the statistics need from the given regions of ``table`` (Parquet column
    pruning: the other gaia_source columns are never read)."""
    paths = region_paths(layout, table, regions)
    if not paths:
        raise FileNotFoundError(f"table {table!r} has no published regions under {layout.table(table)}")
    with driver_listing(session, len(paths)):
        return session.read.parquet(*paths).select(*pm.INPUT_COLUMNS)


def _has(column: str) -> Column:
    c = F.col(column)
    return c.isNotNull() & ~F.isnan(c)


def _weight(error_column: str, has_pm: Column) -> Column:
    err = F.col(error_column).cast("double")
    usable = has_pm & err.isNotNull() & ~F.isnan(err) & (err > 0)
    return F.when(usable, 1.0 / (err * err)).otherwise(0.0)


def pm_stats_frame(df: DataFrame, level: int = pm.DEFAULT_LEVEL, region_level: int | None = None) -> DataFrame:
    """Lazy DataFrame of the statistics columns, one row per non-empty pixel at ``level``.

    With ``region_level``, rows are grouped by (``region``, ``pixel``), ``region`` being the
    source's pixel at that level: a pixel coarser than the regions (level 0 with level-1
    regions) then gets one row per region holding part of it, so every region's rows are its
    own and the per-region tables still merge exactly.
    """
    shift = healpix.source_id_shift(level)
    has_pm = _has("pmra") & _has("pmdec")
    ra = F.when(has_pm, F.col("pmra").cast("double")).otherwise(0.0)
    dec = F.when(has_pm, F.col("pmdec").cast("double")).otherwise(0.0)
    w_ra = _weight("pmra_error", has_pm)
    w_dec = _weight("pmdec_error", has_pm)
    keys = [F.shiftright(F.col("source_id"), shift).alias("pixel")]
    if region_level is not None:
        keys.insert(0, F.shiftright(F.col("source_id"), healpix.source_id_shift(region_level)).alias("region"))
    rows = df.select(
        *keys,
        has_pm.cast("long").alias("has_pm"),
        ra.alias("ra"),
        dec.alias("dec"),
        w_ra.alias("w_ra"),
        w_dec.alias("w_dec"),
    )
    return rows.groupBy(*[k for k in ("region", "pixel") if k in rows.columns]).agg(
        F.count(F.lit(1)).alias("n_sources"),
        F.sum("has_pm").alias("n_pm"),
        F.sum("ra").alias("sum_pmra"),
        F.sum("dec").alias("sum_pmdec"),
        F.sum(F.col("ra") * F.col("ra")).alias("sum_pmra2"),
        F.sum(F.col("dec") * F.col("dec")).alias("sum_pmdec2"),
        F.sum("w_ra").alias("sumw_pmra"),
        F.sum("w_dec").alias("sumw_pmdec"),
        F.sum(F.col("w_ra") * F.col("ra")).alias("sumwx_pmra"),
        F.sum(F.col("w_dec") * F.col("dec")).alias("sumwx_pmdec"),
        F.sum(F.col("w_ra") * F.col("ra") * F.col("ra")).alias("sumwx2_pmra"),
        F.sum(F.col("w_dec") * F.col("dec") * F.col("dec")).alias("sumwx2_pmdec"),
    )


def compute_pm_stats(df: DataFrame, level: int = pm.DEFAULT_LEVEL) -> pa.Table:
    """Run the aggregation and bring the small result to the driver as a statistics table."""
    result = pm_stats_frame(df.select(*pm.INPUT_COLUMNS), level).toArrow()
    return pm.conform(result, level)


def write_region_stats(
    df: DataFrame, layout: StateLayout, regions: list[str], level: int = pm.DEFAULT_LEVEL, manifest: Callable[[str], dict] | None = None
) -> dict[str, Path]:
    """Statistics of each sky region at ``level``, written by Spark as one table per region.

    One aggregation over all the regions. The executors write and the driver only publishes, so
    the driver never holds the per-pixel result: its memory does not grow with the catalogue or
    with how much of the sky is covered. The level is recorded in every region's manifest
    (``level``), where :func:`gaia_flows.maps.read_region_stats` finds it.
    """
    _check_regions(regions)
    frame = pm_stats_frame(df.select(*pm.INPUT_COLUMNS), level, region_level=healpix.REGION_LEVEL)

    def region_manifest(region: str) -> dict:
        return {**(manifest(region) if manifest else {}), "level": level}

    files = min(len(regions), df.sparkSession.sparkContext.defaultParallelism)  # a task writes all its regions' files
    return write_regions(frame, layout, STATS_TABLE, regions, files=files, sort_key="pixel", manifest=region_manifest, region_column="region")


def _check_regions(regions: list[str]) -> None:
    levels = {healpix.parse_region_key(r)[0] for r in regions}
    if levels != {healpix.REGION_LEVEL}:
        raise ValueError(f"regions must all be at level {healpix.REGION_LEVEL}: {sorted(regions)}")
