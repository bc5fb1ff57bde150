"""``gaia-flows``: the command line a person uses around the Dagster graph.

Each subcommand lives in its own ``cli_*`` module (``demo``, ``status``, ``generate``,
``map``, ``cluster``, ``diagnose``, ``metrics``); this one holds what they share (the Dagster environment of a state
folder) and wires them.
"""

from __future__ import annotations

import argparse
import importlib
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
    f"ignore:Function `{name}` is superseded:FutureWarning"
    for name in ("asset_materialize_command", "dev_command")
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
    command = [
        dagster_cli(),
        "dev",
        "-w",
        str(REPO_ROOT / "workspace.yaml"),
        "-h",
        "127.0.0.1",
        "-p",
        str(args.port),
    ]
    return subprocess.call(command, cwd=REPO_ROOT, env=dagster_env(layout))


def cmd_mlflow(args: argparse.Namespace) -> int:
    from gaia_flows.resources.mlflow import SERVER_ENV, MlflowResource, server_command
    from gaia_flows.resources.storage import StorageResource

    layout = StateLayout.from_env().ensure()
    store = MlflowResource(storage=StorageResource())
    return subprocess.call(server_command(store, port=args.port), env={**dagster_env(layout), **SERVER_ENV})


def _lazy(module: str, function: str):
    """A subcommand whose module (Dagster, rich) is imported only when it runs: `gaia-flows map`
    stays a Parquet read and a drawing."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    from gaia_flows.cli_cluster import add_cluster_command
    from gaia_flows.cli_generate import add_generate_command
    from gaia_flows.cli_map import add_map_command

    parser = argparse.ArgumentParser(prog="gaia-flows", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="generate a synthetic catalogue (if landing is empty) and materialise the whole graph"
    )
    demo.add_argument("--stars", type=int, default=1_000_000)
    demo.add_argument("--seed", type=int, default=42)
    demo.add_argument(
        "--verbose", action="store_true", help="stream the full Dagster log to the terminal too"
    )
    demo.set_defaults(func=_lazy("gaia_flows.cli_demo", "cmd_demo"))
    status = sub.add_parser(
        "status", help="assets' freshness, stale and failed regions, last runs and the champion model"
    )
    status.set_defaults(func=_lazy("gaia_flows.cli_status", "cmd_status"))
    diagnose = sub.add_parser(
        "diagnose", help="name what bound a run (CPU, reading, shuffle, driver) with its numbers"
    )
    diagnose.add_argument("run_id", help="a Dagster run id (or its first characters)")
    diagnose.set_defaults(func=_lazy("gaia_flows.cli_diagnose", "cmd_diagnose"))
    ui = sub.add_parser("ui", help="Dagster web UI on this state folder")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=cmd_ui)
    ml = sub.add_parser("mlflow", help="MLflow tracking browser on this state folder's store")
    ml.add_argument("--port", type=int, default=5000)
    ml.set_defaults(func=cmd_mlflow)
    metrics = sub.add_parser("metrics", help="serve the pipeline's own figures to Prometheus")
    metrics.add_argument(
        "--host", default="127.0.0.1", help="address to listen on, and the target advertised"
    )
    metrics.add_argument("--port", type=int, default=9464, help="0 picks a free port")
    metrics.set_defaults(func=_lazy("gaia_flows.cli_metrics", "cmd_metrics"))
    add_cluster_command(sub)
    add_generate_command(sub)
    add_map_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
