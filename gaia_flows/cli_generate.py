"""``gaia-flows generate``: write a synthetic DR3 catalogue into the landing area.

Kept apart from the main CLI so the console script only wires subcommands; the default
destination is the landing folder the pipeline's sensor watches, so a generated catalogue is
picked up like a real download.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from gaia_flows.contracts import load_contract
from gaia_flows.layout import StateLayout
from gaia_flows.science.synthetic import DEFAULT_FILES, generate


def add_generate_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate",
        help="write a synthetic Gaia DR3 catalogue (GaiaSource_*.csv.gz plus hidden truth)",
        description="Write a deterministic synthetic Gaia DR3 catalogue in the archive's bulk format.",
    )
    parser.add_argument("--stars", type=_positive, required=True, help="number of sources")
    parser.add_argument("--seed", type=int, required=True, help="random seed; same seed, same bytes")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="destination folder (default: the landing area, $GAIA_FLOWS_LANDING)",
    )
    parser.add_argument(
        "--files",
        type=_positive,
        default=DEFAULT_FILES,
        help=f"number of GaiaSource files (default {DEFAULT_FILES})",
    )
    parser.add_argument(
        "--processes", type=_positive, default=None, help="worker processes (default: all available cores)"
    )
    parser.set_defaults(func=run_generate)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def run_generate(args: argparse.Namespace) -> int:
    out = args.out if args.out is not None else StateLayout.from_env().landing
    report = generate(args.stars, args.seed, out, load_contract(), files=args.files, processes=args.processes)
    populations = ", ".join(f"{name} {count:,}" for name, count in report.populations.items())
    print(
        f"wrote {report.stars:,} sources in {len(report.files)} files ({report.bytes / 1e6:,.1f} MB) to {out} in {report.seconds:.1f} s"
    )
    print(f"populations: {populations}; spurious: {report.spurious:,}")
    print(f"ground truth: {report.truth}")
    return 0
