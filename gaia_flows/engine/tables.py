"""Spark reads and writes of warehouse tables.

The Spark side of :mod:`gaia_flows.warehouse`: the same staging folders, manifests and atomic
:func:`~gaia_flows.warehouse.publish`, with the rows written by Spark executors instead of the
driver. Tables the driver writes (statistics, predictions, the maps pyramid) use the pyarrow
writers there.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from pyspark.sql import DataFrame, SparkSession

from gaia_flows.layout import StateLayout
from gaia_flows.warehouse import (
    claim_staging,
    publish,
    region_paths,
    release_staging,
    warehouse_errors,
    write_manifest,
)


def read_regions(
    spark: SparkSession, layout: StateLayout, table: str, regions: list[str] | None = None
) -> DataFrame:
    """Spark DataFrame over the given regions (all published ones by default)."""
    paths = region_paths(layout, table, regions)
    if not paths:
        raise FileNotFoundError(f"table {table!r} has no published regions under {layout.table(table)}")
    return spark.read.parquet(*paths)


def write_region(
    df: DataFrame,
    layout: StateLayout,
    table: str,
    region: str,
    files: int,
    sort_key: str = "source_id",
    manifest: dict | None = None,
) -> Path:
    """Write ``df`` as ``files`` Parquet files sorted by ``sort_key`` and publish it atomically.

    A range partition on the sort key keeps neighbouring sources in the same file, so a region
    (and any sub-range of source_id) is read sequentially.

    Parameters
    ----------
    df
        The region's rows.
    layout, table, region
        Where it is published: ``warehouse/<table>/<region>``.
    files
        Number of Parquet files (see :func:`gaia_flows.engine.sizing.files_per_region`).
    sort_key
        Column the files are range-partitioned and sorted by.
    manifest
        Written as the version's ``_region.json``.

    Returns
    -------
    Path
        The published version directory.
    """
    return _publish_spark(df, layout, table, layout.region_dir(table, region), files, sort_key, manifest)


def write_table(
    df: DataFrame,
    layout: StateLayout,
    table: str,
    files: int,
    sort_key: str = "source_id",
    manifest: dict | None = None,
) -> Path:
    """Publish an unpartitioned table written by Spark (e.g. the contiguous training set).

    Parameters
    ----------
    df
        The table's rows.
    layout, table
        Where it is published: ``warehouse/<table>``.
    files
        Number of Parquet files (range partitions of ``sort_key``).
    sort_key
        Column the files are range-partitioned and sorted by.
    manifest
        Written as the version's ``_region.json``.

    Returns
    -------
    Path
        The published version directory.
    """
    return _publish_spark(df, layout, table, layout.table(table), files, sort_key, manifest)


def _publish_spark(
    df: DataFrame,
    layout: StateLayout,
    table: str,
    final: Path,
    files: int,
    sort_key: str,
    manifest: dict | None,
) -> Path:
    with warehouse_errors(layout, table):
        staging = claim_staging(layout, table)
        try:
            df.repartitionByRange(max(1, files), sort_key).sortWithinPartitions(sort_key).write.parquet(
                str(staging)
            )
            write_manifest(staging, manifest)
            return publish(staging, final)
        finally:
            release_staging(staging)


def write_regions(
    df: DataFrame,
    layout: StateLayout,
    table: str,
    regions: list[str],
    files: int,
    sort_key: str = "source_id",
    manifest: dict | None = None,
) -> dict[str, Path]:
    """Write many regions of ``df`` in one Spark job and publish each one atomically.

    One pass over the data instead of one job per region: on a backfill of 48 small regions the
    per-job overhead dominates otherwise. ``df``'s rows must belong to ``regions`` (the region
    is derived from ``sort_key``, a Gaia ``source_id``); a region without rows is published
    empty, with ``df``'s schema, so readers find every region they asked for.

    Parameters
    ----------
    df
        Rows of ``regions``, with a Gaia ``source_id`` in ``sort_key``.
    layout, table
        Where the regions are published: ``warehouse/<table>/<region>``.
    regions
        The region keys written; each is published, empty if it has no rows.
    files
        Number of Parquet files over all regions (range partitions of ``sort_key``).
    sort_key
        The ``source_id`` column the region is derived from and the files are sorted by.
    manifest
        Written to every region's ``_region.json`` with its ``region`` key added.

    Returns
    -------
    dict[str, Path]
        The published version directory of each region.

    Raises
    ------
    ValueError
        ``df`` holds rows of a region not in ``regions`` (nothing is published then).
    """
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import to_arrow_schema

    from gaia_flows.science.healpix import REGION_LEVEL, region_key, source_id_shift

    staging = claim_staging(layout, table)
    try:
        keyed = df.withColumn("_region", F.shiftright(F.col(sort_key), source_id_shift(REGION_LEVEL)))
        keyed.repartitionByRange(max(1, files), sort_key).sortWithinPartitions(
            "_region", sort_key
        ).write.partitionBy("_region").parquet(str(staging))
        written = {region_key(int(p.name.split("=", 1)[1])): p for p in staging.glob("_region=*")}
        stray = sorted(set(written) - set(regions))
        if stray:
            raise ValueError(f"rows of {table} fall outside the regions being written: {stray}")
        published = {}
        for region in regions:
            directory = written.get(region)
            if directory is None:
                directory = staging / f"_region=empty-{region}"
                directory.mkdir(parents=True)
                pq.write_table(
                    to_arrow_schema(df.schema).empty_table(), directory / "part-00000-empty.parquet"
                )
            write_manifest(directory, {**(manifest or {}), "region": region})
            published[region] = publish(directory, layout.region_dir(table, region))
        return published
    finally:
        release_staging(staging)
