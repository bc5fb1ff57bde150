"""Mean proper motion per HEALPix pixel from *mergeable* sufficient statistics.

Pure numpy/pyarrow: no Spark, no Dagster. The Spark engine (``gaia_flows.engine.pm_stats``)
produces tables with exactly these columns; everything downstream — merging regions,
degrading to a coarser level, finalising means — happens here on small tables.

A statistics table has one row per *non-empty* nested pixel at its level (kept in the schema
metadata as ``healpix_level``) and these columns::

    pixel          int64    nested HEALPix index at the table's level
    n_sources      int64    all rows in the pixel
    n_pm           int64    rows with a proper motion (pmra and pmdec both present)
    sum_pmra       float64  Σ pmra            over the n_pm rows   [mas/yr]
    sum_pmdec      float64  Σ pmdec
    sum_pmra2      float64  Σ pmra²                                [mas²/yr²]
    sum_pmdec2     float64  Σ pmdec²
    sumw_pmra      float64  Σ w,        w = 1/pmra_error²  (rows with a usable error)
    sumw_pmdec     float64  Σ w,        w = 1/pmdec_error²
    sumwx_pmra     float64  Σ w·pmra
    sumwx_pmdec    float64  Σ w·pmdec
    sumwx2_pmra    float64  Σ w·pmra²
    sumwx2_pmdec   float64  Σ w·pmdec²
    sumw2_pmra     float64  Σ w²      (Kish's effective sample size (Σw)²/Σw²)
    sumw2_pmdec    float64  Σ w²

Every column is a plain sum, so the statistics of a union of rows are the column sums of the
parts (``merge``) and the statistics of a parent pixel are the sums over its children
(``degrade``: nested index >> 2 bits per level). Sources without a proper motion (Gaia
2-parameter solutions, ``pmra``/``pmdec`` null) count in ``n_sources`` only: they are never
averaged in as zero. A weight needs a finite error > 0; a proper motion with a missing error
still enters the plain mean but not the weighted one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gaia_flows.science.healpix import MAX_LEVEL, SOURCE_ID_LEVEL, npix, source_id_shift

DEFAULT_LEVEL = 8
LEVEL_METADATA_KEY = b"healpix_level"

COUNT_COLUMNS = ("n_sources", "n_pm")
SUM_COLUMNS = (
    "sum_pmra",
    "sum_pmdec",
    "sum_pmra2",
    "sum_pmdec2",
    "sumw_pmra",
    "sumw_pmdec",
    "sumwx_pmra",
    "sumwx_pmdec",
    "sumwx2_pmra",
    "sumwx2_pmdec",
    "sumw2_pmra",
    "sumw2_pmdec",
)
STAT_COLUMNS = COUNT_COLUMNS + SUM_COLUMNS
STATS_FIELDS = [pa.field("pixel", pa.int64(), nullable=False)]
STATS_FIELDS += [pa.field(name, pa.int64(), nullable=False) for name in COUNT_COLUMNS]
STATS_FIELDS += [pa.field(name, pa.float64(), nullable=False) for name in SUM_COLUMNS]

# Columns of the finalised map table (one row per pixel).
QUANTITIES = {
    "pmra": ("mean_pmra", "wmean_pmra", "mas/yr"),
    "pmdec": ("mean_pmdec", "wmean_pmdec", "mas/yr"),
    "count": ("n_sources", "n_sources", "sources"),
}
# Rows a statistics table reads from gaia_source.
INPUT_COLUMNS = ("source_id", "pmra", "pmdec", "pmra_error", "pmdec_error")
REQUIRED_COLUMNS = INPUT_COLUMNS[:3]  # without the errors, sources just carry no weight


def as_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Read-only numpy view of a numeric Arrow column without nulls (copied if it has nulls or
    several chunks). Through DLPack, because pyarrow's ``to_numpy`` imports pandas, which costs
    a re-plot more (0.3-0.7 s) than reading and finalising the map."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if (
        column.null_count
        or not chunks
        or not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type))
    ):
        return column.to_numpy(zero_copy_only=False)
    arrays = [np.from_dlpack(chunk) for chunk in chunks]
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


_NUMPY_TYPES = {pa.int8(): np.int8, pa.int64(): np.int64, pa.float64(): np.float64}


def from_numpy(values: np.ndarray, dtype: pa.DataType) -> pa.Array:
    """Arrow array over a numpy buffer without nulls (NaN stays a NaN value): the inverse of
    :func:`as_numpy`, also pandas-free, where ``pa.array`` would import pandas to inspect it."""
    values = np.ascontiguousarray(values, dtype=_NUMPY_TYPES[dtype])
    return pa.Array.from_buffers(dtype, len(values), [None, pa.py_buffer(values)])


class StaleStatisticsError(ValueError):
    """A stored statistics table lacks columns this version computes (it was written by an older
    gaia-flows): its maps would be wrong, so it is rebuilt, never read."""


def check_stats_columns(names, where: str) -> None:
    """Raise :class:`StaleStatisticsError`, naming ``where`` and the columns, if ``names`` (a
    stored table's column names) lack any statistics column."""
    missing = [field.name for field in STATS_FIELDS if field.name not in set(names)]
    if missing:
        raise StaleStatisticsError(
            f"{where} has no {', '.join(missing)}: it was written by an older gaia-flows; "
            "re-materialize pm_stats (every region) and then proper_motion_maps to rebuild it"
        )


def stats_schema(level: int) -> pa.Schema:
    """Arrow schema of a statistics table at ``level`` (the level travels in the metadata)."""
    _check_level(level)
    return pa.schema(STATS_FIELDS, metadata={LEVEL_METADATA_KEY: str(level).encode()})


def stats_level(stats: pa.Table) -> int:
    """HEALPix level a statistics table was computed at."""
    meta = stats.schema.metadata or {}
    if LEVEL_METADATA_KEY not in meta:
        raise ValueError("not a proper-motion statistics table: schema metadata has no healpix_level")
    return int(meta[LEVEL_METADATA_KEY])


def _check_level(level: int) -> None:
    if not 0 <= int(level) <= MAX_LEVEL:
        raise ValueError(f"HEALPix level must be between 0 and {MAX_LEVEL}, got {level}")


def empty_stats(level: int) -> pa.Table:
    return stats_schema(level).empty_table()


def stats_table(pixel: np.ndarray, columns: dict[str, np.ndarray], level: int) -> pa.Table:
    """Build a statistics table from arrays (sorted by pixel by the caller)."""
    arrays = [pa.array(np.asarray(pixel, dtype=np.int64))]
    for field in STATS_FIELDS[1:]:
        dtype = np.int64 if pa.types.is_integer(field.type) else np.float64
        arrays.append(pa.array(np.asarray(columns[field.name], dtype=dtype)))
    return pa.Table.from_arrays(arrays, schema=stats_schema(level))


def conform(table: pa.Table, level: int) -> pa.Table:
    """Cast an engine result (Spark ``toArrow``, DuckDB, ...) to the statistics schema, sorted
    by pixel, with the level recorded. Nulls (sums over no rows) become 0.

    In Arrow, column by column: the only full copy is the sort's, so the driver holds the
    collected result and one sorted copy, not the numpy round trips on top."""
    missing = [f.name for f in STATS_FIELDS if f.name not in table.column_names]
    if missing:
        raise ValueError(f"statistics table lacks column(s) {missing}")
    columns = []
    for field in STATS_FIELDS:
        column = table.column(field.name)
        if column.null_count:
            column = pc.fill_null(column, 0)
        columns.append(column.cast(field.type))
    conformed = pa.Table.from_arrays(columns, schema=stats_schema(level))
    pixel = as_numpy(conformed.column("pixel"))
    if np.any(pixel[1:] < pixel[:-1]):
        conformed = conformed.sort_by("pixel")  # keeps the schema metadata (the level)
    return conformed


# --- computing statistics from rows (numpy; the Spark engine does the same in SQL) ------------


BLOCK_ROWS = 65_536
"""Rows whose per-row terms are computed and summed together. The thirteen terms of a block
(6.8 MB) stay in the CPU cache between being computed and being summed, where whole-column
temporaries would make every term a trip to memory (and to freshly mapped pages)."""


def _as_float(values) -> np.ndarray:
    """Arrow/pandas/numpy column as a float array (float32 kept, not copied to float64) with
    NaN for null."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        if not pa.types.is_floating(values.type):
            values = values.cast(pa.float64())
        return values.to_numpy(zero_copy_only=False)
    values = np.asarray(values)
    return values if values.dtype.kind == "f" else values.astype(np.float64)


def _weights(error: np.ndarray, has_pm: np.ndarray, out: np.ndarray) -> np.ndarray:
    """1/σ² into ``out`` where a row has a proper motion and a finite error > 0, else 0."""
    usable = (error > 0) & (error < np.inf)  # False for NaN
    usable &= has_pm
    np.multiply(error, error, out=out, dtype=np.float64)
    np.divide(1.0, out, out=out, where=usable)
    out[~usable] = 0.0
    return out


def stats_from_columns(
    source_id, pmra, pmdec, pmra_error, pmdec_error, level: int = DEFAULT_LEVEL, block_rows: int = BLOCK_ROWS
) -> pa.Table:
    """Statistics of rows given as arrays (null/NaN proper motion = no proper motion), summed
    :data:`BLOCK_ROWS` rows at a time."""
    _check_level(level)
    sid = np.asarray(
        source_id.to_numpy() if isinstance(source_id, (pa.Array, pa.ChunkedArray)) else source_id,
        dtype=np.int64,
    )
    pixel = sid >> source_id_shift(level)
    inputs = [_as_float(v) for v in (pmra, pmdec, pmra_error, pmdec_error)]
    if pixel.size == 0:
        return empty_stats(level)
    if np.any(pixel[1:] < pixel[:-1]):
        order = np.argsort(pixel, kind="stable")
        pixel, inputs = pixel[order], [v[order] for v in inputs]
    terms = np.empty((len(STAT_COLUMNS) - 1, min(block_rows, pixel.size)))  # every column but n_sources
    n_pm, ra, dec, ra2, dec2, w_ra, w_dec, wx_ra, wx_dec, wx2_ra, wx2_dec, w2_ra, w2_dec = range(len(terms))
    pixels, runs, sums = [], [], []
    for lo in range(0, pixel.size, block_rows):
        part = pixel[lo : lo + block_rows]
        t = terms[:, : part.size]
        pmra_b, pmdec_b, pmra_error_b, pmdec_error_b = (v[lo : lo + block_rows] for v in inputs)
        has_pm = np.isfinite(pmra_b)
        has_pm &= np.isfinite(pmdec_b)
        t[n_pm] = has_pm
        np.copyto(t[ra], pmra_b)
        np.copyto(t[dec], pmdec_b)
        t[ra : dec + 1, ~has_pm] = 0.0
        np.multiply(t[ra], t[ra], out=t[ra2])
        np.multiply(t[dec], t[dec], out=t[dec2])
        _weights(pmra_error_b, has_pm, t[w_ra])
        _weights(pmdec_error_b, has_pm, t[w_dec])
        np.multiply(t[w_ra], t[ra], out=t[wx_ra])
        np.multiply(t[w_dec], t[dec], out=t[wx_dec])
        np.multiply(t[wx_ra], t[ra], out=t[wx2_ra])
        np.multiply(t[wx_dec], t[dec], out=t[wx2_dec])
        np.multiply(t[w_ra], t[w_ra], out=t[w2_ra])
        np.multiply(t[w_dec], t[w_dec], out=t[w2_dec])
        starts = np.flatnonzero(np.r_[True, part[1:] != part[:-1]])
        pixels.append(part[starts])
        runs.append(np.diff(np.r_[starts, part.size]))
        sums.append(np.add.reduceat(t, starts, axis=1))
    summed = np.concatenate(sums, axis=1)
    columns = {
        "n_sources": np.concatenate(runs),
        "n_pm": np.rint(summed[n_pm]).astype(np.int64),
        **dict(zip(SUM_COLUMNS, summed[ra:])),
    }
    return _group_sum(
        np.concatenate(pixels), columns, level
    )  # sums again the pixels whose rows ran across blocks


def stats_from_table(table: pa.Table, level: int = DEFAULT_LEVEL) -> pa.Table:
    """Statistics of a gaia_source-shaped Arrow table."""
    source_id, pmra, pmdec, pmra_error, pmdec_error = (table.column(name) for name in INPUT_COLUMNS)
    return stats_from_columns(source_id, pmra, pmdec, pmra_error, pmdec_error, level=level)


def _group_sum(pixel: np.ndarray, columns: dict[str, np.ndarray], level: int) -> pa.Table:
    """Sum every column per pixel; rows need not be sorted."""
    if pixel.size == 0:
        return empty_stats(level)
    if np.any(pixel[1:] < pixel[:-1]):
        order = np.argsort(pixel, kind="stable")
        pixel = pixel[order]
        columns = {k: v[order] for k, v in columns.items()}
    starts = np.flatnonzero(np.r_[True, pixel[1:] != pixel[:-1]])
    return stats_table(pixel[starts], {k: np.add.reduceat(v, starts) for k, v in columns.items()}, level)


# --- merging and degrading --------------------------------------------------------------------


def merge(tables: Iterable[pa.Table], level: int | None = None) -> pa.Table:
    """Statistics of the union of the rows behind ``tables``.

    All tables are brought to ``level`` (default: the coarsest level among them) by the nested
    right shift, then summed per pixel.
    """
    tables = list(tables)
    if not tables:
        if level is None:
            raise ValueError("merge() of no tables needs an explicit level")
        return empty_stats(level)
    levels = [stats_level(t) for t in tables]
    target = min(levels) if level is None else level
    if target > min(levels):
        raise ValueError(f"cannot merge to level {target}: the coarsest input is level {min(levels)}")
    non_empty = [t.replace_schema_metadata(None) for t in tables if t.num_rows]
    if not non_empty:
        return empty_stats(target)
    combined = pa.concat_tables(non_empty)
    pixel = combined.column("pixel").to_numpy()
    shifts = np.concatenate(
        [
            np.full(t.num_rows, 2 * (lv - target), dtype=np.int64)
            for t, lv in zip(tables, levels)
            if t.num_rows
        ]
    )
    pixel = pixel >> shifts
    if np.all(pixel[1:] > pixel[:-1]):
        # Disjoint inputs in pixel order (the sky regions' tables, in region order): already
        # one row per pixel, nothing to sum.
        # The other columns stay the inputs' chunks (no copy of the merged table).
        return pa.Table.from_arrays(
            [from_numpy(pixel, pa.int64()), *combined.columns[1:]], schema=stats_schema(target)
        )
    columns = {name: combined.column(name).to_numpy() for name in STAT_COLUMNS}
    return _group_sum(pixel, columns, target)


def degrade(stats: pa.Table, to_level: int) -> pa.Table:
    """Statistics of the parent pixels at the coarser ``to_level``."""
    from_level = stats_level(stats)
    _check_level(to_level)
    if to_level > from_level:
        raise ValueError(f"cannot degrade level-{from_level} statistics to finer level {to_level}")
    if to_level == from_level:
        return stats
    return merge([stats], level=to_level)


def pyramid(stats: pa.Table, levels: Sequence[int] | None = None) -> pa.Table:
    """Statistics at every level in ``levels`` (default 0..level of ``stats``) stacked into one
    table with a leading ``level`` column, sorted by (level, pixel): the all-sky store that any
    map is cut from."""
    top = stats_level(stats)
    levels = sorted(set(range(top + 1) if levels is None else levels), reverse=True)
    if not levels or levels[0] > top or levels[-1] < 0:
        raise ValueError(f"pyramid levels must lie in 0..{top}, got {levels}")
    parts = []
    current = stats
    for lv in levels:  # finest first: each level is degraded from the previous one, not from the top
        current = degrade(current, lv)
        level_col = pa.array(np.full(current.num_rows, lv, dtype=np.int8))
        parts.append(current.replace_schema_metadata(None).add_column(0, "level", level_col))
    stacked = pa.concat_tables(parts[::-1])
    return stacked.replace_schema_metadata({LEVEL_METADATA_KEY: str(top).encode()})


def from_pyramid(stacked: pa.Table, level: int) -> pa.Table:
    """Cut the statistics of one level out of a ``pyramid`` table."""
    top = stats_level(stacked)
    if level > top:
        raise ValueError(f"level {level} is finer than the stored statistics (level {top})")
    rows = np.flatnonzero(as_numpy(stacked.column("level")) == level)
    if rows.size and rows[-1] - rows[0] + 1 == rows.size:  # a pyramid is sorted by level: a zero-copy slice
        part = stacked.slice(int(rows[0]), int(rows.size))
    else:
        part = stacked.take(pa.array(rows))
    return part.drop_columns(["level"]).cast(stats_schema(level))


# --- finalising: means, weighted means, dispersions --------------------------------------------

MAP_FIELDS = [
    ("pixel", pa.int64()),
    ("n_sources", pa.int64()),
    ("n_pm", pa.int64()),
    ("n_no_pm", pa.int64()),
    ("mean_pmra", pa.float64()),
    ("mean_pmdec", pa.float64()),
    ("std_pmra", pa.float64()),
    ("std_pmdec", pa.float64()),
    ("sem_pmra", pa.float64()),
    ("sem_pmdec", pa.float64()),
    ("wmean_pmra", pa.float64()),
    ("wmean_pmdec", pa.float64()),
    ("wmean_pmra_measurement_error", pa.float64()),
    ("wmean_pmdec_measurement_error", pa.float64()),
    ("wmean_pmra_total_error", pa.float64()),
    ("wmean_pmdec_total_error", pa.float64()),
    ("neff_pmra", pa.float64()),
    ("neff_pmdec", pa.float64()),
    ("wstd_pmra", pa.float64()),
    ("wstd_pmdec", pa.float64()),
]


def _safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def finalise(stats: pa.Table, dense: bool = True) -> pa.Table:
    """Per-pixel map quantities from statistics.

    ``dense=True`` gives one row for every one of the 12·4^level pixels (what healpy plots);
    pixels without sources have counts 0 and NaN for every mean — never uninitialised memory.
    ``dense=False`` keeps only the pixels that have sources. Columns, per component (``*`` =
    ``pmra`` or ``pmdec``, all in mas/yr):

    - ``n_sources``, ``n_pm``, ``n_no_pm`` (sources without a proper motion);
    - ``mean_*``: plain mean over the ``n_pm`` sources; ``std_*``: sample standard deviation
      (NaN below 2 sources); ``sem_*`` = std/√n, the uncertainty of the plain mean;
    - ``wmean_*``: inverse-variance weighted mean (w = 1/error²);
    - ``wmean_*_measurement_error`` = 1/√Σw: the weighted mean's error *if every star moved
      exactly alike*, i.e. from the measurement errors alone;
    - ``neff_*`` = (Σw)²/Σw²: Kish's effective number of stars behind the weighted mean;
    - ``wstd_*`` = √(Σw·x²/Σw − wmean²): the weighted spread;
    - ``wmean_*_total_error`` = wstd/√(neff − 1): the weighted mean's uncertainty from the
      scatter actually seen, intrinsic velocity dispersion included (NaN for neff ≤ 1).

    Which to use: the plain mean with ``sem_*`` is the default map and answers "how does the
    population in this pixel move"; its uncertainty includes the stars' real spread. Inside a
    pixel the spread of stellar velocities (several mas/yr) usually dwarfs DR3's errors, so the
    weighted mean is dominated by the few most precise (bright, nearby) stars: ``neff_*`` says
    how few, and ``wmean_*_total_error`` is then larger than ``sem_*``. Quote
    ``wmean_*_total_error`` for a weighted mean; ``wmean_*_measurement_error`` only bounds what
    the measurements alone allow and is far too small wherever stars differ (a pixel of 2,000
    stars with a 6 mas/yr dispersion: 0.0015 against a real scatter of ~0.5 mas/yr).
    """
    level = stats_level(stats)
    pixel = as_numpy(stats.column("pixel"))
    if pixel.size > 1 and np.any(np.diff(pixel) <= 0):
        stats = merge([stats])  # unsorted or repeated pixels: sum them first
        pixel = as_numpy(stats.column("pixel"))
    col = {name: as_numpy(stats.column(name)) for name in STAT_COLUMNS}
    if dense:
        size = npix(level)
        full = {}
        for name, values in col.items():
            full[name] = np.zeros(size, dtype=values.dtype)
            full[name][pixel] = values
        col = full
        pixel = np.arange(size, dtype=np.int64)
    n = col["n_pm"].astype(np.float64)
    out = {
        "pixel": pixel,
        "n_sources": col["n_sources"],
        "n_pm": col["n_pm"],
        "n_no_pm": col["n_sources"] - col["n_pm"],
    }
    for comp in ("pmra", "pmdec"):
        s1, s2 = col[f"sum_{comp}"], col[f"sum_{comp}2"]
        mean = _safe_div(s1, n)
        # Σ(x-mean)² = Σx² - (Σx)²/n; clip the rounding residue of a constant pixel at 0.
        ss = np.maximum(s2 - _safe_div(s1 * s1, n), 0.0)
        std = np.sqrt(_safe_div(ss, n - 1))
        sw, swx, swx2 = col[f"sumw_{comp}"], col[f"sumwx_{comp}"], col[f"sumwx2_{comp}"]
        wmean = _safe_div(swx, sw)
        out[f"mean_{comp}"] = mean
        out[f"std_{comp}"] = std
        out[f"sem_{comp}"] = _safe_div(std, np.sqrt(n))
        out[f"wmean_{comp}"] = wmean
        wvar = np.maximum(_safe_div(swx2, sw) - wmean * wmean, 0.0)
        neff = _safe_div(sw * sw, col[f"sumw2_{comp}"])
        out[f"wmean_{comp}_measurement_error"] = _safe_div(np.ones_like(sw), np.sqrt(sw))
        # wvar·neff/(neff-1) is the unbiased weighted variance (reliability weights); divided
        # by neff it is the variance of the weighted mean. Equal weights give std²/n exactly.
        out[f"wmean_{comp}_total_error"] = np.sqrt(_safe_div(wvar, neff - 1.0))
        out[f"neff_{comp}"] = neff
        out[f"wstd_{comp}"] = np.sqrt(wvar)
    schema = pa.schema(
        [pa.field(name, typ) for name, typ in MAP_FIELDS], metadata={LEVEL_METADATA_KEY: str(level).encode()}
    )
    return pa.Table.from_arrays([from_numpy(out[name], typ) for name, typ in MAP_FIELDS], schema=schema)


def quantity_column(quantity: str, weighted: bool = False) -> str:
    """Map-table column behind a plotted quantity (``pmra``, ``pmdec``, ``count``)."""
    if quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r}; choose from {sorted(QUANTITIES)}")
    plain, weighted_col, _ = QUANTITIES[quantity]
    return weighted_col if weighted else plain


def quantity_unit(quantity: str) -> str:
    return QUANTITIES[quantity][2]


def totals(stats: pa.Table) -> dict[str, int]:
    """Total counts of a statistics table (for checks and metadata)."""
    return {name: int(pc.sum(stats.column(name)).as_py() or 0) for name in COUNT_COLUMNS} | {
        "pixels": stats.num_rows
    }


__all__ = [
    "DEFAULT_LEVEL",
    "INPUT_COLUMNS",
    "QUANTITIES",
    "SOURCE_ID_LEVEL",
    "STAT_COLUMNS",
    "StaleStatisticsError",
    "conform",
    "degrade",
    "empty_stats",
    "as_numpy",
    "check_stats_columns",
    "finalise",
    "from_numpy",
    "from_pyramid",
    "merge",
    "pyramid",
    "quantity_column",
    "quantity_unit",
    "stats_from_columns",
    "stats_from_table",
    "stats_level",
    "stats_schema",
    "totals",
]
