"""Proper-motion sufficient statistics per HEALPix pixel, computed inside Spark.

One ``groupBy`` on ``source_id >> shift`` (the nested pixel at the chosen level, see
:mod:`gaia_flows.science.healpix`) with plain sums. Spark aggregates each input split
before the exchange (partial aggregation), and the region tables are sorted by
``source_id``, so every task emits one small row per pixel it saw: raw rows are never
shuffled, and only the per-pixel result (at most 12·4^level rows) reaches the driver, as
Arrow. The column definitions match :mod:`gaia_flows.science.proper_motion`, whose numpy
version is the reference these sums are tested against.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from gaia_flows.contracts import load_contract
from gaia_flows.layout import StateLayout
from gaia_flows.science import healpix
from gaia_flows.science import proper_motion as pm
from gaia_flows.tables import region_paths

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


class InputColumnsError(ValueError):
    """A region's files lack a column the statistics cannot be computed without."""


def check_input_columns(layout: StateLayout, table: str, regions: list[str]) -> None:
    """Fail, naming the region, file and columns, if a file lacks ``pm.REQUIRED_COLUMNS``.

    The catalogue contract only requires ``source_id``, ``ra`` and ``dec``, so a region ingested
    from an archive extract may hold any subset of the other columns. Without proper motions
    there is nothing to average, and Spark would otherwise stop on an unresolved column (or,
    reading with a schema, count every star as having no proper motion). Only footers are read.
    """
    problems = []
    for region in regions:
        for path in layout.region_files(table, region):
            names = set(pq.read_schema(path).names)
            missing = [c for c in pm.REQUIRED_COLUMNS if c not in names]
            if missing:
                problems.append(f"{region}: {path.name} has no {', '.join(missing)}")
    if problems:
        raise InputColumnsError(
            f"proper-motion statistics need the {table} columns {', '.join(pm.REQUIRED_COLUMNS)}; "
            f"re-ingest these regions from files that carry them: {'; '.join(problems)}"
        )


def read_input(session: SparkSession, layout: StateLayout, table: str, regions: list[str]) -> DataFrame:
    """The columns the statistics need from the given regions of ``table`` (Parquet column
    pruning: the other gaia_source columns are never read).

    Read with the contract's types for those columns, so a file without ``pmra_error`` or
    ``pmdec_error`` reads them as null: its sources are counted and averaged, with no weight in
    the inverse-variance sums. Files without a required column fail first
    (:func:`check_input_columns`).
    """
    paths = region_paths(layout, table, regions)
    if not paths:
        raise FileNotFoundError(f"table {table!r} has no published regions under {layout.table(table)}")
    check_input_columns(layout, table, regions)
    schema = from_arrow_schema(load_contract(table).arrow_schema(list(pm.INPUT_COLUMNS)))
    with driver_listing(session, len(paths)):
        return session.read.schema(schema).parquet(*paths).select(*pm.INPUT_COLUMNS)


def _has(column: str) -> Column:
    c = F.col(column)
    return c.isNotNull() & ~F.isnan(c)


def _weight(error_column: str, has_pm: Column) -> Column:
    err = F.col(error_column).cast("double")
    usable = has_pm & err.isNotNull() & ~F.isnan(err) & (err > 0)
    return F.when(usable, 1.0 / (err * err)).otherwise(0.0)


def pm_stats_frame(df: DataFrame, level: int = pm.DEFAULT_LEVEL) -> DataFrame:
    """Lazy DataFrame of the statistics columns, one row per non-empty pixel at ``level``."""
    shift = healpix.source_id_shift(level)
    has_pm = _has("pmra") & _has("pmdec")
    ra = F.when(has_pm, F.col("pmra").cast("double")).otherwise(0.0)
    dec = F.when(has_pm, F.col("pmdec").cast("double")).otherwise(0.0)
    w_ra = _weight("pmra_error", has_pm)
    w_dec = _weight("pmdec_error", has_pm)
    rows = df.select(
        F.shiftright(F.col("source_id"), shift).alias("pixel"),
        has_pm.cast("long").alias("has_pm"),
        ra.alias("ra"),
        dec.alias("dec"),
        w_ra.alias("w_ra"),
        w_dec.alias("w_dec"),
    )
    return rows.groupBy("pixel").agg(
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


def compute_region_stats(df: DataFrame, regions: list[str], level: int = pm.DEFAULT_LEVEL) -> dict[str, pa.Table]:
    """Statistics of each sky region at ``level``, from one Spark aggregation over all of them.

    A level coarser than the regions' (L_max 0 with level-1 regions) has pixels shared by
    several regions, so the rows are grouped at the region level and each region's table is
    degraded afterwards: the stored tables stay per region and still merge exactly.
    """
    region_level = _region_level(regions)
    stats = compute_pm_stats(df, max(level, region_level))
    return {region: pm.degrade(table, level) for region, table in split_by_region(stats, regions).items()}


def _region_level(regions: list[str]) -> int:
    levels = {healpix.parse_region_key(r)[0] for r in regions}
    if len(levels) != 1:
        raise ValueError(f"regions of mixed levels: {sorted(regions)}")
    return levels.pop()


def split_by_region(stats: pa.Table, regions: list[str]) -> dict[str, pa.Table]:
    """Cut an all-regions statistics table into one table per sky region.

    Every pixel at the statistics level lies inside exactly one region (nested indices), and
    ``gaia_source`` only accepts rows whose ``source_id`` lies in their region, so this is
    exact. A pixel outside ``regions`` means the input held rows it should not: that is an
    error, not something to drop silently.
    """
    level = pm.stats_level(stats)
    parsed = {r: healpix.parse_region_key(r) for r in regions}
    region_level = _region_level(regions)
    if region_level > level:
        raise ValueError(f"statistics level {level} is coarser than the region level {region_level}")
    owner = healpix.degrade(stats.column("pixel").to_numpy(), level, region_level)
    by_pixel = {pixel: key for key, (_, pixel) in parsed.items()}
    stray = sorted(set(np.unique(owner).tolist()) - set(by_pixel))
    if stray:
        raise ValueError(f"input rows fall in region pixel(s) {stray} at level {region_level}, outside the run's regions {sorted(regions)}")
    if np.any(owner[1:] < owner[:-1]):
        raise ValueError("statistics must be sorted by pixel (pm.conform sorts them)")
    # Sorted by pixel, each region's rows are one zero-copy slice.
    bounds = np.searchsorted(owner, [[pixel, pixel + 1] for pixel in by_pixel])
    return {key: stats.slice(int(lo), int(hi - lo)) for key, (lo, hi) in zip(by_pixel.values(), bounds)}
