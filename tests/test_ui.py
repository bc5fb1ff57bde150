"""The Dagster web UI, as a person opens it: a real ``dagster-webserver`` on loopback serving
this repository's workspace and state folder, read by headless Chromium after its JavaScript
has rendered the page."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dagster import DagsterInstance, materialize
from support.gaia_files import region_file_range, stars_in_region, write_gaia_file
from support.servers import ServerProcess, free_port
from support.spark import TEST_SPARK_CONF

from gaia_flows.assets.catalogue import gaia_landing, gaia_source
from gaia_flows.cli import dagster_env
from gaia_flows.definitions import defs
from gaia_flows.layout import REPO_ROOT
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource

pytestmark = pytest.mark.ui

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--window-size=1400,1000",
    "--virtual-time-budget=30000",
]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail(
            "headless Chromium is required for UI tests: apt-get install chromium (.ci/run does this)"
        )
    return found


@pytest.fixture
def webserver(layout, spark, monkeypatch):
    """One region materialised into the state folder's instance, then the UI started on it."""
    env = dagster_env(layout)
    monkeypatch.setenv("DAGSTER_HOME", env["DAGSTER_HOME"])
    lo, hi = region_file_range("hpx1-07")
    write_gaia_file(layout.landing, lo, hi, stars_in_region("hpx1-07", 321, 7))
    resources = {
        "spark": SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF),
        "storage": StorageResource(),
    }
    result = materialize(
        [gaia_landing, gaia_source],
        selection=[gaia_source.key],
        partition_key="hpx1-07",
        resources=resources,
        instance=DagsterInstance.get(),
    )
    assert result.success

    port = free_port()
    command = [
        str(Path(sys.executable).with_name("dagster-webserver")),
        "-w",
        "workspace.yaml",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    server = ServerProcess("dagster-webserver", command, env=env, log_dir=layout.home, cwd=REPO_ROOT).start(
        port=port, ready_path="/server_info", timeout=180
    )
    try:
        yield server.url
    finally:
        server.stop()


def _rendered(url: str, tmp_path: Path) -> str:
    """The DOM after the single-page app has fetched its GraphQL data and rendered."""
    proc = subprocess.run(
        [_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", proc.stdout))


def test_ui_lists_the_whole_asset_graph(webserver, tmp_path):
    text = _rendered(f"{webserver}/assets", tmp_path)
    expected = {key.to_user_string() for key in defs.resolve_asset_graph().materializable_asset_keys}
    missing = sorted(name for name in expected if name not in text)
    assert not missing, f"assets not shown in the UI catalog: {missing}"


def test_ui_shows_region_row_counts(webserver, tmp_path):
    text = _rendered(f"{webserver}/assets/gaia_source?view=partitions&partition=hpx1-07", tmp_path)
    assert "hpx1-07" in text
    assert re.search(r"rows_in 321 rows_accepted 321 rows_rejected 0", text), text[:2000]
