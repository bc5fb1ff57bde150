"""All-sky proper-motion maps from stored statistics: tables for notebooks, Mollweide PNGs.

Nothing here starts (or imports) Spark: a map at any level up to the statistics' level is a
cheap cut of small stored tables, so re-plotting never rescans the catalogue::

    from gaia_flows import map_table
    table = map_table(6)                     # one row per level-6 pixel, pyarrow
    df = table.to_pandas()                   # mean_pmra, sem_pmra, wmean_pmra, neff_pmra, ...

Which quantity to use (the columns are listed in :func:`gaia_flows.science.proper_motion.finalise`):
``mean_*`` with ``sem_*`` is the default map, the mean motion of a pixel's stars with an
uncertainty that includes their intrinsic velocity spread. For the inverse-variance weighted
mean ``wmean_*`` quote ``wmean_*_total_error`` (the scatter seen, over √(neff − 1)), never
``wmean_*_measurement_error`` (1/√Σw, the measurement errors alone): within a pixel the stars'
real velocity spread usually dominates, and the weighted mean then rests on ``neff_*`` stars,
far fewer than ``n_pm``.

Where the statistics come from, newest first:

1. ``warehouse/proper_motion_maps/``: the all-sky pyramid (every level 0..L_max) the
   ``proper_motion_maps`` asset writes, used when it was built from the pm_stats versions
   that are published now: ``sky.parquet`` holds the whole sky up to level 6, each
   ``region-<key>.parquet`` one region's finer levels, one row group per level, so a map reads
   only its level;
2. otherwise the per-region ``warehouse/pm_stats/<region>/`` tables, merged on the fly (a
   region rerun since the last maps run is therefore never invisible).

The re-plot path stays import-light (a fresh ``gaia-flows map`` process pays for its imports):
no pandas (see :func:`pm.as_numpy`), no pyarrow.dataset, matplotlib only when a PNG is drawn,
healpy only when a projection grid is not cached yet.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gaia_flows.layout import MAPS_TABLE, STATS_TABLE, StateLayout
from gaia_flows.science import proper_motion as pm
from gaia_flows.science.healpix import children_range, nside, parse_region_key
from gaia_flows.warehouse import published_regions, version_manifest, write_table_files

MAPS_SUBDIR = "proper_motion"


# --- reading stored statistics (pyarrow only) ---------------------------------------------------


def _stats_files(layout: StateLayout, region: str) -> list[Path]:
    files = layout.region_files(STATS_TABLE, region)
    if not files:
        raise FileNotFoundError(f"{layout.region_dir(STATS_TABLE, region)} holds no statistics")
    return files


def read_region_stats(layout: StateLayout, regions: list[str] | None = None) -> dict[str, pa.Table]:
    """The stored statistics of each (by default every published) region; a region stored by
    an older gaia-flows, without every statistics column, raises
    :class:`~gaia_flows.science.proper_motion.StaleStatisticsError` naming it."""
    wanted = published_regions(layout, STATS_TABLE) if regions is None else regions
    out = {}
    for region in wanted:
        parts = [pq.read_table(f) for f in _stats_files(layout, region)]
        for path, part in zip(_stats_files(layout, region), parts):
            pm.check_stats_columns(part.column_names, f"pm_stats region {region} ({path})")
        level = pm.stats_level(parts[0])
        out[region] = pa.concat_tables(parts).cast(pm.stats_schema(level)) if len(parts) > 1 else parts[0]
    return out


def stored_level(layout: StateLayout, region: str) -> int:
    """Level of a region's stored statistics, from its first file's footer (no data read)."""
    return int(pq.read_schema(_stats_files(layout, region)[0]).metadata[pm.LEVEL_METADATA_KEY])


SKY_FILE = "sky.parquet"


def region_file(region: str) -> str:
    """The stored pyramid's file of one region's levels finer than :data:`HELD_LEVEL`."""
    return f"region-{region}.parquet"


HELD_LEVEL = 6
"""Pyramid levels up to this one (at most 65,532 pixels over the whole sky, whatever the star
count) are stored for the whole sky in one file, one row group per level, so a map at these
levels opens one file; only the finer levels are stored region by region, which keeps the
number of row groups a maps run writes small."""


@dataclass
class Pyramid:
    """What :func:`pyramid_files` found while streaming: the level of the pyramid, the totals
    at that level, each region's totals, the statistics kept for the levels asked for (the ones
    to render), the highest level of the all-sky file and the regions whose file was reused."""

    level_max: int
    keep: dict[int, list[pa.Table]]
    totals: dict[str, int] = field(default_factory=lambda: {"n_sources": 0, "n_pm": 0, "pixels": 0})
    region_totals: dict[str, dict[str, int]] = field(default_factory=dict)
    sky_levels: int = 0
    reused: list[str] = field(default_factory=list)

    def kept(self, level: int) -> pa.Table:
        return pm.merge(self.keep[level], level)

    def manifest(self, versions: dict[str, str]) -> dict:
        """What a later build needs to reuse this one's region files, and readers to find a level."""
        return {
            "level_max": self.level_max,
            "levels": list(range(self.level_max + 1)),
            "sky_levels": self.sky_levels,
            "pm_stats_versions": versions,
            "region_totals": self.region_totals,
            "rows": self.totals["n_sources"],
            "rows_with_pm": self.totals["n_pm"],
            "stats_columns": list(pm.STAT_COLUMNS),
        }


def _level_slice(part: pa.Table, lo: int, hi: int) -> pa.Table:
    """Rows of a pyramid part (sorted by level) with ``lo <= level <= hi``: a zero-copy slice."""
    levels = pm.as_numpy(part.column("level"))
    first, last = np.searchsorted(levels, [lo, hi + 1])
    return part.slice(int(first), int(last - first))


def _region_rows(stacked: pa.Table, region: str, lo: int, hi: int) -> pa.Table:
    """One region's rows at levels ``lo..hi`` of an all-sky pyramid part sorted by (level,
    pixel): at each level, the nested range of the region's pixel, as zero-copy slices."""
    region_level, region_pixel = parse_region_key(region)
    parts = []
    for level in range(lo, hi + 1):
        at_level = _level_slice(stacked, level, level)
        first, last = children_range(region_pixel, region_level, level)
        start, end = np.searchsorted(pm.as_numpy(at_level.column("pixel")), [first, last + 1])
        parts.append(at_level.slice(int(start), int(end - start)))
    return pa.concat_tables(parts)


def pyramid_files(
    layout: StateLayout, versions: dict[str, str], pyramid: Pyramid
) -> Iterator[tuple[str, pa.Table | Path]]:
    """The all-sky pyramid (levels 0..``pyramid.level_max``) of the pm_stats ``versions``, as
    (file name, rows or a file to reuse) items for :func:`gaia_flows.warehouse.write_table_files`,
    reading one region at a time, so the driver never holds the finest levels of the whole sky.

    Every pixel at the regions' level or finer lies in one region, so the levels finer than
    :data:`HELD_LEVEL` are stored region by region, one file each. A region whose statistics
    have the version the stored pyramid was built from keeps its file (hard-linked, not
    rewritten), and its coarser levels are cut from the stored all-sky file (one file read, not
    one per region). The last item is the new all-sky file: the levels up to
    :data:`HELD_LEVEL`, gathered from the regions, and the levels coarser than the regions
    (from each region's single pixel at the regions' level).
    """
    top = pyramid.level_max
    regions = list(versions)
    region_level = parse_region_key(regions[0])[0] if regions else 0
    split = min(region_level, top + 1)  # levels split..top come from each region alone
    sky_top = pyramid.sky_levels = top if split > top else max(split - 1, min(HELD_LEVEL, top))
    fine_kept = [level for level in pyramid.keep if level > sky_top]
    stored_root, stored = _stored_pyramid(layout)
    reusable = (
        stored.get("level_max") == top and stored.get("sky_levels") == sky_top and _has_every_column(stored)
    )
    carried, held, stored_sky = [], [], None
    for region in regions:
        if split > top:
            stats = read_region_stats(layout, [region])[region]
            carried.append(pm.degrade(stats, top))
            continue
        old = stored_root / region_file(region)
        if (
            reusable
            and stored["pm_stats_versions"].get(region) == versions[region]
            and region in stored.get("region_totals", {})
        ):
            if stored_sky is None:
                stored_sky = _level_row_groups(stored_root / SKY_FILE, range(split, sky_top + 1))
            part = _region_rows(stored_sky, region, split, sky_top)
            if fine_kept:
                part = pa.concat_tables(
                    [part, _level_row_groups(old, fine_kept).replace_schema_metadata(part.schema.metadata)]
                )
            counts = stored["region_totals"][region]
            pyramid.reused.append(region)
            if sky_top < top:
                yield region_file(region), old
        else:
            stats = read_region_stats(layout, [region])[region]
            stats = pm.degrade(stats, top)
            part = pm.pyramid(stats, range(split, top + 1))
            counts = pm.totals(stats)
            if sky_top < top:
                yield region_file(region), _level_slice(part, sky_top + 1, top)
        part = part.replace_schema_metadata({pm.LEVEL_METADATA_KEY: str(top).encode()})
        pyramid.region_totals[region] = counts
        for name in pyramid.totals:
            pyramid.totals[name] += counts[name]
        carried.append(pm.from_pyramid(part, split))
        held.append(_level_slice(part, split, sky_top))
        for level in fine_kept:
            pyramid.keep[level].append(pm.from_pyramid(part, level))
    sky = (
        [
            pa.concat_tables([_level_slice(t, level, level) for t in held])
            for level in range(split, sky_top + 1)
        ]
        if held
        else []
    )
    if split > 0 and carried:
        coarse = pm.merge(carried, min(split - 1, top))
        if split > top:
            pyramid.totals.update(pm.totals(coarse))
        sky.insert(0, pm.pyramid(coarse, range(0, pm.stats_level(coarse) + 1)))
    if sky:
        part = pa.concat_tables([t.replace_schema_metadata(None) for t in sky]).replace_schema_metadata(
            {pm.LEVEL_METADATA_KEY: str(top).encode()}
        )
        for level in pyramid.keep:
            if level <= sky_top:
                pyramid.keep[level].append(pm.from_pyramid(part, level))
        yield SKY_FILE, part


class _Republished(Exception):
    """A pm_stats region was republished while the pyramid was being written."""


def publish_pyramid(layout: StateLayout, render_levels: list[int]) -> tuple[dict[str, int], Pyramid]:
    """Stream every region's statistics into the stored pyramid (one region in memory at a
    time; a region unchanged since the stored pyramid keeps its file); returns each region's
    level and what was built. Retried if a region is republished meanwhile: the check comes
    before the pyramid is published, so the stored maps always describe the versions their
    manifest names.

    Parameters
    ----------
    layout
        The state folder whose ``pm_stats`` regions are merged and whose ``proper_motion_maps``
        table is (re)published.
    render_levels
        Levels whose full tables are kept in memory (``Pyramid.kept``) for drawing.

    Returns
    -------
    levels, pyramid
        The stored level of every region, and the pyramid built (totals, reused regions).
    """
    for _ in range(5):
        before = layout.region_versions(STATS_TABLE)
        if not before:
            raise FileNotFoundError(
                f"no proper-motion statistics under {layout.table(STATS_TABLE)}: materialize pm_stats first"
            )
        try:
            levels = {region: stored_level(layout, region) for region in before}
            level_max = min(levels.values())
            pyramid = Pyramid(level_max, {lv: [] for lv in render_levels if 0 <= lv <= level_max})

            def manifest() -> dict:
                if layout.region_versions(STATS_TABLE) != before:
                    raise _Republished
                return {
                    **pyramid.manifest(before),
                    "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
                }

            schema = pm.pyramid(pm.empty_stats(level_max), [level_max]).schema
            write_table_files(
                pyramid_files(layout, before, pyramid),
                schema,
                layout,
                MAPS_TABLE,
                manifest,
                row_group_key="level",
            )
        except (FileNotFoundError, _Republished):
            continue
        return levels, pyramid
    raise RuntimeError("pm_stats regions kept changing while the maps were being built; retry the run")


def merged_region_stats(layout: StateLayout, level: int | None = None) -> pa.Table:
    """All published regions merged into one all-sky statistics table (at ``level`` or the
    coarsest level any region was computed at)."""
    per_region = read_region_stats(layout)
    if not per_region:
        raise FileNotFoundError(
            f"no proper-motion statistics under {layout.table(STATS_TABLE)}: materialize pm_stats first"
        )
    return pm.merge(per_region.values(), level=level)


def _stored_pyramid(layout: StateLayout) -> tuple[Path, dict]:
    """The published version directory of the maps pyramid and its manifest (``{}`` if none):
    resolved once, so a reader keeps reading one version while a maps run publishes the next."""
    root = layout.table(MAPS_TABLE).resolve()
    return root, version_manifest(root)


def _has_every_column(manifest: dict) -> bool:
    """Whether a stored pyramid holds every statistics column this version computes (a pyramid
    an older gaia-flows built is never reused or read: it is rebuilt from pm_stats)."""
    return manifest.get("stats_columns") == list(pm.STAT_COLUMNS)


def maps_manifest(layout: StateLayout) -> dict:
    """Manifest of the stored all-sky pyramid (levels, pm_stats versions it was built from)."""
    return _stored_pyramid(layout)[1]


def _level_row_groups(path: Path, levels: Iterable[int]) -> pa.Table:
    """Row groups of a stored pyramid file that may hold any of ``levels`` (by their min/max
    statistics; every file is written one row group per level), for :func:`pm.from_pyramid`
    to cut. Plain ``ParquetFile`` rather than ``read_table(filters=...)``: importing
    pyarrow.dataset alone costs ~0.3 s."""
    levels = set(levels)
    parquet = pq.ParquetFile(path)
    column = parquet.schema_arrow.get_field_index("level")
    groups = []
    for i in range(parquet.num_row_groups):
        stats = parquet.metadata.row_group(i).column(column).statistics
        if stats is None or not stats.has_min_max or any(stats.min <= level <= stats.max for level in levels):
            groups.append(i)
    return parquet.read_row_groups(groups)


def pyramid_level(layout: StateLayout, level: int, current_only: bool = True) -> pa.Table | None:
    """Statistics at ``level`` cut from the stored pyramid; ``None`` when there is none (or,
    with ``current_only``, none built from the pm_stats versions published now, or one an older
    gaia-flows built without every statistics column, so the caller merges pm_stats instead).
    Read regardless of ``current_only``, an older pyramid raises
    :class:`~gaia_flows.science.proper_motion.StaleStatisticsError`."""
    root, manifest = _stored_pyramid(layout)
    if "sky_levels" not in manifest or (
        current_only and manifest.get("pm_stats_versions") != layout.region_versions(STATS_TABLE)
    ):
        return None
    if not _has_every_column(manifest):
        if current_only:
            return None
        raise pm.StaleStatisticsError(
            f"the stored {MAPS_TABLE} pyramid ({root}) was built by an older gaia-flows: its manifest lists the statistics "
            f"columns {manifest.get('stats_columns')}, this version needs {list(pm.STAT_COLUMNS)}; re-materialize proper_motion_maps"
        )
    top = int(manifest["level_max"])
    if level > top:
        raise ValueError(f"level {level} is finer than the stored statistics (level {top})")
    names = (
        [SKY_FILE]
        if level <= manifest["sky_levels"]
        else [region_file(r) for r in manifest["pm_stats_versions"]]
    )
    stacked = pa.concat_tables([_level_row_groups(root / name, [level]) for name in names])
    return pm.from_pyramid(stacked.replace_schema_metadata({pm.LEVEL_METADATA_KEY: str(top).encode()}), level)


def sky_stats(level: int, layout: StateLayout | None = None) -> pa.Table:
    """All-sky statistics at ``level``: from the maps pyramid when it is current, else merged
    from the per-region statistics."""
    layout = layout or StateLayout.from_env()
    stored = pyramid_level(layout, level)
    if stored is not None:
        return stored
    return pm.degrade(merged_region_stats(layout), level)


def map_table(level: int, layout: StateLayout | None = None, dense: bool = True) -> pa.Table:
    """The all-sky map table at HEALPix ``level`` from stored statistics (pyarrow; ``.to_pandas()``
    for a DataFrame).

    One row per nested pixel (``dense=True``: all 12·4^level of them, in pixel order, ready for
    ``healpy`` with ``nest=True``; ``dense=False``: only pixels with sources). Columns are
    described in :func:`gaia_flows.science.proper_motion.finalise`; empty pixels have zero
    counts and NaN means. Spark is never started.

    Parameters
    ----------
    level
        HEALPix level of the map, at most the level the statistics were computed at.
    layout
        State folder to read; default ``StateLayout.from_env()`` (``$GAIA_FLOWS_HOME``).
    dense
        Every pixel of the sky (``True``) or only pixels with sources.

    Returns
    -------
    pyarrow.Table
        ``pixel``, counts, means, weighted means, dispersions and errors per pixel.

    Examples
    --------
    >>> from gaia_flows import map_table
    >>> table = map_table(6)                            # doctest: +SKIP
    >>> table.num_rows                                  # doctest: +SKIP
    49152
    """
    return pm.finalise(sky_stats(level, layout), dense=dense)


# --- rendering -----------------------------------------------------------------------------------
#
# healpy's ``mollview`` recomputes the sky -> image projection (and imports healpy, astropy
# and pyplot) on every call: ~1 s per PNG. The projection only depends on (nside, xsize,
# coord), so healpy's own Mollweide projector computes it once, as the nested pixel index of
# every image pixel, and it is cached under the state folder as .npy. A re-plot is then a
# lookup ``values[grid]``, a colour mapping and one matplotlib ``imshow`` + ``savefig`` on a
# bare Figure (no pyplot, so the maps asset can draw several PNGs in threads).

PROJECTION_CACHE = ".projection"  # under <home>/maps/
GRATICULE_STEP = 30  # degrees between drawn meridians and parallels
BAD_RGBA = (211, 211, 211, 255)  # lightgray: pixels with no data
DEFAULT_XSIZE = 800  # healpy's default; the figure is ~1000 px wide, so more is not visible


def _coord_tag(coord: str | list[str] | None) -> str:
    if coord is None:
        return "native"
    return "".join(coord) if isinstance(coord, (list, tuple)) else str(coord)


def _save_npy(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".npy", dir=path.parent)
    with os.fdopen(fd, "wb") as handle:
        np.save(handle, array)
    os.replace(tmp, path)


def _load_npy(path: Path) -> np.ndarray | None:
    try:
        return np.load(path)
    except (OSError, ValueError):
        return None


def _grid_path(cache_dir: Path, level: int, xsize: int, coord: str | list[str] | None) -> Path:
    return Path(cache_dir) / f"mollweide-nside{nside(level)}-x{xsize}-{_coord_tag(coord)}.npy"


def projection_grid(
    level: int,
    xsize: int = DEFAULT_XSIZE,
    coord: str | list[str] | None = None,
    cache_dir: Path | None = None,
) -> np.ndarray:
    """Nested pixel index (at ``level``) under every pixel of a Mollweide image ``xsize`` wide,
    ``-1`` outside the ellipse; row 0 is the bottom (``imshow(origin="lower")``). Exactly what
    ``healpy.mollview(nest=True, flip="astro", coord=coord)`` samples, computed by healpy's
    projector once per (level, xsize, coord) and cached in ``cache_dir``."""
    path = None
    if cache_dir is not None:
        path = _grid_path(cache_dir, level, xsize, coord)
        cached = _load_npy(path)
        if cached is not None and cached.shape == (xsize // 2, xsize):
            return cached
    import healpy as hp

    n = nside(level)
    proj = hp.projector.MollweideProj(xsize=xsize, coord=coord, flipconv="astro")
    image = proj.projmap(
        np.arange(hp.nside2npix(n), dtype=np.float64),
        lambda x, y, z: hp.vec2pix(n, x, y, z, nest=True),
        coord=coord,
    )
    grid = np.where(np.isfinite(image), image, -1).astype(np.int32)
    if path is not None:
        _save_npy(path, grid)
    return grid


def warm_projection_cache(levels, cache_dir: Path, xsize: int = DEFAULT_XSIZE) -> list[int]:
    """Compute the projection grids (and the graticule) not cached yet, so that the first
    re-plot at any of ``levels`` needs neither healpy nor the projection; returns the levels
    computed now."""
    missing = [lv for lv in levels if not _grid_path(cache_dir, lv, xsize, None).exists()]
    for level in missing:
        projection_grid(level, xsize, None, cache_dir)
    graticule_lines(cache_dir)
    return missing


def graticule_lines(cache_dir: Path | None = None) -> np.ndarray:
    """Meridians and parallels every 30° in Mollweide plane coordinates (x in [-2, 2], y in
    [-1, 1], astro flip, as ``healpy.graticule(dpar=30, dmer=30)`` draws them), one (n, 2)
    polyline with NaN rows between lines; the meridians at ±180° are the outline."""
    path = Path(cache_dir) / f"mollweide-graticule-{GRATICULE_STEP}deg.npy" if cache_dir is not None else None
    if path is not None and (cached := _load_npy(path)) is not None:
        return cached
    import healpy as hp

    proj = hp.projector.MollweideProj(flipconv="astro")
    edge = 180 - 1e-6
    lines = [
        (np.full(181, float(lon)), np.linspace(-90, 90, 181))
        for lon in [-edge, *range(-180 + GRATICULE_STEP, 180, GRATICULE_STEP), edge]
    ]
    lines += [
        (np.linspace(-edge, edge, 361), np.full(361, float(lat)))
        for lat in range(-90 + GRATICULE_STEP, 90, GRATICULE_STEP)
    ]
    parts = []
    for lon, lat in lines:
        x, y = proj.ang2xy(lon, lat, lonlat=True)
        parts += [np.column_stack([x, y]), np.full((1, 2), np.nan)]
    graticule = np.concatenate(parts)
    if path is not None:
        _save_npy(path, graticule)
    return graticule


def projection_cache(layout: StateLayout | None = None) -> Path:
    return (layout or StateLayout.from_env()).maps / PROJECTION_CACHE


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


def _write_png(fig, out: str | os.PathLike, dpi: int) -> Path:
    """Save atomically: a reader (the Dagster UI, a notebook) never sees half a PNG."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.stem}-", suffix=".png", dir=out.parent)
    os.close(fd)
    try:
        # zlib level 1: the PNG is ~20 % bigger than at the default 6 but encodes ~3x faster,
        # and encoding is a large share of a re-plot's drawing time.
        fig.savefig(tmp, dpi=dpi, pil_kwargs={"compress_level": 1})
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a map is for everyone who can read the folder
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


# An image in Dagster metadata is stored in every materialization event and sent to every UI
# page that lists materializations: above this size it is embedded as a preview instead.
PREVIEW_MAX_BYTES = 100_000
PREVIEW_WIDTH = 640


def preview_markdown(png: bytes, caption: str) -> str:
    """Markdown for a Dagster metadata entry: the image, then its caption.

    A full-size sky map is 0.4-0.5 MB of PNG, so embedding it whole put ~2 MB into each maps
    materialization (the event log grows by that on every scheduled rerun). Above
    ``PREVIEW_MAX_BYTES`` the image is embedded as a ``PREVIEW_WIDTH``-pixel JPEG (~60 KB);
    the full PNG stays on disk, where the metadata's path entries point. Small figures (ROC
    curve, confusion matrix) are embedded as they are.
    """
    mime = "image/png"
    if len(png) > PREVIEW_MAX_BYTES:
        from PIL import Image

        image = Image.open(io.BytesIO(png)).convert("RGBA")
        flat = Image.new("RGBA", image.size, "white")
        flat.alpha_composite(image)
        flat.thumbnail((PREVIEW_WIDTH, 4 * PREVIEW_WIDTH), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        flat.convert("RGB").save(buffer, "JPEG", quality=85)
        png, mime = buffer.getvalue(), "image/jpeg"
    return f"![{caption}](data:{mime};base64,{base64.b64encode(png).decode('ascii')})\n\n{caption}"


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
    xsize: int = DEFAULT_XSIZE,
    dpi: int = 120,
    cache_dir: Path | None = None,
) -> Path:
    """Mollweide PNG of any dense nested HEALPix array (NaN = no data, drawn grey) with a
    graticule every 30° and a colour bar labelled with ``unit``, written atomically.
    ``coord=["C", "G"]`` draws ICRS pixels in Galactic coordinates (crowded fields then line up
    along the equator); ``norm="log"`` for counts. The projection comes from
    :func:`projection_grid` (cached in ``cache_dir``, default ``<home>/maps/.projection``)."""
    from matplotlib import colormaps, colors, ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    values = np.asarray(values, dtype=np.float64)
    level = int(round(np.log2(values.size / 12) / 2))
    if values.size != 12 * 4**level:
        raise ValueError(f"a dense HEALPix map has 12·4^level values, got {values.size}")
    cache_dir = projection_cache() if cache_dir is None else Path(cache_dir)
    grid = projection_grid(level, xsize, coord, cache_dir)
    finite = values[np.isfinite(values)]
    if norm == "log":
        finite = finite[finite > 0]
    lo = float(finite.min()) if lo is None and finite.size else (0.0 if lo is None else lo)
    hi = float(finite.max()) if hi is None and finite.size else (1.0 if hi is None else hi)
    if hi <= lo:
        lo, hi = lo - 1.0, hi + 1.0
    scale = colors.LogNorm(max(lo, 1e-300), hi) if norm == "log" else colors.Normalize(lo, hi)
    colour_map = colormaps[cmap]

    inside = grid >= 0
    sampled = values[np.where(inside, grid, 0)]
    rgba = colour_map(scale(sampled), bytes=True)
    rgba[inside & ~np.isfinite(sampled)] = BAD_RGBA
    if norm == "log":
        rgba[inside & np.isfinite(sampled) & (sampled <= 0)] = BAD_RGBA
    rgba[~inside] = 0  # transparent: the white figure shows through outside the ellipse

    fig = Figure(figsize=(8.5, 5.4))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.02, 0.17, 0.96, 0.75))
    ax.imshow(rgba, extent=(-2.0, 2.0, -1.0, 1.0), origin="lower", interpolation="nearest")
    graticule = graticule_lines(cache_dir)
    ax.plot(graticule[:, 0], graticule[:, 1], color="black", linewidth=0.6, alpha=0.4)
    ax.set_xlim(-2.0, 2.0)
    ax.set_ylim(-1.0, 1.0)
    ax.set_axis_off()
    # A figure text, not ax.set_title: placing an axes title measures the axes' tight bounding
    # box on every draw (~8 % of a map's drawing time, interleaved A/B).
    fig.text(0.5, 0.935, title, ha="center", va="bottom", fontsize="large")
    bar_ax = fig.add_axes((0.25, 0.09, 0.5, 0.035))
    bar = fig.colorbar(ScalarMappable(norm=scale, cmap=colour_map), cax=bar_ax, orientation="horizontal")
    if norm == "log":
        # Plain "1,000" labels, not matplotlib's mathtext "10^3": its pyparsing packrat cache
        # keeps parse exceptions whose tracebacks hold every calling frame, and with them the
        # caller's tables (a whole copy of the per-pixel statistics) until the cyclic GC runs.
        bar.ax.xaxis.set_major_formatter(
            ticker.FuncFormatter(lambda value, _: f"{value:,.0f}" if value >= 1 else f"{value:g}")
        )
        bar.ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    bar.set_label(unit)
    return _write_png(fig, out, dpi)


FRAMES = {"C": ("ICRS", None), "G": ("Galactic", ["C", "G"])}
"""``--coord`` letter (healpy's) -> the frame a map names in its title and healpy's ``coord``
for drawing ICRS pixels in it."""


def map_title(level: int, quantity: str, sources: int, weighted: bool = False, coord: str = "C") -> str:
    """A map's title: the quantity, the frame it is drawn in (:data:`FRAMES`), the level and
    the number of sources."""
    label = {"pmra": "μα* (pmra)", "pmdec": "μδ (pmdec)", "count": "source count"}[quantity]
    kind = "weighted mean " if weighted and quantity != "count" else ("mean " if quantity != "count" else "")
    components = " (ICRS components)" if coord != "C" and quantity != "count" else ""
    return f"{kind}{label}{components} — {FRAMES[coord][0]}, HEALPix level {level} (nside {nside(level)}), {sources:,} sources"


def render_map(
    table: pa.Table,
    quantity: str,
    out: str | os.PathLike,
    weighted: bool = False,
    coord: str = "C",
    title: str | None = None,
    xsize: int = DEFAULT_XSIZE,
    dpi: int = 120,
    cache_dir: Path | None = None,
) -> Path:
    """Mollweide PNG (nested pixels, astro convention: east to the left, graticule every 30°)
    of one quantity of a dense map table: mean pmra or pmdec on a red/blue scale symmetric
    about zero in mas/yr, or source counts on a log scale. Empty pixels are drawn grey.
    ``coord`` (:data:`FRAMES`) draws the sky in ICRS (``"C"``) or Galactic (``"G"``)
    coordinates, and the title names the frame; pmra/pmdec stay the ICRS components either
    way. Written atomically."""
    if coord not in FRAMES:
        raise ValueError(f"coord must be one of {', '.join(FRAMES)} (ICRS, Galactic), got {coord!r}")
    healpy_coord = FRAMES[coord][1]
    level = pm.stats_level(table)
    column = pm.quantity_column(quantity, weighted)
    values = pm.as_numpy(table.column(column)).astype(np.float64)
    if values.size != 12 * 4**level:
        raise ValueError(
            f"render_map needs a dense map table ({12 * 4**level} pixels), got {values.size} rows"
        )
    if quantity == "count":
        values = np.where(values > 0, values, np.nan)
    lo, hi = colour_limits(values, quantity)
    if title is None:
        title = map_title(level, quantity, int(pm.as_numpy(table.column("n_sources")).sum()), weighted, coord)
    return render_healpix(
        values,
        out,
        title=title,
        unit=pm.quantity_unit(quantity),
        cmap="viridis" if quantity == "count" else "RdBu_r",
        lo=lo,
        hi=hi,
        norm="log" if quantity == "count" else None,
        coord=healpy_coord,
        xsize=xsize,
        dpi=dpi,
        cache_dir=cache_dir,
    )


def png_path(layout: StateLayout, level: int, quantity: str, weighted: bool = False) -> Path:
    """Where the maps asset keeps a rendered map: ``<home>/maps/proper_motion/level-06/pmra.png``."""
    suffix = "_weighted" if weighted and quantity != "count" else ""
    return layout.maps / MAPS_SUBDIR / f"level-{level:02d}" / f"{quantity}{suffix}.png"


def plot(
    level: int,
    quantity: str,
    out: str | os.PathLike,
    weighted: bool = False,
    coord: str = "C",
    layout: StateLayout | None = None,
) -> Path:
    """Re-plot one quantity at one level from stored statistics (what ``gaia-flows map`` draws)."""
    layout = layout or StateLayout.from_env()
    return render_map(
        map_table(level, layout),
        quantity,
        out,
        weighted=weighted,
        coord=coord,
        cache_dir=projection_cache(layout),
    )
