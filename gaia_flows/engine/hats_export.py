"""``gaia_source`` as a HATS collection (the LINCC Frameworks' format LSDB opens).

The work is split the way the two libraries are good at it:

- the catalogue's partitions are written by Spark tasks, one group of sky regions per task,
  each reading its regions' Parquet files with pyarrow, adding ``_healpix_29`` from ra/dec
  (``hats.pixel_math.compute_spatial_index``), sorting by it and cutting the rows into the
  partitions the plan gives. ``benchmarks/hats_export.py`` measures this against hats-import's own
  Dask pipeline on the same catalogue;
- the plan (adaptive partitions bounded by ``pixel_threshold`` rows) is hats'
  ``generate_alignment`` over a row-count histogram at ``highest_order``, and every metadata
  file (``partition_info.csv``, ``properties``, ``dataset/_metadata``, the skymaps) is written
  by hats itself, as hats-import's own finishing step does;
- the margin cache (sources within ``margin_arcsec`` of each partition's border, which LSDB's
  cross-match needs near partition edges) and ``collection.properties`` are hats-import's
  collection pipeline, on a local Dask client.

Refreshing: partitions never straddle a sky region (``lowest_order`` is at least the region
level), and the plan of a region depends only on the histogram of the positions inside it, so
after a rerun of some regions of ``gaia_source`` only the partitions of the regions their rows
fall in (by position; a source's ``source_id`` region can differ from its position's near a
border) are rewritten. The others are hard links to the previous version's files. The whole
collection is built in a staging folder and published with one rename
(:func:`gaia_flows.warehouse.publish`), so a reader sees the old collection or the new one.

Layout of a published collection: see :attr:`gaia_flows.layout.StateLayout.hats`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gaia_flows.engine.metrics import timed_task
from gaia_flows.engine.sizing import balanced_groups
from gaia_flows.layout import StateLayout
from gaia_flows.science.healpix import REGION_LEVEL, region_key
from gaia_flows.warehouse import link_or_copy, publish

EXPORT_MANIFEST = "_export.json"
HISTOGRAM_FILE = "_histogram.parquet"
SPATIAL_INDEX = "_healpix_29"
SPATIAL_ORDER = 29
WRITE_OPTIONS = {"compression": "zstd"}


@dataclass(frozen=True)
class HatsSettings:
    """What shapes the collection; a change of any of them rewrites every partition."""

    pixel_threshold: int = 1_000_000
    highest_order: int = 8
    lowest_order: int = REGION_LEVEL
    margin_arcsec: float = 10.0

    def __post_init__(self):
        if self.lowest_order < REGION_LEVEL:
            raise ValueError(
                f"lowest_order must be >= {REGION_LEVEL} (the sky-region level): a partition may not straddle two regions"
            )
        if self.highest_order < self.lowest_order:
            raise ValueError(f"highest_order {self.highest_order} < lowest_order {self.lowest_order}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExportReport:
    path: Path
    rows: int
    partitions: int
    partitions_written: int
    partitions_linked: int
    regions_changed: list[str]
    regions_rewritten: list[str]
    margin_rows: int
    orders: dict[int, int]
    seconds: dict[str, float] = field(default_factory=dict)
    task_records: list[dict] = field(default_factory=list)  # engine.metrics.timed_task, per Spark task


# --- pure parts: histogram, plan, which regions -----------------------------------------------------


def spatial_index(table: pa.Table) -> np.ndarray:
    """``_healpix_29`` of each row, from its ra/dec (the HATS spatial index)."""
    from hats.pixel_math.spatial_index import compute_spatial_index

    return compute_spatial_index(
        table.column("ra").to_numpy().astype(np.float64), table.column("dec").to_numpy().astype(np.float64)
    )


def sparse_histogram(index29: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, counts) at ``order`` of the rows with these ``_healpix_29`` values."""
    pixels, counts = np.unique(
        np.asarray(index29, dtype=np.int64) >> (2 * (SPATIAL_ORDER - order)), return_counts=True
    )
    return pixels, counts


def plan_partitions(histogram: np.ndarray, settings: HatsSettings) -> list[tuple[int, int, int]]:
    """The catalogue's partitions ``(order, pixel, rows)`` for a dense row-count histogram at
    ``settings.highest_order``, by hats' own alignment (the rule hats-import applies)."""
    from hats.pixel_math.partition_stats import generate_alignment

    alignment = generate_alignment(
        histogram, settings.highest_order, settings.lowest_order, settings.pixel_threshold
    )
    return sorted({(int(o), int(p), int(n)) for o, p, n in (a for a in alignment if a is not None) if n > 0})


def partition_region(order: int, pixel: int) -> int:
    """The sky region (level-1 pixel) a partition lies in."""
    return pixel >> (2 * (order - REGION_LEVEL))


def regions_fed(pixels: np.ndarray, order: int) -> set[int]:
    """Sky regions (by position) that histogram pixels at ``order`` fall in."""
    return set((np.asarray(pixels, dtype=np.int64) >> (2 * (order - REGION_LEVEL))).tolist())


# --- Spark tasks ----------------------------------------------------------------------------------


def _region_histogram(files: list[str], order: int) -> tuple[np.ndarray, np.ndarray]:
    parts = [spatial_index(pq.read_table(f, columns=["ra", "dec"])) for f in files]
    return sparse_histogram(np.concatenate(parts) if parts else np.zeros(0, np.int64), order)


def _region_record(region: str, files: list[str], order: int) -> dict:
    pixels, counts = _region_histogram(files, order)
    return {"region": region, "histogram": (pixels, counts), "rows": int(counts.sum())}


def _write_region(
    files: list[str], region: int, partitions: list[tuple[int, int, int]], catalog: str
) -> list[tuple[int, int, int]]:
    """Write one sky region's partitions: its rows by position from ``files`` (the source
    regions that feed it), sorted by ``_healpix_29`` then ``source_id``. Returns what it wrote."""
    from hats.io import paths
    from hats.pixel_math.healpix_pixel import HealpixPixel

    shift = 2 * (SPATIAL_ORDER - REGION_LEVEL)
    tables = []
    for path in files:
        table = pq.read_table(path)
        index = spatial_index(table)
        keep = (index >> shift) == region
        tables.append(
            table.filter(pa.array(keep)).add_column(0, SPATIAL_INDEX, pa.array(index[keep], pa.int64()))
        )
    table = pa.concat_tables(tables, promote_options="permissive").sort_by(
        [(SPATIAL_INDEX, "ascending"), ("source_id", "ascending")]
    )
    index = table.column(SPATIAL_INDEX).to_numpy()
    sorting = pq.SortingColumn.from_ordering(
        table.schema, [(SPATIAL_INDEX, "ascending"), ("source_id", "ascending")]
    )
    written = []
    for order, pixel, expected in partitions:
        shift_k = 2 * (SPATIAL_ORDER - order)
        start, end = np.searchsorted(index, [pixel << shift_k, (pixel + 1) << shift_k])
        if end - start != expected:
            raise ValueError(
                f"partition Norder={order}/Npix={pixel}: {end - start} rows where the histogram counted {expected}"
            )
        target = Path(paths.pixel_catalog_file(catalog, HealpixPixel(order, pixel)).path)
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table.slice(start, end - start), target, sorting_columns=sorting, **WRITE_OPTIONS)
        written.append((order, pixel, int(end - start)))
    if sum(n for _, _, n in written) != table.num_rows:
        raise ValueError(
            f"region {region_key(region)}: {table.num_rows} rows, {sum(n for _, _, n in written)} written to partitions"
        )
    return written


def _bytes(catalog: str, parts: list[tuple[int, int, int]]) -> int:
    from hats.io import paths
    from hats.pixel_math.healpix_pixel import HealpixPixel

    return sum(
        os.path.getsize(paths.pixel_catalog_file(catalog, HealpixPixel(o, p)).path) for o, p, _ in parts
    )


# --- the export -----------------------------------------------------------------------------------


def _previous(collection: Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The published version's manifest and per-region histograms (empty if none)."""
    manifest_path = collection / EXPORT_MANIFEST
    if not manifest_path.exists():
        return {}, {}
    manifest = json.loads(manifest_path.read_text())
    table = pq.read_table(collection / HISTOGRAM_FILE)
    region, pixel, count = (table.column(c).to_numpy() for c in ("region", "pixel", "rows"))
    return manifest, {r: (pixel[region == r], count[region == r]) for r in np.unique(region).tolist()}


def export(
    session, layout: StateLayout, table: str, source_versions: dict[str, str], settings: HatsSettings
) -> ExportReport:
    """Publish ``table`` (every published region, ``source_versions``: region -> version link
    target) as the HATS collection ``layout.hats_collection(table)``, rewriting only the
    partitions whose rows may have changed since the published version."""
    from hats.io import paths
    from hats.pixel_math.healpix_pixel import HealpixPixel

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    collection = layout.hats_collection(table)
    manifest, histograms = _previous(collection)
    if manifest.get("settings") != settings.as_dict():  # another plan: nothing carries over
        manifest, histograms = {}, {}
    old_versions = manifest.get("source_versions", {})
    changed = sorted(
        r for r in set(source_versions) | set(old_versions) if source_versions.get(r) != old_versions.get(r)
    )
    if not changed and manifest:  # a rerun on unchanged input republishes nothing
        orders = {int(k): v for k, v in manifest["orders"].items()}
        seconds["total"] = time.perf_counter() - started
        return ExportReport(
            collection.resolve(),
            manifest["rows"],
            manifest["partitions"],
            0,
            0,
            [],
            [],
            manifest["margin_rows"],
            orders,
            seconds,
        )
    files = {r: [str(p) for p in layout.region_files(table, r)] for r in source_versions}
    order = settings.highest_order

    # 1. histograms of the changed regions (Spark tasks); the others' come from the manifest.
    fresh = [r for r in changed if r in source_versions]
    sc = session.sparkContext
    sc.setJobDescription(f"HATS export of {table}")
    records = (
        sc.parallelize(fresh, len(fresh))
        .map(lambda r: timed_task(files[r], lambda: _region_record(r, files[r], order)))
        .collect()
        if fresh
        else []
    )
    computed = [(record["region"], record.pop("histogram")) for record in records]
    dirty: set[int] = set()
    for region in changed:
        if region in histograms:
            dirty |= regions_fed(histograms[region][0], order)
    histograms = {r: h for r, h in histograms.items() if r in source_versions and r not in changed} | dict(
        computed
    )
    for _, (pixels, _) in computed:
        dirty |= regions_fed(pixels, order)
    seconds["histogram"] = time.perf_counter() - started

    # 2. the plan: every partition, and the regions (by position) whose partitions are rewritten.
    dense = np.zeros(12 * 4**order, dtype=np.int64)
    feeders: dict[int, set[str]] = {}
    for region, (pixels, counts) in histograms.items():
        np.add.at(dense, pixels, counts)
        for fed in regions_fed(pixels, order):
            feeders.setdefault(fed, set()).add(region)
    partitions = plan_partitions(dense, settings) if dense.any() else []
    by_region: dict[int, list[tuple[int, int, int]]] = {}
    for part in partitions:
        by_region.setdefault(partition_region(part[0], part[1]), []).append(part)
    rewrite = sorted(r for r in dirty if r in by_region)

    # 3. the catalogue: rewritten regions by Spark tasks, the rest hard-linked.
    staging_root = layout.staging_dir(f"hats-{table}")
    staging = staging_root / table  # the collection, named as published
    catalog = staging / table
    try:
        t0 = time.perf_counter()
        if rewrite:
            weights = {str(r): sum(os.path.getsize(f) for s in feeders[r] for f in files[s]) for r in rewrite}
            groups = balanced_groups(weights, 2 * sc.defaultParallelism)
            inputs = {int(r): sorted(f for s in feeders[int(r)] for f in files[s]) for r in weights}
            catalog_dir = str(catalog)

            def write_group(group: int) -> dict:
                parts = [
                    part
                    for r in groups[group]
                    for part in _write_region(inputs[int(r)], int(r), by_region[int(r)], catalog_dir)
                ]
                return {
                    "parts": parts,
                    "rows": sum(n for _, _, n in parts),
                    "written_bytes": _bytes(catalog_dir, parts),
                }

            group_files = [sorted({f for r in group for f in inputs[int(r)]}) for group in groups]
            writes = (
                sc.parallelize(range(len(groups)), len(groups))
                .map(lambda g: timed_task(group_files[g], lambda: write_group(g)))
                .collect()
            )
            written = [part for record in writes for part in record.pop("parts")]
            records += writes
        else:
            written = []
        previous_catalog = collection / table
        linked = 0
        for region, parts in by_region.items():
            if region in dirty:
                continue
            for order_k, pixel, _ in parts:
                pixel_path = HealpixPixel(order_k, pixel)
                link_or_copy(
                    Path(paths.pixel_catalog_file(previous_catalog, pixel_path).path),
                    Path(paths.pixel_catalog_file(catalog, pixel_path).path),
                )
                linked += 1
        seconds["partitions"] = time.perf_counter() - t0
        if sorted(written) != sorted(p for r in rewrite for p in by_region[r]):
            raise ValueError(
                f"{table}: the tasks wrote {len(written)} partitions, the plan has {sum(len(by_region[r]) for r in rewrite)} to rewrite"
            )

        t0 = time.perf_counter()
        rows = _finish_catalogue(catalog, table, partitions, dense, settings)
        seconds["metadata"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        margin_rows = _margin_and_collection(staging, table, settings)
        seconds["margin"] = time.perf_counter() - t0

        histogram_rows = [
            (r, p, n)
            for r, (pixels, counts) in sorted(histograms.items())
            for p, n in zip(pixels.tolist(), counts.tolist())
        ]
        pq.write_table(
            pa.table(
                {
                    "region": [h[0] for h in histogram_rows],
                    "pixel": pa.array([h[1] for h in histogram_rows], pa.int64()),
                    "rows": pa.array([h[2] for h in histogram_rows], pa.int64()),
                }
            ),
            staging / HISTOGRAM_FILE,
        )
        rewritten = [region_key(r) for r in rewrite]
        orders: dict[int, int] = {}
        for order_k, _, _ in partitions:
            orders[order_k] = orders.get(order_k, 0) + 1
        record = {
            "settings": settings.as_dict(),
            "source_versions": source_versions,
            "rows": rows,
            "partitions": len(partitions),
            "orders": orders,
            "margin_rows": margin_rows,
            "regions_rewritten": rewritten,
        }
        (staging / EXPORT_MANIFEST).write_text(json.dumps(record, indent=2, sort_keys=True))
        target = publish(staging, collection)
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    seconds["total"] = time.perf_counter() - started
    return ExportReport(
        target,
        rows,
        len(partitions),
        len(written),
        linked,
        changed,
        rewritten,
        margin_rows,
        dict(sorted(orders.items())),
        seconds,
        records,
    )


def _finish_catalogue(
    catalog: Path,
    table: str,
    partitions: list[tuple[int, int, int]],
    histogram: np.ndarray,
    settings: HatsSettings,
) -> int:
    """hats' metadata files for the partition files in place: partition info, Parquet
    ``_metadata``/``_common_metadata``, skymaps and ``properties``; returns the row count."""
    from hats.catalog import PartitionInfo, TableProperties
    from hats.io import paths
    from hats.io.file_io import write_fits_image
    from hats.io.parquet_metadata import write_parquet_metadata
    from hats.io.skymap import write_skymap
    from hats.io.validation import is_valid_catalog
    from hats.pixel_math.healpix_pixel import HealpixPixel

    expected = sum(n for _, _, n in partitions)
    (catalog / "dataset").mkdir(parents=True, exist_ok=True)
    info = PartitionInfo.from_healpix([HealpixPixel(o, p) for o, p, _ in partitions])
    info.write_to_file(paths.get_partition_info_pointer(catalog))
    rows = int(write_parquet_metadata(catalog)) if partitions else 0
    if rows != expected:
        raise ValueError(f"{table}: the partition files hold {rows} rows, the plan {expected}")
    write_fits_image(histogram, paths.get_point_map_file_pointer(catalog))
    write_skymap(histogram=histogram, catalog_dir=catalog)
    TableProperties(
        catalog_name=table,
        catalog_type="object",
        total_rows=rows,
        ra_column="ra",
        dec_column="dec",
        hats_col_healpix=SPATIAL_INDEX,
        hats_col_healpix_order=SPATIAL_ORDER,
        hats_max_rows=settings.pixel_threshold,
        hats_order=info.get_highest_order() if partitions else settings.lowest_order,
        moc_sky_fraction=f"{info.calculate_fractional_coverage():0.5f}" if partitions else "0",
        hats_skymap_order=settings.highest_order,
        hats_builder="gaia-flows (Spark tasks) with hats",
    ).to_properties_file(catalog)
    if partitions and not is_valid_catalog(catalog):
        raise ValueError(f"{catalog} is not a valid HATS catalogue after writing")
    return rows


def _margin_and_collection(collection: Path, table: str, settings: HatsSettings) -> int:
    """hats-import's margin cache of the catalogue and the collection's properties; returns the
    margin's row count."""
    from dask.distributed import Client
    from hats import read_hats
    from hats_import.collection.arguments import CollectionArguments
    from hats_import.pipeline import pipeline_with_client

    # resume=True keeps what is already in the collection folder: the catalogue written above.
    args = (
        CollectionArguments(
            output_artifact_name=collection.name,
            output_path=collection.parent,
            tmp_dir=collection.parent / "tmp",
            progress_bar=False,
        )
        .catalog(catalog_path=collection / table)
        .add_margin(margin_threshold=settings.margin_arcsec, is_default=True)
    )
    with Client(
        n_workers=1,
        threads_per_worker=max(1, os.cpu_count() or 1),
        processes=False,
        dashboard_address="127.0.0.1:0",
    ) as client:  # its HTTP server on loopback only
        pipeline_with_client(args, client)
    margin = read_hats(collection).default_margin_catalog_dir
    return int(read_hats(margin).catalog_info.total_rows)
