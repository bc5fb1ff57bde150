"""Ingestion throughput against the parsing floor: synthetic DR3 files -> ``gaia_source``.

For each catalogue size, in one process and on the same files:
  floor     one core, no Spark: gunzip, pyarrow's CSV reader (nulls as "" and "null", types
            inferred), a zstd Parquet write per file -- what reading and rewriting costs
  ours      ``ingest_regions`` over all 48 regions in one Spark application (what the
            ``gaia_source`` backfill runs): contract checks, quarantine, de-duplication,
            partitioning, sorting and publishing included
Before them, ``fixed``: the same backfill of a tiny catalogue (same 96 files, same 48 regions,
almost no rows) on the fresh Spark application -- the run's cost that does not grow with rows
(Python workers' start, tasks, headers, 48 publishes) -- then once more on the warm
application, which is what the sizes after it pay: their per-row time is (seconds - warm
fixed) / rows, and linear scaling keeps it constant. Spark's own start is printed apart.

It prints rows/s per core for both and their ratio, and peak RSS of the Python driver and of
the Spark JVM (sampled), so "time grows linearly, driver memory stays flat" can be read off
the table. ``--profile`` adds where the time goes: the driver's side of a run (cProfile of
``ingest_regions``) and one core doing every task's work in process (cProfile of the tasks).
The last line is machine-readable, for the largest size:
``ingest stars=<n> rows_per_core=<n> floor_rows_per_core=<n> ratio=<r> fixed_s=<s>``.

    .venv/bin/python benchmarks/ingest.py --stars 1000000 3000000 10000000 [--landing-cache /tmp/x]

With three sizes or more it also fits a line (seconds = fixed + per-row x rows) and prints
how far the worst size lies from it: linear scaling keeps that small.
"""

import argparse
import cProfile
import pstats
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from measure import PeakRss, work_folder

from gaia_flows import spark as spark_factory
from gaia_flows.contracts import load_contract
from gaia_flows.engine.ingest import IngestTask, file_groups, ingest_regions, region_schema
from gaia_flows.layout import SOURCE_TABLE, StateLayout, landing_files
from gaia_flows.profiles import load_profile
from gaia_flows.science.ecsv import read_file_header
from gaia_flows.science.healpix import parse_region_key, region_keys


def floor(files: list[Path], out: Path) -> tuple[float, int]:
    """Seconds and rows of the single-core floor over ``files`` (headers located beforehand)."""
    skips = {f: read_file_header(f).comment_lines for f in files}
    rows, started = 0, time.perf_counter()
    for f in files:
        table = pcsv.read_csv(
            pa.input_stream(str(f), compression="gzip"),
            read_options=pcsv.ReadOptions(skip_rows=skips[f], use_threads=False),
            convert_options=pcsv.ConvertOptions(null_values=["", "null"]),
        )
        pq.write_table(table, out, compression="zstd")
        rows += table.num_rows
    return time.perf_counter() - started, rows


def landing_for(stars: int, seed: int, cache: Path) -> tuple[float, Path]:
    """``gaia-flows generate`` in its own process (its arrays must not count as driver memory),
    into ``cache/stars-<n>``; an existing complete catalogue there is reused (0 s)."""
    landing = cache / f"stars-{stars}"
    if (landing / "truth").exists() and list(landing.glob("GaiaSource_*.csv.gz")):
        return 0.0, landing
    command = [
        str(Path(sys.executable).with_name("gaia-flows")),
        "generate",
        "--stars",
        str(stars),
        "--seed",
        str(seed),
        "--out",
        str(landing),
    ]
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - started, landing


def ingest(
    spark, landing: Path, home: Path, profile: bool
) -> tuple[object, PeakRss, cProfile.Profile | None]:
    layout = StateLayout.from_env(home=home, landing=landing).ensure()
    profiler = cProfile.Profile() if profile else None
    with PeakRss() as rss:
        if profiler:
            profiler.enable()
        report = ingest_regions(spark, layout, region_keys(), load_contract(SOURCE_TABLE), 128 << 20)
        if profiler:
            profiler.disable()
    assert not report.failures, report.failures
    accepted = sum(r.accepted for r in report.regions.values())
    rejected = sum(r.rejected for r in report.regions.values())
    assert accepted + rejected == report.rows_read
    shutil.rmtree(home)
    return report, rss, profiler


STAGES = {
    # stage: (module or file fragment, function) whose cumulative time it is
    "gunzip + CSV parse + convert": ("engine/ingest.py", "_csv_batches"),
    "contract checks": ("validation.py", "validate_rows"),
    "home regions": ("validation.py", "home_regions"),
    "split, sort, de-duplicate": ("engine/ingest.py", "split_duplicates"),
    "Parquet write (zstd)": ("engine/ingest.py", "_write"),
    "header reads": ("ecsv.py", "read_file_header"),
    "Spark job (tasks, waited for)": ("engine/ingest.py", "_run_tasks"),
    "publish (footers, manifests, renames)": ("engine/ingest.py", "_publish_region"),
}


def stage_seconds(profiler: cProfile.Profile) -> dict[str, float]:
    stats = pstats.Stats(profiler).stats
    seconds = {}
    for stage, (where, name) in STAGES.items():
        found = [
            cum
            for (path, _, func), (_, _, _, cum, _) in stats.items()
            if func == name and path.endswith(where)
        ]
        if found:
            seconds[stage] = sum(found)
    return seconds


def profile_tasks(landing: Path, staging: Path) -> tuple[float, dict[str, float]]:
    """Every task's work on one core, in this process: CPU seconds in all and per stage."""
    contract = load_contract(SOURCE_TABLE)
    files = [str(p) for p in landing_files(landing)]
    headers = {p: read_file_header(p) for p in files}
    schema = region_schema(headers, contract)
    task = IngestTask(contract, schema, frozenset(parse_region_key(k)[1] for k in region_keys()), staging)
    profiler = cProfile.Profile(time.process_time)  # CPU seconds: a busy machine's waits do not count
    started = time.process_time()
    profiler.enable()
    counts: Counter = task(0, file_groups(files), headers)["counts"]
    profiler.disable()
    seconds = time.process_time() - started
    shutil.rmtree(staging)
    assert sum(counts.values()) > 0
    return seconds, stage_seconds(profiler)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stars", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument(
        "--fixed-stars",
        type=int,
        default=10_000,
        help="size of the tiny catalogue that measures the fixed cost",
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument(
        "--landing-cache",
        type=Path,
        default=None,
        help="keep generated catalogues here between runs (default: in --work)",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also print where the time goes (largest size)"
    )
    args = parser.parse_args()
    work = work_folder(args.work, "gaia-bench-ingest-")
    cache = args.landing_cache or work / "landing"

    profile = load_profile("local")
    started = time.perf_counter()
    spark = spark_factory.session(
        profile.spark_master, {**profile.spark_conf, "spark.local.dir": str(work / "spark")}
    )
    cores = spark.sparkContext.defaultParallelism
    print(
        f"Spark {spark.version} {profile.spark_master} ({cores} cores) started in {time.perf_counter() - started:.1f} s"
    )

    _, tiny = landing_for(args.fixed_stars, args.seed, cache)
    fixed_report, _, _ = ingest(spark, tiny, work / "home-fixed", profile=False)
    fixed_s = fixed_report.seconds
    warm_report, _, _ = ingest(spark, tiny, work / "home-fixed-warm", profile=False)
    warm_fixed_s = warm_report.seconds
    print(
        f"fixed cost: {args.fixed_stars:,} stars in {len(landing_files(tiny))} files, 48 regions:"
        f" fresh application {fixed_s:.2f} s (a backfill run's), warm application {warm_fixed_s:.2f} s"
        " (what the runs below pay)"
    )

    print(
        f"{'stars':>11} {'gen s':>6} {'floor s':>8} {'floor r/s/core':>14} {'ingest s':>9} {'r/s/core':>9} {'ratio':>6}"
        f" {'(s-warm)/Mrow':>14} {'py RSS MB start->peak':>21} {'JVM RSS MB':>10} {'rejected':>9}"
    )
    results = []
    for stars in args.stars:
        generate_s, landing = landing_for(stars, args.seed, cache)
        floor_s, floor_rows = floor(landing_files(landing), work / "floor.parquet")
        report, rss, driver_profile = ingest(
            spark, landing, work / f"home-{stars}", profile=args.profile and stars == max(args.stars)
        )
        assert floor_rows == report.rows_read, f"floor read {floor_rows:,} rows, ours {report.rows_read:,}"
        r = {
            "stars": stars,
            "rows": report.rows_read,
            "ingest_s": report.seconds,
            "rows_per_core": report.rows_read / report.seconds / cores,
            "floor_rows_per_core": floor_rows / floor_s,
        }
        r["ratio"] = r["rows_per_core"] / r["floor_rows_per_core"]
        r["per_mrow_s"] = (report.seconds - warm_fixed_s) / report.rows_read * 1e6
        results.append(r)
        rejected = sum(x.rejected for x in report.regions.values())
        print(
            f"{stars:>11,} {generate_s:>6.0f} {floor_s:>8.1f} {r['floor_rows_per_core']:>14,.0f} {report.seconds:>9.1f} {r['rows_per_core']:>9,.0f}"
            f" {r['ratio']:>6.2f} {r['per_mrow_s']:>14.2f} {f'{rss.python_start / 1e6:.0f}->{rss.python / 1e6:.0f}':>21}"
            f" {rss.jvm / 1e6:>10.0f} {rejected:>9,}",
            flush=True,
        )
        if driver_profile:
            print("driver side of the run above (cProfile of ingest_regions), wall seconds:")
            for stage, s in stage_seconds(driver_profile).items():
                print(f"  {stage:<40} {s:8.2f}")
            seconds, stages = profile_tasks(landing, work / "profile-staging")
            print(
                f"every task's work on one core in process: {seconds:.1f} CPU s, {report.rows_read / seconds:,.0f} rows per CPU s; CPU s per stage:"
            )
            for stage, s in stages.items():
                print(f"  {stage:<40} {s:8.2f}  {s / seconds:5.1%}")
        if cache == work / "landing":
            shutil.rmtree(landing)
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(
            f"scaling {first['stars']:,} -> {last['stars']:,} stars (x{last['rows'] / first['rows']:.1f} rows):"
            f" ingest time x{last['ingest_s'] / first['ingest_s']:.2f}; per-row time (less the warm fixed cost)"
            f" x{last['per_mrow_s'] / first['per_mrow_s']:.2f} (linear: 1.00 +- 0.15)"
        )
    if len(results) > 2:
        rows = np.array([r["rows"] for r in results], dtype=float)
        seconds = np.array([r["ingest_s"] for r in results])
        per_row, intercept = np.polyfit(rows, seconds, 1)
        deviation = np.abs(seconds - (intercept + per_row * rows)) / seconds
        print(
            f"least-squares line over {len(results)} sizes: {intercept:.2f} s + {per_row * 1e6:.2f} s per million rows;"
            f" largest deviation of a size from it {deviation.max():.1%}"
        )
    spark_factory.stop_active()
    last = results[-1]
    print(
        f"ingest stars={last['stars']} rows_per_core={last['rows_per_core']:.0f} floor_rows_per_core={last['floor_rows_per_core']:.0f}"
        f" ratio={last['ratio']:.2f} fixed_s={fixed_s:.2f}"
    )


if __name__ == "__main__":
    main()
