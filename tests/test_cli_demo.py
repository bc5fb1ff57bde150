"""``gaia-flows demo``'s report of a run, read from the run's events: per-asset rows and regions,
the full log in a file under the state folder, and a failure in plain words."""

import io

import pytest
from rich.console import Console
from support.gaia_files import region_file_range, stars_in_region, write_gaia_file

from gaia_flows.cli import open_instance
from gaia_flows.cli_demo import Step, StepFailed, failure_text, run_step, summary_table
from gaia_flows.warehouse import read_manifest

pytestmark = pytest.mark.cli


def _land(layout, region: str, n: int, seed: int):
    lo, hi = region_file_range(region)
    return write_gaia_file(layout.landing, lo, hi, stars_in_region(region, n, seed))


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=120), out  # not a terminal: no bar, lines only


def test_step_is_reported_from_its_events_and_logged_to_a_file(layout):
    _land(layout, "hpx1-07", 250, 7)
    _land(layout, "hpx1-08", 40, 8)
    console, out = _console()
    log_path = layout.logs / "demo-test.log"
    layout.logs.mkdir(parents=True, exist_ok=True)
    report = run_step(
        open_instance(layout), layout, Step("gaia_source,pm_stats", "hpx1-07...hpx1-08"), log_path, console
    )

    assert report.status == "SUCCESS"
    source, stats = report.assets["gaia_source"], report.assets["pm_stats"]
    assert source.regions == stats.regions == {"hpx1-07", "hpx1-08"}
    manifests = [read_manifest(layout, "gaia_source", r) for r in ("hpx1-07", "hpx1-08")]
    assert source.rows_in == sum(m["rows_in"] for m in manifests) == 290
    assert (source.accepted, source.quarantined) == (290, 0)
    assert stats.rows_in == 290 and stats.accepted is None
    assert 0 < source.wall_seconds and source.finished <= stats.started

    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["gaia_source", "pm_stats"], (
        "one line per step, no event flood"
    )
    assert "\x1b[" not in out.getvalue(), "no bar or colour codes when output is not a terminal"
    log = log_path.read_text()
    assert "RUN_SUCCESS" in log and "ASSET_MATERIALIZATION" in log, "the full Dagster log is in the file"
    assert "SupersessionWarning" not in log

    table, table_out = _console()
    table.print(summary_table([report]))
    assert "290" in table_out.getvalue() and "pm_stats" in table_out.getvalue()


def test_failure_names_asset_region_message_and_log(layout):
    bad = _land(layout, "hpx1-08", 40, 8)
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated download
    console, _ = _console()
    log_path = layout.logs / "demo-test.log"
    layout.logs.mkdir(parents=True, exist_ok=True)
    with pytest.raises(StepFailed) as raised:
        run_step(open_instance(layout), layout, Step("gaia_source", "hpx1-08...hpx1-08"), log_path, console)
    text = failure_text(raised.value)
    assert text.startswith("gaia_source failed in region hpx1-08:")
    assert f"hpx1-08: {bad}" in text, text
    assert text.endswith(f"Full Dagster log: {log_path}")
