"""Proper-motion sufficient statistics per HEALPix pixel, computed inside Spark.

Two engines, the same statistics (both tested against DuckDB):

- **region tasks** (:func:`stats_in_region_tasks`): each Spark task takes whole sky regions,
  reads their Parquet files with pyarrow, sums them with numpy
  (:func:`gaia_flows.science.proper_motion.stats_from_table`: sorted rows, ``reduceat`` over
  cache-sized blocks)
  and publishes each region's table itself; the driver receives one row per region. No
  exchange, no final aggregation stage, no per-pixel result through the JVM or the driver, so
  it is the one for regions a core sums on its own.
- **one ``groupBy``** on ``source_id >> shift`` (:func:`compute_region_stats`) with plain
  sums. Spark aggregates each input split before the exchange (partial aggregation), and the
  region tables are sorted by ``source_id``, so every task emits one small row per pixel it
  saw: raw rows are never shuffled, and only the per-pixel result (at most 12·4^level rows)
  reaches the driver, as Arrow. It splits a region's files across cores, so it is the one
  for big regions on many cores (the whole catalogue on a cluster).

:func:`choose_engine` picks between them; neither ever shuffles raw rows.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from gaia_flows.contracts import load_contract
from gaia_flows.engine.metrics import timed_task
from gaia_flows.engine.sizing import balanced_groups
from gaia_flows.layout import StateLayout
from gaia_flows.science import healpix
from gaia_flows.science import proper_motion as pm
from gaia_flows.science.contract import TableContract
from gaia_flows.warehouse import region_paths, write_region_arrow

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


def read_input(
    session: SparkSession,
    layout: StateLayout,
    table: str,
    regions: list[str],
    contract: TableContract | None = None,
) -> DataFrame:
    """The columns the statistics need from the given regions of ``table`` (Parquet column
    pruning: the other gaia_source columns are never read).

    Read with the types of the release's contract (default: DR3's ``table`` contract) for
    those columns, so a file without ``pmra_error`` or
    ``pmdec_error`` reads them as null: its sources are counted and averaged, with no weight in
    the inverse-variance sums. Files without a required column fail first
    (:func:`check_input_columns`).
    """
    paths = region_paths(layout, table, regions)
    if not paths:
        raise FileNotFoundError(f"table {table!r} has no published regions under {layout.table(table)}")
    check_input_columns(layout, table, regions)
    contract = contract or load_contract(table)
    schema = from_arrow_schema(contract.arrow_schema(list(pm.INPUT_COLUMNS)))
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
        F.sum(F.col("w_ra") * F.col("w_ra")).alias("sumw2_pmra"),
        F.sum(F.col("w_dec") * F.col("w_dec")).alias("sumw2_pmdec"),
    )


def compute_pm_stats(df: DataFrame, level: int = pm.DEFAULT_LEVEL) -> pa.Table:
    """Run the aggregation and bring the small result to the driver as a statistics table."""
    result = pm_stats_frame(df.select(*pm.INPUT_COLUMNS), level).toArrow()
    return pm.conform(result, level)


def compute_region_stats(
    df: DataFrame, regions: list[str], level: int = pm.DEFAULT_LEVEL
) -> dict[str, pa.Table]:
    """Statistics of each sky region at ``level``, from one Spark aggregation over all of them.

    A level coarser than the regions' (L_max 0 with level-1 regions) has pixels shared by
    several regions, so the rows are grouped at the region level and each region's table is
    degraded afterwards: the stored tables stay per region and still merge exactly.
    """
    region_level = _region_level(regions)
    stats = compute_pm_stats(df, max(level, region_level))
    return {region: pm.degrade(table, level) for region, table in split_by_region(stats, regions).items()}


def _owners(
    stats: pa.Table, region_level: int, allowed: set[int], allowed_name: str, rows_name: str
) -> np.ndarray:
    """Each statistics row's region pixel at ``region_level``; a pixel outside ``allowed`` means
    the input held rows it should not, which is an error, not something to drop silently."""
    owner = healpix.degrade(stats.column("pixel").to_numpy(), pm.stats_level(stats), region_level)
    stray = sorted(set(np.unique(owner).tolist()) - allowed)
    if stray:
        raise ValueError(
            f"{rows_name} fall in region pixel(s) {stray} at level {region_level}, outside {allowed_name}"
        )
    return owner


def _region_level(regions: list[str]) -> int:
    levels = {healpix.parse_region_key(r)[0] for r in regions}
    if len(levels) != 1:
        raise ValueError(f"regions of mixed levels: {sorted(regions)}")
    return levels.pop()


def split_by_region(stats: pa.Table, regions: list[str]) -> dict[str, pa.Table]:
    """Cut an all-regions statistics table into one table per sky region.

    Every pixel at the statistics level lies inside exactly one region (nested indices), and
    ``gaia_source`` only accepts rows whose ``source_id`` lies in their region, so this is
    exact. A pixel outside ``regions`` is an error (:func:`_owners`).
    """
    level = pm.stats_level(stats)
    parsed = {r: healpix.parse_region_key(r) for r in regions}
    region_level = _region_level(regions)
    if region_level > level:
        raise ValueError(f"statistics level {level} is coarser than the region level {region_level}")
    by_pixel = {pixel: key for key, (_, pixel) in parsed.items()}
    owner = _owners(stats, region_level, set(by_pixel), f"the run's regions {sorted(regions)}", "input rows")
    if np.any(owner[1:] < owner[:-1]):
        raise ValueError("statistics must be sorted by pixel (pm.conform sorts them)")
    # Sorted by pixel, each region's rows are one zero-copy slice.
    bounds = np.searchsorted(owner, [[pixel, pixel + 1] for pixel in by_pixel])
    return {key: stats.slice(int(lo), int(hi - lo)) for key, (lo, hi) in zip(by_pixel.values(), bounds)}


# --- region tasks -----------------------------------------------------------------------------

ENGINES = ("auto", "region-tasks", "groupby")


@dataclass(frozen=True)
class EngineChoice:
    engine: str
    reason: str


SMALL_REGION_BYTES = 512 * 2**20
"""A region up to this size is one task's work on any number of cores: one task sums several
hundred MB/s of region files, so such a region takes under a second, about what the groupBy
spends planning before it reads a row (and each Dagster run is a fresh process, with a cold
plan)."""


def choose_engine(region_bytes: dict[str, int], cores: int, requested: str = "auto") -> EngineChoice:
    """Region tasks when no region is more than one core's share of the run's input bytes, or
    no more than :data:`SMALL_REGION_BYTES`.

    A region is one task's work, so the run then keeps every core busy to the end (regions go
    out largest first). 48 regions of the whole catalogue on a cluster of hundreds of cores
    would leave cores idle: the ``groupBy`` splits files across all of them instead.
    """
    if requested not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {requested!r}")
    if requested != "auto":
        return EngineChoice(requested, f"requested engine={requested}")
    total, biggest = sum(region_bytes.values()), max(region_bytes.values(), default=0)
    share = total / max(cores, 1)
    sizes = f"the biggest region is {biggest / 2**20:.1f} MiB; one core's share is {share / 2**20:.1f} MiB of {total / 2**20:.1f} MiB on {cores} cores"
    if biggest <= max(share, SMALL_REGION_BYTES):
        return EngineChoice("region-tasks", sizes)
    return EngineChoice(
        "groupby", f"{sizes}, and a region over {SMALL_REGION_BYTES / 2**20:.0f} MiB is worth splitting"
    )


def _read_pm_columns(path: str) -> pa.Table:
    """The statistics' input columns of one file; absent error columns read as null (no weight),
    as :func:`read_input` does. Required columns are checked first (:func:`check_input_columns`)."""
    parquet = pq.ParquetFile(path)  # not read_table: its dataset layer cost ~25 % more CPU per file
    present = [name for name in pm.INPUT_COLUMNS if name in parquet.schema_arrow.names]
    table = parquet.read(columns=present)
    for name in pm.INPUT_COLUMNS:
        if name not in present:
            table = table.append_column(name, pa.nulls(table.num_rows, pa.float32()))
    return table


def region_stats(files: list[str], region: str, level: int = pm.DEFAULT_LEVEL) -> pa.Table:
    """Statistics of one sky region's files at ``level``, one file at a time (memory stays one
    file's columns). Like :func:`split_by_region`, a row outside ``region`` is an error, named by
    file, and a level coarser than the region's is computed at the region's level and degraded."""
    region_level, region_pixel = healpix.parse_region_key(region)
    at = max(level, region_level)
    parts = []
    for path in files:
        stats = pm.stats_from_table(_read_pm_columns(path), at)
        _owners(stats, region_level, {region_pixel}, f"the run's region {region}", f"{path}: rows")
        parts.append(stats)
    merged = pm.merge(parts, at)  # boundary pixels shared by consecutive files are summed here
    return pm.degrade(merged, level)


@dataclass(frozen=True)
class StatsPublisher:
    """Publishes one region's statistics table with its manifest and returns its counts.

    Picklable, so the region tasks publish from the executors and only these counts travel back.
    """

    layout: StateLayout
    table: str
    level: int
    source_versions: dict
    computed_at: str

    def __call__(self, region: str, stats: pa.Table) -> dict:
        counts = pm.totals(stats)
        manifest = {
            "level": self.level,
            "rows": counts["n_sources"],
            "rows_with_pm": counts["n_pm"],
            "pixels": counts["pixels"],
            "gaia_source_version": self.source_versions.get(region),
            "computed_at": self.computed_at,
        }
        path = write_region_arrow(stats, self.layout, self.table, region, manifest=manifest)
        return {
            "region": region,
            **counts,
            "version": os.path.basename(path),
            "stored_bytes": sum(f.stat().st_size for f in path.glob("*.parquet")),
        }


def stats_in_region_tasks(
    session: SparkSession,
    layout: StateLayout,
    table: str,
    regions: list[str],
    level: int,
    publish: Callable[[str, pa.Table], dict],
) -> list[dict]:
    """Every region's statistics computed and published by Spark tasks (:func:`region_stats`);
    returns ``publish``'s record for each region. Two groups of regions per core: a Python task
    costs ~45 ms to start in local mode, so one task per region would add ~1 s to a 48-region
    run on two cores (the statistics take ~1.5 s), and one group per core would leave nothing
    to rebalance if an executor falls behind. A plain RDD job, not a DataFrame one: there is
    no SQL plan to analyse and compile, a large share of a one-region refresh."""
    check_input_columns(layout, table, regions)
    files = {region: [str(p) for p in layout.region_files(table, region)] for region in regions}
    groups = balanced_groups(
        region_bytes(layout, table, regions), 2 * session.sparkContext.defaultParallelism
    )

    def compute_and_publish(group: int) -> list[dict]:
        return [
            timed_task(files[region], lambda r=region: publish(r, region_stats(files[r], r, level)))
            for region in groups[group]
        ]

    return (
        session.sparkContext.parallelize(range(len(groups)), len(groups))
        .flatMap(compute_and_publish)
        .collect()
    )


def region_bytes(layout: StateLayout, table: str, regions: list[str]) -> dict[str, int]:
    """Input bytes of each region, what :func:`choose_engine` and the task groups weigh; an
    unpublished region fails here, by name."""
    region_paths(layout, table, regions)
    return {region: sum(os.path.getsize(p) for p in layout.region_files(table, region)) for region in regions}
