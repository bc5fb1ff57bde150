"""The whole pipeline at growing catalogue sizes: does each stage scale linearly?

    .venv/bin/python benchmarks/scale.py --stars 1000000 10000000 [--work DIR] [--json OUT] [--plot PNG]

For each size, in a fresh folder, the stages run in order as a deployment runs them:

  generate     ``gaia-flows generate`` (its own process, so its arrays are not the driver's)
  ingest       ``gaia_source`` over all 48 regions in one run (the Spark application's start
               included: it is the first stage of each size to use Spark)
  pm_stats     ``pm_stats`` over all 48 regions in one run
  maps         ``proper_motion_maps``
  training     ``astrometric_training_set``
  classifier   ``astrometric_classifier`` (tracked in the state folder's MLflow store)
  classify     ``classified_sources`` over all 48 regions in one run

Each asset stage is Dagster's ``materialize`` in this process on the assets of
``gaia_flows.definitions`` and the resources of profile ``local`` (Spark ``local[*]``), its
checks included, on one in-memory instance per size. Per stage it reports wall time, catalogue
stars per second per core (the same numerator for every stage, so rates compare across stages
and sizes), the CPU seconds of this process and all its descendants (JVM, Spark's Python
workers, the generator) and stars per CPU second, the peak RSS of the driver (this process) and
of the Spark JVM while the stage ran, and the disk the state folder and landing area use once
the stage is done. Wall rates are what a dedicated machine shows; CPU rates are what other work
on a shared machine does not disturb, so both are printed. Nothing is asserted: the goals (time
linear within 15 % a decade, flat driver memory, per-core rates at 100M within 20 % of 10M) are
read off the table.

Without ``--work`` each size's folders are removed once the size is measured (100M stars take
35 GiB at their peak), and a size that the free disk cannot hold (``DISK_PER_STAR``, the 1M
figure and the largest per star, with a margin) is refused before it starts.

``--project-workers N --cores-per-worker C`` adds, for the largest size, a projection of the
full DR3 catalogue (1,811,709,771 sources) on N x C cores from the measured per-core rates:
a projection, not a measurement. The last lines are machine-readable
(``scale stars=<n> stage=<name> seconds=<s> rows_per_core=<r> cpu_s=<s> rows_per_cpu_s=<r>
driver_mb=<m> jvm_mb=<m> disk_mb=<m>``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from measure import PeakRss, work_folder

DR3_SOURCES = 1_811_709_771
DISK_PER_STAR = 520  # bytes of landing files, tables, maps and scores per star, measured at 1M
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}  # the table, not the event log
SEED = 42
ASSET_STAGES = [
    ("ingest", "gaia_source", True),
    ("pm_stats", "pm_stats", True),
    ("maps", "proper_motion_maps", False),
    ("training", "astrometric_training_set", False),
    ("classifier", "astrometric_classifier", False),
    ("classify", "classified_sources", True),
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stars", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument(
        "--work", type=Path, help="keep each size's folders here (default: a temporary folder)"
    )
    parser.add_argument("--json", type=Path, help="write every stage's figures here as JSON")
    parser.add_argument("--plot", type=Path, help="draw time and per-core rate against size into this PNG")
    parser.add_argument(
        "--from-log",
        type=Path,
        help="measure nothing: read the table rows an earlier (perhaps interrupted) run printed, then "
        "print the scaling, the projection and the plot from them",
    )
    parser.add_argument("--project-workers", type=int, default=0)
    parser.add_argument("--cores-per-worker", type=int, default=26)
    return parser.parse_args()


def disk_bytes(*folders: Path) -> int:
    """Bytes of the regular files below ``folders`` (links counted once, not followed)."""
    seen, total = set(), 0
    for folder in folders:
        for root, _, files in os.walk(folder):
            for name in files:
                info = os.lstat(os.path.join(root, name))
                if info.st_ino not in seen and not os.path.islink(os.path.join(root, name)):
                    seen.add(info.st_ino)
                    total += info.st_size
    return total


def generate(stars: int, landing: Path) -> None:
    command = [
        str(Path(sys.executable).with_name("gaia-flows")),
        "generate",
        "--stars",
        str(stars),
        "--seed",
        str(SEED),
        "--out",
        str(landing),
    ]
    subprocess.run(command, check=True, capture_output=True)


def run_size(stars: int, folder: Path, cores: int) -> list[dict]:
    """Every stage once at ``stars``, in ``folder``; one dict of figures per stage."""
    home, landing = folder / "home", folder / "landing"
    rows: list[dict] = []

    def record(stage: str, seconds: float, peak: PeakRss, driver: bool = True) -> None:
        rows.append(
            {
                "stars": stars,
                "stage": stage,
                "seconds": round(seconds, 2),
                "rows_per_core": round(stars / seconds / cores),
                "cpu_s": round(peak.cpu_seconds, 1),
                "rows_per_cpu_s": round(stars / max(peak.cpu_seconds, 1e-3)),
                "driver_mb": round(peak.python / 2**20) if driver else None,
                "jvm_mb": round(peak.jvm / 2**20) if driver else None,
                "disk_mb": round(disk_bytes(home, landing) / 2**20, 1),
                "load": round(os.getloadavg()[0], 1),
            }
        )
        print(format_row(rows[-1]), flush=True)

    with PeakRss() as peak:
        started = time.perf_counter()
        generate(stars, landing)
        seconds = time.perf_counter() - started
    record("generate", seconds, peak, driver=False)  # the generator is its own process

    # The definitions read the state folder and landing area from the environment when loaded.
    os.environ["GAIA_FLOWS_HOME"] = str(home)
    os.environ["GAIA_FLOWS_LANDING"] = str(landing)
    os.environ["GAIA_FLOWS_PROFILE"] = "local"
    from dagster import AssetKey, AssetSelection, DagsterInstance, materialize

    from gaia_flows.definitions import defs
    from gaia_flows.resources import build_resources
    from gaia_flows.science.healpix import region_keys
    from gaia_flows.spark import stop_active

    regions = region_keys()
    all_regions = {
        "dagster/asset_partition_range_start": regions[0],
        "dagster/asset_partition_range_end": regions[-1],
    }
    graph = [*defs.assets, *defs.asset_checks]
    resources = build_resources()  # this size's folders, not those of the first size loaded
    with DagsterInstance.ephemeral() as instance:
        for stage, asset, partitioned in ASSET_STAGES:
            with PeakRss() as peak:
                started = time.perf_counter()
                result = materialize(
                    graph,
                    selection=AssetSelection.assets(AssetKey(asset)),
                    resources=resources,
                    instance=instance,
                    tags=all_regions if partitioned else None,
                    raise_on_error=False,
                    run_config=QUIET,
                )
                seconds = time.perf_counter() - started
            if not result.success:
                raise SystemExit(f"{stage} ({asset}) failed at {stars:,} stars; state kept in {folder}")
            record(stage, seconds, peak)
    # The session's temporary and local folders live in this size's state folder: the next size
    # starts its own (and its ingest stage pays for Spark's start, as this one's did).
    stop_active()
    return rows


def format_row(row: dict) -> str:
    def mb(value):
        return "-" if value is None else f"{value:,}"

    return (
        f"| {row['stars']:>11,} | {row['stage']:<10} | {row['seconds']:>9.1f} | {row['rows_per_core']:>11,} "
        f"| {row['cpu_s']:>8.1f} | {row['rows_per_cpu_s']:>11,} "
        f"| {mb(row['driver_mb']):>9} | {mb(row['jvm_mb']):>7} | {row['disk_mb']:>9,.1f} | {row['load']:>4} |"
    )


def print_scaling(rows: list[dict]) -> None:
    """Per stage, the time ratio and the per-core rate ratio between consecutive sizes."""
    sizes = sorted({r["stars"] for r in rows})
    if len(sizes) < 2:
        return
    print("\n| stage | sizes | time ratio / size ratio | wall rate ratio | CPU rate ratio |")
    print("|---|---|---|---|---|")
    by = {(r["stars"], r["stage"]): r for r in rows}
    for stage in dict.fromkeys(r["stage"] for r in rows):
        for small, large in zip(sizes, sizes[1:]):
            a, b = by.get((small, stage)), by.get((large, stage))
            if a and b:
                linear = (b["seconds"] / a["seconds"]) / (large / small)
                rate = b["rows_per_core"] / a["rows_per_core"]
                cpu_rate = b["rows_per_cpu_s"] / a["rows_per_cpu_s"]
                print(f"| {stage} | {small:,} -> {large:,} | {linear:.2f} | {rate:.2f} | {cpu_rate:.2f} |")


def print_projection(rows: list[dict], workers: int, cores_per_worker: int) -> None:
    """Each stage at the per-core rate of its largest measured size (a stage an interrupted run
    did not reach at the largest size is projected from the next one, and says so)."""
    cores = workers * cores_per_worker
    print(
        f"\nProjection (not a measurement): full DR3, {DR3_SOURCES:,} sources, on {workers} x "
        f"{cores_per_worker} = {cores} cores, from each stage's per-core rate at its largest measured "
        "size, assuming the rates hold at that scale and across nodes."
    )
    print("| stage | from stars | projected s | seed platform (6 x 26 vCPU), measured |")
    print("|---|---|---|---|")
    seed = {"pm_stats": "mean proper motion: 120 s", "classifier": "Random Forest: 650 s"}
    largest: dict[str, dict] = {}
    for row in rows:
        if row["stage"] != "generate" and row["stars"] >= largest.get(row["stage"], {}).get("stars", 0):
            largest[row["stage"]] = row
    for stage, row in largest.items():
        projected = DR3_SOURCES / (row["rows_per_core"] * cores)
        print(f"| {stage} | {row['stars']:,} | {projected:,.0f} | {seed.get(stage, '')} |")


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_ax, rate_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    for stage in dict.fromkeys(r["stage"] for r in rows):
        points = sorted(
            (r["stars"], r["seconds"], r["rows_per_core"], r["rows_per_cpu_s"])
            for r in rows
            if r["stage"] == stage
        )
        stars = [p[0] for p in points]
        (line,) = time_ax.plot(stars, [p[1] for p in points], marker="o", label=stage)
        rate_ax.plot(stars, [p[2] for p in points], marker="o", color=line.get_color(), label=stage)
        rate_ax.plot(stars, [p[3] for p in points], marker="x", ls=":", color=line.get_color())
    time_ax.set(xscale="log", yscale="log", xlabel="stars", ylabel="wall time (s)", title="time per stage")
    rate_ax.set(
        xscale="log",
        yscale="log",
        xlabel="stars",
        ylabel="stars / s",
        title="per core of wall time (solid), per CPU second (dotted)",
    )
    rate_ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


COLUMNS = (
    "stars",
    "stage",
    "seconds",
    "rows_per_core",
    "cpu_s",
    "rows_per_cpu_s",
    "driver_mb",
    "jvm_mb",
    "disk_mb",
    "load",
)


def read_rows(log: Path) -> list[dict]:
    """The rows :func:`format_row` printed to ``log``: a 100M-star run takes hours, and what it
    measured before it stopped is still worth reading."""
    rows = []
    for line in log.read_text().splitlines():
        cells = [c.strip().replace(",", "") for c in line.strip().strip("|").split("|")]
        if len(cells) != len(COLUMNS) or not cells[0].isdigit():
            continue
        row: dict = dict(zip(COLUMNS, cells))
        for name in COLUMNS:
            if name != "stage":
                row[name] = None if row[name] == "-" else float(row[name])
        row["stars"] = int(row["stars"])
        rows.append(row)
    return rows


def report(rows: list[dict], args: argparse.Namespace) -> None:
    print_scaling(rows)
    if args.project_workers:
        print_projection(rows, args.project_workers, args.cores_per_worker)
    if args.plot:
        plot(rows, args.plot)


def main() -> int:
    args = parse_args()
    if args.from_log:
        report(read_rows(args.from_log), args)
        return 0
    cores = os.cpu_count() or 1
    work = work_folder(args.work, "scale-bench-")
    print(f"cores: {cores}; load average at start: {os.getloadavg()}")
    print(
        "|       stars | stage      | wall (s)  | stars/s/core | CPU s    | stars/CPU s "
        "| driver MB | JVM MB  | disk MB after | load |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows: list[dict] = []
    for stars in args.stars:
        folder = work / f"stars-{stars}"
        if args.work is None:
            needed, free = stars * DISK_PER_STAR * 1.1, shutil.disk_usage(work).free
            if needed > free:
                raise SystemExit(
                    f"{stars:,} stars need about {needed / 2**30:.0f} GiB; {free / 2**30:.0f} GiB free"
                )
        rows += run_size(stars, folder, cores)
        if args.work is None:
            shutil.rmtree(folder)
    report(rows, args)
    if args.json:
        args.json.write_text(
            json.dumps({"cores": cores, "command": sys.argv, "stages": rows}, indent=2) + "\n"
        )
    for row in rows:
        print("scale " + " ".join(f"{k}={v}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
