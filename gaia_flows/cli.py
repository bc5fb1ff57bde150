"""``gaia-flows``: the command line a person uses around the Dagster graph.

``demo`` is the README's first command: it fills the landing folder with a synthetic
catalogue (if empty) and materialises the whole graph through the same ``dagster asset
materialize`` a user would type, so the demo exercises the real CLI, instance and storage.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from gaia_flows.layout import REPO_ROOT, StateLayout
from gaia_flows.science.healpix import region_keys

ALL_REGIONS = f"{region_keys()[0]}...{region_keys()[-1]}"
# The embedded instance (SQLite in the state folder, a small run queue); copied once, then the
# state folder's copy is the user's to edit.
LOCAL_INSTANCE_YAML = REPO_ROOT / "deployments" / "local" / "dagster.yaml"

# Each step is one Dagster run and so one Spark application; partitioned steps cover every
# region in a single run (single-run backfill policy), not 48 cold starts.
DEMO_STEPS: list[tuple[str, bool]] = [
    ("gaia_source,pm_stats", True),
    ("proper_motion_maps,astrometric_training_set,astrometric_classifier,hats_catalogue", False),
    ("classified_sources", True),
]


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
    }


def _dagster_cli() -> str:
    return str(Path(sys.executable).with_name("dagster"))


def materialize(layout: StateLayout, selection: str, partitioned: bool) -> None:
    command = [_dagster_cli(), "asset", "materialize", "-m", "gaia_flows.definitions", "--select", selection]
    if partitioned:
        command += ["--partition-range", ALL_REGIONS]
    print(f"$ {' '.join(command)}", flush=True)
    subprocess.run(command, check=True, cwd=REPO_ROOT, env=dagster_env(layout))


def cmd_demo(args: argparse.Namespace) -> int:
    from gaia_flows.science.synthetic import generate

    layout = StateLayout.from_env().ensure()
    started = time.perf_counter()
    if not any(layout.landing.glob("GaiaSource_*.csv*")):
        print(f"Generating a synthetic catalogue of {args.stars:,} stars (seed {args.seed}) into {layout.landing}", flush=True)
        generate(stars=args.stars, seed=args.seed, out=layout.landing)
    else:
        print(f"Using the Gaia files already in {layout.landing}", flush=True)
    for selection, partitioned in DEMO_STEPS:
        materialize(layout, selection, partitioned)
    minutes = (time.perf_counter() - started) / 60
    print(
        f"\nDone in {minutes:.1f} min. Everything is under {layout.home}:\n"
        f"  catalogue   {layout.table('gaia_source')}  (quarantine: {layout.quarantine})\n"
        f"  HATS        {layout.hats_collection('gaia_source')}  (lsdb.open_catalog)\n"
        f"  sky maps    {layout.maps}\n"
        f"  MLflow      {layout.mlflow_tracking_uri}\n"
        f"Open the Dagster UI:   .venv/bin/gaia-flows ui      (http://127.0.0.1:3000)\n"
        f"Open the MLflow UI:    .venv/bin/gaia-flows mlflow  (http://127.0.0.1:5000)\n"
        f"Re-plot instantly:     .venv/bin/gaia-flows map --level 6 --quantity pmra --out pmra.png"
    )
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    layout = StateLayout.from_env().ensure()
    command = [_dagster_cli(), "dev", "-w", str(REPO_ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(args.port)]
    return subprocess.call(command, cwd=REPO_ROOT, env=dagster_env(layout))


def cmd_mlflow(args: argparse.Namespace) -> int:
    from gaia_flows.resources.mlflow import server_command

    layout = StateLayout.from_env().ensure()
    return subprocess.call(server_command(port=args.port), env=dagster_env(layout))


def build_parser() -> argparse.ArgumentParser:
    from gaia_flows.cli_generate import add_generate_command
    from gaia_flows.cli_map import add_map_command

    parser = argparse.ArgumentParser(prog="gaia-flows", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate a synthetic catalogue (if landing is empty) and materialise the whole graph")
    demo.add_argument("--stars", type=int, default=1_000_000)
    demo.add_argument("--seed", type=int, default=42)
    demo.set_defaults(func=cmd_demo)
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
