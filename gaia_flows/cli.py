"""``gaia-flows``: the command line a person uses around the Dagster graph.

Each subcommand lives in its own ``cli_*`` module (``demo``, ``status``, ``generate``,
``map``); this one holds what they share (the Dagster environment of a state folder) and
wires them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

from gaia_flows.layout import REPO_ROOT, StateLayout
from gaia_flows.science.healpix import region_keys

ALL_REGIONS = f"{region_keys()[0]}...{region_keys()[-1]}"
# The embedded instance (SQLite in the state folder, a small run queue); copied once, then the
# state folder's copy is the user's to edit.
LOCAL_INSTANCE_YAML = REPO_ROOT / "deployments" / "local" / "dagster.yaml"

# `dagster asset materialize` and `dagster dev` warn on every start that `dg` supersedes them;
# the commands this project runs itself stay on them (the design names them), so the warning is
# noise there. Message prefixes, as Python's -W option matches them.
QUIET_SUPERSEDED = ",".join(
    f"ignore:Function `{name}` is superseded:FutureWarning" for name in ("asset_materialize_command", "dev_command")
)


def dagster_env(layout: StateLayout) -> dict[str, str]:
    """Environment for Dagster processes: instance and state under the one state folder."""
    layout.dagster_home.mkdir(parents=True, exist_ok=True)
    instance_yaml = layout.dagster_home / "dagster.yaml"
    if not instance_yaml.exists():
        shutil.copyfile(LOCAL_INSTANCE_YAML, instance_yaml)
    return {
        **os.environ,
        "GAIA_FLOWS_HOME": str(layout.home),
        "GAIA_FLOWS_LANDING": str(layout.landing),
        "DAGSTER_HOME": str(layout.dagster_home),
        "SPARK_LOCAL_IP": "127.0.0.1",
        "PYTHONWARNINGS": ",".join(filter(None, [os.environ.get("PYTHONWARNINGS"), QUIET_SUPERSEDED])),
    }


def open_instance(layout: StateLayout):
    """The state folder's Dagster instance in this process (its dagster.yaml reads DAGSTER_HOME)."""
    from dagster import DagsterInstance

    os.environ["DAGSTER_HOME"] = dagster_env(layout)["DAGSTER_HOME"]
    return DagsterInstance.get()


def dagster_cli() -> str:
    return str(Path(sys.executable).with_name("dagster"))


def cmd_ui(args: argparse.Namespace) -> int:
    layout = StateLayout.from_env().ensure()
    command = [dagster_cli(), "dev", "-w", str(REPO_ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(args.port)]
    return subprocess.call(command, cwd=REPO_ROOT, env=dagster_env(layout))


def cmd_mlflow(args: argparse.Namespace) -> int:
    from gaia_flows.resources.mlflow import server_command

    layout = StateLayout.from_env().ensure()
    return subprocess.call(server_command(port=args.port), env=dagster_env(layout))


def build_parser() -> argparse.ArgumentParser:
    from gaia_flows.cli_demo import add_demo_command
    from gaia_flows.cli_diagnose import add_diagnose_command
    from gaia_flows.cli_generate import add_generate_command
    from gaia_flows.cli_map import add_map_command
    from gaia_flows.cli_status import add_status_command

    parser = argparse.ArgumentParser(prog="gaia-flows", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_demo_command(sub)
    add_status_command(sub)
    add_diagnose_command(sub)
    ui = sub.add_parser("ui", help="Dagster web UI on this state folder")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=cmd_ui)
    ml = sub.add_parser("mlflow", help="MLflow tracking browser on this state folder's store")
    ml.add_argument("--port", type=int, default=5000)
    ml.set_defaults(func=cmd_mlflow)
    add_generate_command(sub)
    add_map_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
