"""Ingestion throughput: synthetic DR3 files -> validated, region-partitioned ``gaia_source``.

For each catalogue size, in one process and on the same files:
  generate  the synthetic bulk files (the generator's own speed: issue target 10M < 5 min)
  ours      ``ingest_regions`` over all 48 regions in one Spark application (what the
            ``gaia_source`` backfill runs): contract checks, quarantine, dedup, sort, publish
  duckdb    the baseline: DuckDB converting the same gzip CSVs to one Parquet file, with no
            validation, no partitioning and no sort -- the floor of "just read and rewrite"

It prints rows/s, input MB/s (compressed bytes), the ratio ours/duckdb, and peak RSS of the
Python driver and of the Spark JVM (sampled), so "time grows linearly, driver memory stays
flat" can be read off the table.

    .venv/bin/python benchmarks/ingest.py --stars 1000000 10000000
"""

import argparse
import gzip
import itertools
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb

from gaia_flows import spark as spark_factory
from gaia_flows.contracts import load_contract
from gaia_flows.engine.ingest import ingest_regions
from gaia_flows.layout import SOURCE_TABLE, StateLayout, landing_files
from gaia_flows.profiles import load_profile
from gaia_flows.science.healpix import region_keys
from measure import PeakRss, work_folder


def _header_lines(path: Path) -> int:
    """ECSV header lines before the CSV header: DuckDB's ``comment`` option does not skip them
    reliably (it took data rows for column names), so the baseline skips them by count."""
    with gzip.open(path, "rt") as fh:
        return sum(1 for _ in itertools.takewhile(lambda line: line.startswith("#"), fh))


def duckdb_baseline(files: list[Path], out: Path) -> tuple[float, int]:
    started = time.perf_counter()
    by_skip: dict[int, list[str]] = {}
    for f in files:
        by_skip.setdefault(_header_lines(f), []).append(f"'{f}'")
    selects = " UNION ALL BY NAME ".join(
        f"SELECT * FROM read_csv([{', '.join(group)}], skip={skip}, header=true, nullstr=['null', '', 'nan'])" for skip, group in by_skip.items()
    )
    # DuckDB spills to ./.tmp by default; keep its scratch in the benchmark's work folder.
    con = duckdb.connect(config={"temp_directory": str(out.parent / "duckdb-tmp")})
    con.execute(f"COPY ({selects}) TO '{out}' (FORMAT parquet, COMPRESSION zstd)")
    seconds = time.perf_counter() - started
    rows = con.execute(f"SELECT count(*) FROM '{out}'").fetchone()[0]
    con.close()
    return seconds, rows


def generate_files(stars: int, seed: int, landing: Path) -> tuple[float, list[Path]]:
    """``gaia-flows generate`` in its own process: its arrays must not count as driver memory."""
    command = [str(Path(sys.executable).with_name("gaia-flows")), "generate", "--stars", str(stars), "--seed", str(seed), "--out", str(landing)]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started, landing_files(landing)


def run_size(stars: int, work: Path, spark, seed: int) -> dict:
    home = work / f"stars-{stars}"
    layout = StateLayout.from_env(home=home, landing=home / "landing").ensure()
    generate_seconds, files = generate_files(stars, seed, layout.landing)
    in_bytes = sum(f.stat().st_size for f in files)
    with PeakRss() as rss:
        report = ingest_regions(spark, layout, region_keys(), load_contract(SOURCE_TABLE), 128 << 20)
    assert not report.failures, report.failures
    accepted = sum(r.accepted for r in report.regions.values())
    rejected = sum(r.rejected for r in report.regions.values())
    assert accepted + rejected == report.rows_read
    duck, duck_rows = duckdb_baseline(files, work / f"duckdb-{stars}.parquet")
    assert duck_rows == report.rows_read, f"baseline read {duck_rows:,} rows, ours {report.rows_read:,}"
    shutil.rmtree(home)
    return {
        "stars": stars,
        "generate_s": generate_seconds,
        "ingest_s": report.seconds,
        "rows": report.rows_read,
        "accepted": accepted,
        "rejected": rejected,
        "mb": in_bytes / 1e6,
        "duckdb_s": duck,
        "py_rss_mb": rss.python / 1e6,
        "py_rss_start_mb": rss.python_start / 1e6,
        "jvm_rss_mb": rss.jvm / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stars", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = work_folder(args.work, "gaia-bench-ingest-")

    profile = load_profile("local")
    started = time.perf_counter()
    spark = spark_factory.session(profile.spark_master, {**profile.spark_conf, "spark.local.dir": str(work / "spark")})
    cores = spark.sparkContext.defaultParallelism
    print(f"Spark {spark.version} {profile.spark_master} ({cores} cores) started in {time.perf_counter() - started:.1f} s")

    header = f"{'stars':>11} {'gen s':>7} {'ingest s':>9} {'rows/s':>9} {'MB/s':>6} {'duckdb s':>9} {'ours/duckdb':>11} {'py RSS MB start->peak':>21} {'JVM RSS MB':>10} {'rejected':>9}"
    print(header)
    results = []
    for stars in args.stars:
        r = run_size(stars, work, spark, args.seed)
        results.append(r)
        rss = f"{r['py_rss_start_mb']:.0f}->{r['py_rss_mb']:.0f}"
        print(
            f"{r['stars']:>11,} {r['generate_s']:>7.1f} {r['ingest_s']:>9.1f} {r['rows'] / r['ingest_s']:>9,.0f} {r['mb'] / r['ingest_s']:>6.1f}"
            f" {r['duckdb_s']:>9.1f} {r['ingest_s'] / r['duckdb_s']:>11.2f} {rss:>21} {r['jvm_rss_mb']:>10.0f} {r['rejected']:>9,}",
            flush=True,
        )
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(
            f"scaling {first['stars']:,} -> {last['stars']:,} stars (x{last['stars'] / first['stars']:.0f}): ingest time x{last['ingest_s'] / first['ingest_s']:.1f},"
            f" driver (Python) peak RSS x{last['py_rss_mb'] / first['py_rss_mb']:.2f}"
        )
    spark_factory.stop_active()


if __name__ == "__main__":
    main()
