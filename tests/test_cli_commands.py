"""Every command of the README's Dagster command-line block, run as written (by subprocess, from
the repository root) against a temporary state folder: ``dg`` and the older ``dagster`` CLI."""

import json
import re
import shlex
import subprocess
import time
import urllib.request

import pytest
from support.gaia_files import region_file_range, stars_in_region, write_gaia_file
from support.servers import ServerProcess, free_port

from gaia_flows.cli import dagster_env
from gaia_flows.layout import REPO_ROOT
from gaia_flows.warehouse import read_manifest

pytestmark = pytest.mark.cli


def readme_commands() -> list[str]:
    """The commands between the README's ``cli-commands`` markers, comments and ``export`` lines
    left out (the test sets the same environment from the state folder)."""
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"<!-- cli-commands -->\s*```sh\n(.*?)```\s*<!-- /cli-commands -->", text, re.S)
    assert block, "README.md lost its cli-commands block"
    lines = [line.split("  #")[0].strip() for line in block.group(1).splitlines()]
    return [line for line in lines if line and not line.startswith(("export ", "#"))]


COMMANDS = readme_commands()


def test_readme_documents_both_command_lines():
    assert any(c.startswith(".venv/bin/dg launch") for c in COMMANDS)
    assert any(c.startswith(".venv/bin/dagster asset materialize") for c in COMMANDS)
    assert sorted(c for c in COMMANDS if c.endswith(" dev")) == [".venv/bin/dagster dev", ".venv/bin/dg dev"]


@pytest.fixture
def state(layout):
    lo, hi = region_file_range("hpx1-07")
    write_gaia_file(layout.landing, lo, hi, stars_in_region("hpx1-07", 123, 7))
    env = dagster_env(layout)
    env["PATH"] = f"{REPO_ROOT / '.venv' / 'bin'}:{env['PATH']}"
    return layout, env


def _argv(command: str) -> list[str]:
    argv = shlex.split(command)
    argv[0] = str(REPO_ROOT / argv[0])
    return argv


@pytest.mark.parametrize(
    "command", COMMANDS, ids=[" ".join(c.split()[0:3]).removeprefix(".venv/bin/") for c in COMMANDS]
)
def test_documented_command_works(command, state):
    layout, env = state
    argv = _argv(command)
    if command.endswith(" dev"):
        port = free_port()
        server = ServerProcess(
            argv[0].rsplit("/", 1)[-1] + "-dev",
            [*argv, "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            log_dir=layout.home,
            cwd=REPO_ROOT,
        )
        server.start(port=port, ready_path="/server_info", timeout=240)
        try:
            query = json.dumps({"query": "{ assetNodes { assetKey { path } } }"}).encode()
            request = urllib.request.Request(
                f"{server.url}/graphql", data=query, headers={"Content-Type": "application/json"}
            )
            for _ in range(60):  # the code location loads after the server answers
                nodes = json.loads(urllib.request.urlopen(request, timeout=30).read())["data"]["assetNodes"]
                if nodes:
                    break
                time.sleep(2)
            assert {"gaia_source", "pm_stats", "classified_sources"} <= {
                "/".join(n["assetKey"]["path"]) for n in nodes
            }
        finally:
            server.stop()
        return
    proc = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=850)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    if "list defs" in command:
        assert "gaia_source" in output and "automation_sensor" in output
    if "--partition hpx1-07" in command:
        manifest = read_manifest(layout, "gaia_source", "hpx1-07")
        assert manifest["rows_in"] == manifest["rows_accepted"] == 123
        assert any(layout.dagster_home.glob("storage/*")), (
            "the run is recorded in the state folder's instance"
        )
