"""HATS export benchmark: Spark tasks (``hats_catalogue``'s engine) vs hats-import's Dask pipeline.

    .venv/bin/python benchmarks/hats_export.py --stars 1000000

On the same published ``gaia_source``:

1. hats-import's own pipeline (``CollectionArguments``: catalogue import from the region
   Parquet files + the margin cache, on a local Dask cluster of as many single-threaded
   worker processes as cores), the baseline;
2. ``gaia_flows.engine.hats_export.export`` from scratch (Spark tasks write the partitions,
   hats writes the metadata, hats-import the margin), with its steps timed;
3. the same export after one region of ``gaia_source`` was republished (the refresh a region
   rerun triggers): only that region's partitions are rewritten.

Printed: seconds of each, ratios against (1), and the partitions and rows of both outputs
(they must agree: same threshold and orders). Nothing is asserted.
"""

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from measure import work_folder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the synthetic-catalogue publisher the tests use


def hats_import_pipeline(files: list[str], out: Path, settings, cores: int) -> float:
    from dask.distributed import Client
    from hats_import.collection.arguments import CollectionArguments
    from hats_import.pipeline import pipeline_with_client

    args = (
        CollectionArguments(
            output_artifact_name="gaia_source", output_path=out, tmp_dir=out / "tmp", progress_bar=False
        )
        .catalog(
            input_file_list=files,
            file_reader="parquet",
            ra_column="ra",
            dec_column="dec",
            pixel_threshold=settings.pixel_threshold,
            highest_healpix_order=settings.highest_order,
            lowest_healpix_order=settings.lowest_order,
            output_artifact_name="gaia_source",
        )
        .add_margin(margin_threshold=settings.margin_arcsec, is_default=True)
    )
    started = time.perf_counter()
    with Client(
        n_workers=cores, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0"
    ) as client:
        pipeline_with_client(args, client)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stars", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--pixel-threshold",
        type=int,
        default=20_000,
        help="rows per partition (small, so 1M stars make many partitions)",
    )
    parser.add_argument("--home", help="state folder to keep (default: a temporary one, removed at exit)")
    args = parser.parse_args()
    home = work_folder(Path(args.home) if args.home else None, "gaia-bench-hats-")
    os.environ["GAIA_FLOWS_HOME"] = str(home / "state")

    import pyarrow.parquet as pq
    from hats import read_hats
    from support.astrometric_data import publish_synthetic

    from gaia_flows import spark as spark_factory
    from gaia_flows.engine.hats_export import HatsSettings, export
    from gaia_flows.layout import SOURCE_TABLE, StateLayout
    from gaia_flows.warehouse import footer_rows, write_region_arrow

    layout = StateLayout.from_env().ensure()
    if not layout.table("gaia_source").exists():
        publish_synthetic(layout, args.stars, args.seed, files=16)
    files = [str(p) for p in sorted(layout.table("gaia_source").glob("hpx*/*.parquet"))]
    cores = os.cpu_count() or 1
    settings = HatsSettings(pixel_threshold=args.pixel_threshold)
    print(
        f'{footer_rows(files):,} rows in {len(files)} files; threshold {settings.pixel_threshold:,}, orders {settings.lowest_order}-{settings.highest_order}, margin {settings.margin_arcsec}"; {cores} cores'
    )

    dask_out = home / "hats-import"
    shutil.rmtree(dask_out, ignore_errors=True)
    dask_seconds = hats_import_pipeline(files, dask_out, settings, cores)
    dask_catalogue = read_hats(dask_out / "gaia_source" / "gaia_source")

    session = spark_factory.session(f"local[{cores}]", {"spark.ui.enabled": "false"})
    session.range(1).count()  # the JVM start is not the export's
    shutil.rmtree(layout.hats, ignore_errors=True)
    full = export(session, layout, SOURCE_TABLE, layout.region_versions(SOURCE_TABLE), settings)

    region = "hpx1-05"
    table = pq.read_table(layout.region_dir("gaia_source", region))
    write_region_arrow(table, layout, "gaia_source", region)  # same rows, a new version: a rerun
    refresh = export(session, layout, SOURCE_TABLE, layout.region_versions(SOURCE_TABLE), settings)

    print(
        f"\n(1) hats-import (Dask, {cores} workers), catalogue + margin: {dask_seconds:8.1f} s  {dask_catalogue.catalog_info.total_rows:,} rows, {len(dask_catalogue.get_healpix_pixels())} partitions"
    )
    steps = ", ".join(f"{k} {v:.1f}" for k, v in full.seconds.items() if k != "total")
    print(
        f"(2) Spark tasks + hats metadata + hats-import margin, from scratch: {full.seconds['total']:8.1f} s  {full.rows:,} rows, {full.partitions} partitions ({steps})  (2)/(1) = {full.seconds['total'] / dask_seconds:.2f}"
    )
    steps = ", ".join(f"{k} {v:.1f}" for k, v in refresh.seconds.items() if k != "total")
    print(
        f"(3) refresh after {region} was republished: {refresh.seconds['total']:8.1f} s  {refresh.partitions_written} partitions written, {refresh.partitions_linked} linked ({steps})  (3)/(1) = {refresh.seconds['total'] / dask_seconds:.2f}"
    )
    spark_factory.stop_active()


if __name__ == "__main__":
    main()
