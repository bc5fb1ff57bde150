"""All-sky proper-motion maps from stored statistics: tables for notebooks, Mollweide PNGs.

Nothing here starts (or imports) Spark: a map at any level up to the statistics' level is a
cheap cut of small stored tables, so re-plotting never rescans the catalogue::

    from gaia_flows import map_table
    table = map_table(6)                     # one row per level-6 pixel, pyarrow
    df = table.to_pandas()                   # mean_pmra, wmean_pmra, std_pmra, n_sources, ...

Where the statistics come from, newest first:

1. ``warehouse/proper_motion_maps/``: the all-sky pyramid (every level 0..L_max) the
   ``proper_motion_maps`` asset writes; used when it was built from the pm_stats versions
   that are published now.
2. otherwise the per-region ``warehouse/pm_stats/<region>/`` tables, merged on the fly (a
   region rerun since the last maps run is therefore never invisible).

healpy and matplotlib are imported only when a PNG is rendered.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gaia_flows.layout import StateLayout
from gaia_flows.science import proper_motion as pm
from gaia_flows.science.healpix import nside, parse_region_key

STATS_TABLE = "pm_stats"
MAPS_TABLE = "proper_motion_maps"
REGION_MANIFEST = "_region.json"  # same name tables.py writes; read here without importing pyspark
MAPS_SUBDIR = "proper_motion"


# --- reading stored statistics (pyarrow only) ---------------------------------------------------


def region_versions(layout: StateLayout, table: str = STATS_TABLE) -> dict[str, str]:
    """Published regions of a per-region table and the version each points at.

    A region directory is a symlink into ``<table>/.versions/`` that every publish replaces,
    so the link target identifies the exact content (see :func:`gaia_flows.layout.publish`).
    """
    root = layout.table(table)
    if not root.exists():
        return {}
    out = {}
    for path in sorted(root.iterdir()):
        try:
            parse_region_key(path.name)
        except ValueError:
            continue
        if path.exists():
            out[path.name] = os.readlink(path) if path.is_symlink() else path.name
    return out


def _parquet_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.parquet") if not p.name.startswith((".", "_")))


def read_region_stats(layout: StateLayout, regions: list[str] | None = None) -> dict[str, pa.Table]:
    """The stored statistics of each (by default every published) region."""
    wanted = list(region_versions(layout)) if regions is None else regions
    out = {}
    for region in wanted:
        files = _parquet_files(layout.region_dir(STATS_TABLE, region))
        parts = [pq.read_table(f) for f in files]
        if not parts:
            raise FileNotFoundError(f"{layout.region_dir(STATS_TABLE, region)} holds no statistics")
        level = pm.stats_level(parts[0])
        out[region] = pa.concat_tables(parts).cast(pm.stats_schema(level)) if len(parts) > 1 else parts[0]
    return out


def merged_region_stats(layout: StateLayout, level: int | None = None) -> pa.Table:
    """All published regions merged into one all-sky statistics table (at ``level`` or the
    coarsest level any region was computed at)."""
    per_region = read_region_stats(layout)
    if not per_region:
        raise FileNotFoundError(f"no proper-motion statistics under {layout.table(STATS_TABLE)}: materialize pm_stats first")
    return pm.merge(per_region.values(), level=level)


def maps_manifest(layout: StateLayout) -> dict:
    """Manifest of the stored all-sky pyramid (levels, pm_stats versions it was built from)."""
    path = layout.table(MAPS_TABLE) / REGION_MANIFEST
    return json.loads(path.read_text()) if path.exists() else {}


def sky_stats(level: int, layout: StateLayout | None = None) -> pa.Table:
    """All-sky statistics at ``level``: from the maps pyramid when it is current, else merged
    from the per-region statistics."""
    layout = layout or StateLayout.from_env()
    manifest = maps_manifest(layout)
    if manifest and manifest.get("pm_stats_versions") == region_versions(layout):
        top = int(manifest["level_max"])
        if level > top:
            raise ValueError(f"level {level} is finer than the stored statistics (level {top})")
        files = _parquet_files(layout.table(MAPS_TABLE))
        stacked = pq.read_table(files, filters=[("level", "=", level)]) if len(files) == 1 else pa.concat_tables(
            [pq.read_table(f, filters=[("level", "=", level)]) for f in files]
        )
        stacked = stacked.replace_schema_metadata({pm.LEVEL_METADATA_KEY: str(top).encode()})
        return pm.from_pyramid(stacked, level)
    stats = merged_region_stats(layout)
    return pm.degrade(stats, level)


def map_table(level: int, layout: StateLayout | None = None, dense: bool = True) -> pa.Table:
    """The all-sky map table at HEALPix ``level`` from stored statistics (pyarrow; ``.to_pandas()``
    for a DataFrame).

    One row per nested pixel (``dense=True``: all 12·4^level of them, in pixel order, ready for
    ``healpy`` with ``nest=True``; ``dense=False``: only pixels with sources). Columns are
    described in :func:`gaia_flows.science.proper_motion.finalise`; empty pixels have zero
    counts and NaN means. Spark is never started.
    """
    return pm.finalise(sky_stats(level, layout), dense=dense)


# --- rendering -----------------------------------------------------------------------------------


def _pyplot():
    """pyplot on the non-interactive Agg backend, unless the caller (a notebook) chose one."""
    if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
        import matplotlib

        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colour_limits(values: np.ndarray, quantity: str) -> tuple[float, float]:
    """Colour range a person can read: counts from 1 to the maximum (log scale); proper motions
    symmetric about zero at the 99th percentile of |value|, so a handful of single-star pixels
    cannot wash out the sky and the sign of the motion reads as red/blue."""
    finite = values[np.isfinite(values)]
    if quantity == "count":
        finite = finite[finite > 0]
        top = float(finite.max()) if finite.size else 1.0
        return 1.0, max(top, 2.0)
    if finite.size == 0:
        return -1.0, 1.0
    half = float(np.percentile(np.abs(finite), 99))
    half = half if half > 0 else 1.0
    return -half, half


def render_map(table: pa.Table, quantity: str, out: str | os.PathLike, weighted: bool = False, title: str | None = None, xsize: int = 1200, dpi: int = 120) -> Path:
    """Mollweide PNG (healpy, ``nest=True``, equatorial/ICRS, graticule every 30°) of one
    quantity of a dense map table. Empty pixels are drawn grey. Written atomically."""
    import healpy as hp

    plt = _pyplot()
    level = pm.stats_level(table)
    column = pm.quantity_column(quantity, weighted)
    values = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    if values.size != 12 * 4**level:
        raise ValueError(f"render_map needs a dense map table ({12 * 4**level} pixels), got {values.size} rows")
    if quantity == "count":
        values = np.where(values > 0, values, np.nan)
    lo, hi = colour_limits(values, quantity)
    shown = np.where(np.isfinite(values), values, hp.UNSEEN)
    n_total = int(table.column("n_sources").to_numpy().sum())
    if title is None:
        label = {"pmra": "μα* (pmra)", "pmdec": "μδ (pmdec)", "count": "source count"}[quantity]
        kind = "weighted mean " if weighted and quantity != "count" else ("mean " if quantity != "count" else "")
        title = f"{kind}{label} — HEALPix level {level} (nside {nside(level)}), {n_total:,} sources"
    hp.mollview(
        shown,
        nest=True,
        title=title,
        unit=pm.quantity_unit(quantity),
        min=lo,
        max=hi,
        cmap="viridis" if quantity == "count" else "RdBu_r",
        norm="log" if quantity == "count" else None,
        badcolor="lightgray",
        xsize=xsize,
    )
    fig = plt.gcf()  # mollview opened a new figure
    try:
        hp.graticule(dpar=30, dmer=30, alpha=0.4)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".png", dir=out.parent)
        os.close(fd)
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
    return out


def render_healpix(
    values: np.ndarray,
    out: str | os.PathLike,
    title: str,
    unit: str = "",
    cmap: str = "viridis",
    lo: float | None = None,
    hi: float | None = None,
    norm: str | None = None,
    coord: str | list[str] | None = None,
    xsize: int = 1200,
    dpi: int = 120,
) -> Path:
    """Mollweide PNG of any dense nested HEALPix array (NaN = no data, drawn grey), with the same
    look as :func:`render_map`: graticule every 30°, written atomically. ``coord=["C", "G"]``
    draws ICRS pixels in Galactic coordinates (crowded fields then line up along the equator)."""
    import healpy as hp

    plt = _pyplot()
    values = np.asarray(values, dtype=np.float64)
    shown = np.where(np.isfinite(values), values, hp.UNSEEN)
    hp.mollview(shown, nest=True, title=title, unit=unit, min=lo, max=hi, cmap=cmap, norm=norm, coord=coord, badcolor="lightgray", xsize=xsize)
    fig = plt.gcf()
    try:
        hp.graticule(dpar=30, dmer=30, alpha=0.4)
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".png", dir=out.parent)
        os.close(fd)
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
    return out


def png_path(layout: StateLayout, level: int, quantity: str, weighted: bool = False) -> Path:
    """Where the maps asset keeps a rendered map: ``<home>/maps/proper_motion/level-06/pmra.png``."""
    suffix = "_weighted" if weighted and quantity != "count" else ""
    return layout.maps / MAPS_SUBDIR / f"level-{level:02d}" / f"{quantity}{suffix}.png"


def plot(level: int, quantity: str, out: str | os.PathLike, weighted: bool = False, layout: StateLayout | None = None) -> Path:
    """Re-plot one quantity at one level from stored statistics (what ``gaia-flows map`` runs)."""
    return render_map(map_table(level, layout), quantity, out, weighted=weighted)
