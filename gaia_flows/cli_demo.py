"""``gaia-flows demo``: the README's first command, as a short report instead of a log flood.

It fills the landing folder with a synthetic catalogue (if empty) and materialises the whole
graph through the same ``dagster asset materialize`` a user would type, so the demo exercises
the real CLI, instance and storage. While each run works, the run's events are read from the
instance (:mod:`gaia_flows.run_report`): a line per finished step, a progress bar over the sky
regions, then a table per asset. The full Dagster log goes to a file under the state folder
(``--verbose`` also streams it to the terminal).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path
from typing import IO

from dagster import DagsterInstance
from dagster._core.storage.dagster_run import RunsFilter
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from gaia_flows.cli import ALL_REGIONS, dagster_cli, dagster_env, open_instance
from gaia_flows.layout import REPO_ROOT, SOURCE_TABLE, StateLayout, landing_files
from gaia_flows.partitions import sky_regions
from gaia_flows.run_report import AssetProgress, RunReport, read_new_events

POLL_SECONDS = 0.5


@dataclass(frozen=True)
class Step:
    """One Dagster run: a comma-separated asset selection, over a range of regions
    (``first...last``) or unpartitioned."""

    selection: str
    partition_range: str | None = None

    def command(self) -> list[str]:
        command = [
            dagster_cli(),
            "asset",
            "materialize",
            "-m",
            "gaia_flows.definitions",
            "--select",
            self.selection,
        ]
        return command + (["--partition-range", self.partition_range] if self.partition_range else [])


# Each step is one Dagster run and so one Spark application; partitioned steps cover every
# region in a single run (single-run backfill policy), not 48 cold starts.
DEMO_STEPS = [
    Step("gaia_source,pm_stats", ALL_REGIONS),
    Step("proper_motion_maps,astrometric_training_set,astrometric_classifier,hats_catalogue"),
    Step("classified_sources", ALL_REGIONS),
]


class StepFailed(RuntimeError):
    def __init__(self, report: RunReport | None, log_path: Path, message: str):
        super().__init__(message)
        self.report = report
        self.log_path = log_path


def _copy_lines(source: IO[bytes], log: IO[bytes], echo: bool) -> None:
    for line in iter(source.readline, b""):
        log.write(line)
        log.flush()
        if echo:
            sys.stdout.buffer.write(line)
            sys.stdout.buffer.flush()


def _new_run_id(instance: DagsterInstance, known: set[str], since: float) -> str | None:
    from datetime import datetime

    runs = instance.get_runs(filters=RunsFilter(created_after=datetime.fromtimestamp(since - 5, UTC)))
    fresh = [run.run_id for run in runs if run.run_id not in known]
    return fresh[0] if fresh else None


def run_step(
    instance: DagsterInstance,
    layout: StateLayout,
    step: Step,
    log_path: Path,
    console: Console,
    verbose: bool = False,
) -> RunReport:
    """Run one step through the ``dagster`` CLI and report it from its events.

    The CLI's output goes to ``log_path`` (and to the terminal with ``verbose``); the bar and
    the step lines come from the run's event records. Raises :class:`StepFailed` when the run
    fails or the CLI stops before a run exists (a definitions error, for instance).
    """
    known = {run.run_id for run in instance.get_runs()}
    started = time.time()
    regions = len(sky_regions.get_partition_keys())
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(step.command())}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            step.command(),
            cwd=REPO_ROOT,
            env=dagster_env(layout),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        copier = threading.Thread(target=_copy_lines, args=(proc.stdout, log, verbose), daemon=True)
        copier.start()
        report, cursor, bars = None, None, {}
        progress = Progress(
            TextColumn("  {task.description:<26}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("regions  {task.fields[rows]:>12,} rows"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=console,
            disable=verbose or not console.is_terminal,
            transient=True,
        )
        with progress:
            while True:
                exited = proc.poll() is not None
                if report is None:
                    run_id = _new_run_id(instance, known, started)
                    report = RunReport(run_id, frozenset(step.selection.split(","))) if run_id else None
                if report is not None:
                    events, cursor = read_new_events(instance, report, cursor)
                    for kind, asset in events:
                        _show(kind, asset, report, progress, bars, regions, console, verbose)
                if exited:
                    break
                time.sleep(POLL_SECONDS)
        copier.join(timeout=10)
    if report is None:
        raise StepFailed(
            None,
            log_path,
            f"`{' '.join(step.command()[1:])}` stopped (exit code {proc.returncode}) before starting a run",
        )
    if proc.returncode != 0 or report.status != "SUCCESS":
        raise StepFailed(
            report, log_path, report.run_failure or f"the run ended with exit code {proc.returncode}"
        )
    return report


def _show(
    kind: str,
    asset: AssetProgress | None,
    report: RunReport,
    progress: Progress,
    bars: dict,
    regions: int,
    console: Console,
    verbose: bool,
) -> None:
    if asset is None:
        return
    if kind == "ASSET_MATERIALIZATION" and asset.regions:
        if asset.name not in bars:
            bars[asset.name] = progress.add_task(asset.name, total=regions, rows=0)
        progress.update(bars[asset.name], completed=len(asset.regions), rows=asset.rows_in)
    elif kind == "STEP_SUCCESS" and not verbose:
        if asset.name in bars:
            progress.remove_task(bars.pop(asset.name))
        console.print(
            f"  [green]✓[/] {asset.name:<24} {_scope(asset)} {asset.rows_in:>11,} rows {asset.wall_seconds or 0:6.1f} s",
            highlight=False,
        )
    elif kind == "STEP_FAILURE" and not verbose:
        console.print(
            f"  [red]✗[/] {asset.name:<24} failed after {asset.wall_seconds or 0:.1f} s", highlight=False
        )


def _scope(asset: AssetProgress) -> str:
    return f"{len(asset.regions):>2} regions" if asset.regions else "   all-sky"


def summary_table(reports: list[RunReport]) -> Table:
    table = Table(title="What ran", title_justify="left")
    for column in ("asset", "regions", "rows in", "accepted", "quarantined", "wall time"):
        table.add_column(column, justify="left" if column == "asset" else "right")
    for report in reports:
        for asset in report.assets.values():
            table.add_row(
                asset.name,
                str(len(asset.regions)) if asset.regions else "—",
                f"{asset.rows_in:,}",
                "—" if asset.accepted is None else f"{asset.accepted:,}",
                "—" if asset.quarantined is None else f"{asset.quarantined:,}",
                "—" if asset.wall_seconds is None else f"{asset.wall_seconds:.1f} s",
            )
    return table


def failure_text(error: StepFailed) -> str:
    """The failing asset, its regions and the message in plain words, then where the log is."""
    lines = []
    failed = error.report.failed if error.report else []
    for asset in failed:
        where = (
            f" in region{'s' if len(asset.failed_regions) > 1 else ''} {', '.join(asset.failed_regions)}"
            if asset.failed_regions
            else ""
        )
        lines.append(f"{asset.name} failed{where}:\n  {asset.failure}")
    if error.report:
        lines += [
            f"check {name} failed:\n  {message}" for name, message in error.report.failed_checks.items()
        ]
    if not failed and not (error.report and error.report.failed_checks):
        lines.append(str(error))
    lines.append(f"Full Dagster log: {error.log_path}")
    return "\n".join(lines)


def cmd_demo(args: argparse.Namespace) -> int:
    from gaia_flows.contracts import load_contract
    from gaia_flows.science.synthetic import generate

    console = Console()
    layout = StateLayout.from_env().ensure()
    log_path = layout.logs / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not landing_files(layout.landing):
        console.print(
            f"Generating a synthetic catalogue of {args.stars:,} stars (seed {args.seed}) into {layout.landing}",
            highlight=False,
        )
        generate(
            stars=args.stars, seed=args.seed, out=layout.landing, contract=load_contract()
        )  # its bar switches itself off off-terminal
    else:
        console.print(f"Using the Gaia files already in {layout.landing}", highlight=False)
    instance = open_instance(layout)
    reports = []
    try:
        for step in DEMO_STEPS:
            console.print(
                f"[bold]{step.selection.replace(',', ', ')}[/]"
                + (f" over {step.partition_range}" if step.partition_range else ""),
                highlight=False,
            )
            reports.append(run_step(instance, layout, step, log_path, console, args.verbose))
    except StepFailed as error:
        console.print(f"[red]Demo stopped.[/] {failure_text(error)}", highlight=False)
        return 1
    minutes = (time.perf_counter() - started) / 60
    console.print(summary_table(reports))
    console.print(
        f"Done in {minutes:.1f} min. Everything is under {layout.home}:\n"
        f"  catalogue   {layout.table(SOURCE_TABLE)}  (quarantine: {layout.quarantine})\n"
        f"  warehouse   {layout.warehouse}\n"
        f"  HATS        {layout.hats_collection(SOURCE_TABLE)}  (lsdb.open_catalog)\n"
        f"  sky maps    {layout.maps}\n"
        f"  MLflow      {layout.mlflow_tracking_uri}\n"
        f"  Dagster log {log_path}\n"
        f"Open the Dagster UI:   .venv/bin/gaia-flows ui      (http://127.0.0.1:3000)\n"
        f"Open the MLflow UI:    .venv/bin/gaia-flows mlflow  (http://127.0.0.1:5000)\n"
        f"What is stale:         .venv/bin/gaia-flows status\n"
        f"Re-plot instantly:     .venv/bin/gaia-flows map --level 6 --quantity pmra --out pmra.png",
        highlight=False,
    )
    return 0
