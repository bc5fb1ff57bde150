"""``gaia-flows map``: re-plot a proper-motion map from stored statistics.

Reads the small per-pixel statistics the ``pm_stats``/``proper_motion_maps`` assets stored
and draws a healpy Mollweide PNG. It never imports pyspark (a test holds it to that), so a
re-plot costs a Parquet read and a drawing, not a Spark start or a catalogue scan.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gaia_flows.science.healpix import MAX_LEVEL
from gaia_flows.science.proper_motion import QUANTITIES


def add_map_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "map",
        help="re-plot an all-sky proper-motion map from stored statistics (no Spark)",
        description="Draw a Mollweide PNG of mean pmra, mean pmdec or source counts at any HEALPix level up to "
        "the stored statistics' level, from the tables pm_stats / proper_motion_maps wrote under $GAIA_FLOWS_HOME.",
    )
    parser.add_argument(
        "--level",
        type=_level,
        required=True,
        help=f"HEALPix level (0..{MAX_LEVEL}, at most the stored level, default 8)",
    )
    parser.add_argument(
        "--quantity", choices=sorted(QUANTITIES), default="pmra", help="what to plot (default pmra)"
    )
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    parser.add_argument(
        "--weighted", action="store_true", help="inverse-variance weighted mean instead of the plain mean"
    )
    parser.add_argument(
        "--coord",
        choices=["C", "G"],
        default="C",
        help="draw the sky in ICRS (C, default) or Galactic (G) coordinates",
    )
    parser.set_defaults(func=run_map)
    return parser


def _level(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_LEVEL:
        raise argparse.ArgumentTypeError(f"level must be between 0 and {MAX_LEVEL}, got {text}")
    return value


def run_map(args: argparse.Namespace) -> int:
    from gaia_flows import maps
    from gaia_flows.layout import StateLayout
    from gaia_flows.science import proper_motion as pm

    started = time.perf_counter()
    layout = StateLayout.from_env()
    table = maps.map_table(args.level, layout)
    read = time.perf_counter() - started
    out = maps.render_map(table, args.quantity, args.out, weighted=args.weighted, coord=args.coord)
    seconds = time.perf_counter() - started
    sources = int(pm.as_numpy(table.column("n_sources")).sum())
    frame = maps.FRAMES[args.coord][0]
    print(
        f"wrote {out} ({args.quantity}{' weighted' if args.weighted else ''}, {frame}, level {args.level}, {table.num_rows:,} pixels, {sources:,} sources) in {seconds:.2f} s (read {read:.2f} s)"
    )
    return 0
