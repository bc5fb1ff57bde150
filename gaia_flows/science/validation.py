"""Enforce the ``gaia_source`` contract on a batch of raw CSV tokens.

Pure pyarrow/numpy so it runs the same in a Spark task, a notebook or a unit test. Every row
comes out either typed and accepted, or with a reason a person can act on (column, offending
token, rule); rows are never dropped silently, which is what lets ingestion prove
``rows in = accepted + rejected``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gaia_flows.science import healpix
from gaia_flows.science.contract import ColumnContract, TableContract
from gaia_flows.science.ecsv import EcsvHeader, GaiaFileError

NULL_TOKENS = ["", "null", "NULL", "Null", "nan", "NaN", "NAN"]
_INT_RE = r"^[+-]?[0-9]+$"
_FLOAT_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"
_TRUE = ["True", "true", "TRUE", "T", "1"]
_FALSE = ["False", "false", "FALSE", "F", "0"]
_INT_BOUNDS = {
    "int8": (-(2**7), 2**7 - 1),
    "int16": (-(2**15), 2**15 - 1),
    "int32": (-(2**31), 2**31 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint8": (0, 2**8 - 1),
    "uint16": (0, 2**16 - 1),
    "uint32": (0, 2**32 - 1),
    "uint64": (0, 2**63 - 1),
}


def check_header(header: EcsvHeader, contract: TableContract, file: str) -> None:
    """File-level agreement between a file's ECSV datatype block and the contract."""
    for column in header.columns:
        expected = contract.by_name.get(column.name)
        if expected is None:
            raise GaiaFileError(file, f"column {column.name!r} is not in the {contract.table} contract ({contract.source.name})")
        if column.datatype != expected.datatype:
            raise GaiaFileError(
                file, f"column {column.name!r} declared as {column.datatype} but the contract says {expected.datatype}"
            )
    missing = [name for name in contract.required if name not in header.names]
    if missing:
        raise GaiaFileError(file, f"required column(s) {missing} missing from the ECSV header")


@dataclass
class Reasons:
    """Per-row rejection reasons, built only for the few failing rows.

    ``values`` holds the human-readable reasons (all failures of a row, joined), ``rules`` a
    short code of the first rule a row broke (``range:ra``), for counting in metadata."""

    size: int

    def __post_init__(self) -> None:
        self.values = np.full(self.size, None, dtype=object)
        self.rules = np.full(self.size, None, dtype=object)

    def add(self, mask: np.ndarray, rule: str, message) -> None:
        """``message`` is a string or a callable(index) -> string for row-specific detail."""
        for i in np.flatnonzero(mask):
            text = message(i) if callable(message) else message
            if self.values[i] is None:
                self.values[i], self.rules[i] = text, rule
            else:
                self.values[i] = f"{self.values[i]}; {text}"

    @property
    def rejected(self) -> np.ndarray:
        return self.rules != None  # noqa: E711 (element-wise on an object array)


def _mask(array: pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(array, False).to_numpy(zero_copy_only=False), dtype=bool)


def _parse_column(tokens: pa.Array, column: ColumnContract, reasons: Reasons) -> pa.Array:
    """Tokens -> typed array; unparseable tokens become null and a reason."""
    tokens = pc.utf8_trim_whitespace(tokens)
    is_null = _mask(pc.is_in(tokens, value_set=pa.array(NULL_TOKENS)))
    present = pc.if_else(pa.array(is_null), pa.scalar(None, pa.string()), tokens)
    kind = column.datatype
    if kind == "string":
        return present
    if kind == "bool":
        true = _mask(pc.is_in(present, value_set=pa.array(_TRUE)))
        false = _mask(pc.is_in(present, value_set=pa.array(_FALSE)))
        bad = ~(true | false | is_null)
        values = pa.array(np.where(true, True, False), mask=is_null | bad)
    else:
        pattern = _FLOAT_RE if kind.startswith("float") else _INT_RE
        target = pa.float64() if kind.startswith("float") else pa.int64()
        try:
            values = pc.cast(present, target)
            bad = np.zeros(len(tokens), dtype=bool)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            ok = _mask(pc.match_substring_regex(present, pattern))
            bad = ~ok & ~is_null
            values = pc.cast(pc.if_else(pa.array(ok), present, pa.scalar(None, pa.string())), target)
        if kind in _INT_BOUNDS:
            lo, hi = _INT_BOUNDS[kind]
            as_int = values.to_numpy(zero_copy_only=False)
            valid = ~np.asarray(pc.is_null(values).to_numpy(zero_copy_only=False), dtype=bool)
            outside = valid & ((np.where(valid, as_int, 0) < lo) | (np.where(valid, as_int, 0) > hi))
            if outside.any():
                reasons.add(outside, f"parse:{column.name}", lambda i: f"{column.name}: {tokens[i].as_py()!r} does not fit {kind}")
                values = pc.if_else(pa.array(outside), pa.scalar(None, target), values)
    if bad.any():
        reasons.add(bad, f"parse:{column.name}", lambda i: f"{column.name}: cannot parse {tokens[i].as_py()!r} as {kind}")
    return pc.cast(values, column.arrow_type)


def _check_column(values: pa.Array, column: ColumnContract, reasons: Reasons, parse_failed: np.ndarray) -> None:
    missing = _mask(pc.is_null(values)) & ~parse_failed
    if not column.nullable and missing.any():
        reasons.add(missing, f"null:{column.name}", f"{column.name}: missing value in non-nullable column")
    if column.datatype in ("string", "bool"):
        return
    arr = pc.fill_null(pc.cast(values, pa.float64(), safe=False), np.nan).to_numpy(zero_copy_only=False)
    present = ~np.isnan(arr)
    infinite = present & ~np.isfinite(arr)
    if infinite.any():
        reasons.add(infinite, f"finite:{column.name}", f"{column.name}: not a finite number")
    if not column.has_range:
        return
    finite = present & ~infinite
    low_ok = True if column.min is None else (arr > column.min if column.min_exclusive else arr >= column.min)
    high_ok = True if column.max is None else (arr < column.max if column.max_exclusive else arr <= column.max)
    outside = finite & ~(low_ok & high_ok)
    if outside.any():
        reasons.add(outside, f"range:{column.name}", lambda i: f"{column.name}: {arr[i]:g} outside {column.range_text()}")


def validate_rows(
    raw: pa.Table, header: EcsvHeader, contract: TableContract, file_range: tuple[int, int]
) -> tuple[pa.Table, Reasons]:
    """Type and check one batch of a Gaia file.

    ``raw`` holds the file's columns as strings, in header order. Returns the typed table (same
    columns, contract types) and the rows' reasons (``None`` = accepted).
    """
    reasons = Reasons(raw.num_rows)
    typed = []
    for column in header.columns:
        spec = contract.by_name[column.name]
        before = reasons.rejected.copy()
        values = _parse_column(raw.column(column.name).combine_chunks(), spec, reasons)
        _check_column(values, spec, reasons, reasons.rejected & ~before)
        typed.append(values)
    table = pa.Table.from_arrays(typed, names=header.names)
    _check_source_ids(table, reasons, file_range)
    return table, reasons


def _check_source_ids(table: pa.Table, reasons: Reasons, file_range: tuple[int, int]) -> None:
    """Gaia-specific rules: the source_id must sit in the file's level-8 range, and its
    level-12 pixel must be the position's pixel or a neighbour (DR3 keeps the pixel where a
    source was first catalogued, so a real row can sit one pixel over; farther is corrupt)."""
    sid_col = table.column("source_id")
    known = ~_mask(pc.is_null(sid_col))
    sid = pc.fill_null(sid_col, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    level8 = healpix.source_id_to_healpix(sid, healpix.FILE_LEVEL)
    start, end = file_range
    outside = known & ((level8 < start) | (level8 > end))
    if outside.any():
        reasons.add(outside, "source_id:file-range", lambda i: f"source_id {sid[i]} lies outside the file's level-8 HEALPix range {start}-{end}")
    ra = pc.fill_null(table.column("ra"), np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    dec = pc.fill_null(table.column("dec"), np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    placed = known & ~outside & np.isfinite(ra) & np.isfinite(dec) & (ra >= 0) & (ra < 360) & (np.abs(dec) <= 90)
    if not placed.any():
        return
    idx = np.flatnonzero(placed)
    encoded = healpix.source_id_to_healpix(sid[idx])
    observed = healpix.radec_to_healpix(ra[idx], dec[idx], healpix.SOURCE_ID_LEVEL)
    far = ~healpix.same_or_neighbour(encoded, observed, healpix.SOURCE_ID_LEVEL)
    if far.any():
        mask = np.zeros(table.num_rows, dtype=bool)
        mask[idx[far]] = True
        reasons.add(
            mask,
            "source_id:position",
            lambda i: f"source_id {sid[i]} encodes level-12 pixel {sid[i] >> 35} but (ra, dec) = ({ra[i]:.6f}, {dec[i]:.6f}) "
            "is neither in it nor a neighbour",
        )


def home_regions(source_id: pa.Array, file_range: tuple[int, int], level: int = healpix.REGION_LEVEL) -> np.ndarray:
    """Region that answers for each row: its source_id's region when the source_id is usable
    and inside the file's range, else the region of the file's first pixel. Every row gets
    exactly one region, so per-region counts add up to the file's rows."""
    fallback = int(healpix.degrade(file_range[0], healpix.FILE_LEVEL, level))
    known = ~_mask(pc.is_null(source_id))
    sid = pc.fill_null(source_id, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    level8 = healpix.source_id_to_healpix(sid, healpix.FILE_LEVEL)
    usable = known & (level8 >= file_range[0]) & (level8 <= file_range[1])
    return np.where(usable, healpix.degrade(level8, healpix.FILE_LEVEL, level), fallback).astype(np.int64)
