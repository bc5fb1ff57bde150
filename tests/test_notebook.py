"""``notebooks/explore.ipynb`` executed by nbmake against the state folder the demo leaves.

The demo is the README's own command (``gaia-flows demo``) on a small catalogue in a fresh
state folder; the notebook then runs cell by cell in a Jupyter kernel of this interpreter and
any error in any cell fails the test, naming the cell.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from gaia_flows.layout import REPO_ROOT

NOTEBOOK = REPO_ROOT / "notebooks" / "explore.ipynb"
STARS = 30_000


def test_committed_notebook_has_no_outputs():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code), (
        "strip outputs before committing"
    )


def test_notebook_runs_against_the_demo_state(tmp_path):
    env = {**os.environ, "GAIA_FLOWS_HOME": str(tmp_path / "state")}
    env.pop("GAIA_FLOWS_LANDING", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    bin_dir = Path(sys.executable).parent
    demo = subprocess.run(
        [str(bin_dir / "gaia-flows"), "demo", "--stars", str(STARS)],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert (tmp_path / "state" / "hats" / "gaia_source" / "collection.properties").exists(), (
        "the demo exports the HATS collection"
    )

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--nbmake",
            "--nbmake-timeout=600",
            "-p",
            "no:cacheprovider",
            "-q",
            "-o",
            "addopts=",
            str(NOTEBOOK),
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    assert "1 passed" in run.stdout
