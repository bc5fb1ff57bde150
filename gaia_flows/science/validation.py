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
_FLOAT_MAX = {
    "float16": float(np.finfo(np.float32).max),
    "float32": float(np.finfo(np.float32).max),
}  # contract float16 is stored as float32


def datatype_kind(datatype: str) -> str:
    """``"integer"`` for every signed and unsigned width, ``"float"`` for every float width,
    else the datatype itself (``bool``, ``string``)."""
    if "int" in datatype:
        return "integer"
    return "float" if datatype.startswith("float") else datatype


def check_header(header: EcsvHeader, contract: TableContract, file: str) -> None:
    """File-level agreement between a file's ECSV datatype block and the contract.

    A declared type of the contract's kind but another width is accepted: the Gaia archive's
    ECSV exports declare byte columns ``int16`` where the bulk files say ``int8``. Every value
    is parsed and range-checked against the contract's type row by row (:func:`validate_rows`),
    so a value the contract type cannot hold is quarantined with its reason, never truncated.
    A different kind (text where a number is expected) is a file error naming the column.
    """
    for column in header.columns:
        expected = contract.by_name.get(column.name)
        if expected is None:
            raise GaiaFileError(
                file,
                f"column {column.name!r} is not in the {contract.table} contract ({contract.source.name})",
            )
        if datatype_kind(column.datatype) != datatype_kind(expected.datatype):
            raise GaiaFileError(
                file,
                f"column {column.name!r} declared as {column.datatype} but the contract says {expected.datatype}",
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
        self._rejected = np.zeros(
            self.size, dtype=bool
        )  # rules != None, kept as booleans: asked once per column

    def add(self, mask: np.ndarray, rule: str, message) -> None:
        """``message`` is a string or a callable(index) -> string for row-specific detail."""
        for i in np.flatnonzero(mask):
            text = message(i) if callable(message) else message
            if self.values[i] is None:
                self.values[i], self.rules[i] = text, rule
            else:
                self.values[i] = f"{self.values[i]}; {text}"
        self._rejected |= np.asarray(mask, dtype=bool)

    @property
    def rejected(self) -> np.ndarray:
        return self._rejected.copy()


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
                reasons.add(
                    outside,
                    f"parse:{column.name}",
                    lambda i: f"{column.name}: {tokens[i].as_py()!r} does not fit {kind}",
                )
                values = pc.if_else(pa.array(outside), pa.scalar(None, target), values)
        if kind in _FLOAT_MAX:
            as_float = np.abs(pc.fill_null(values, 0.0).to_numpy(zero_copy_only=False))
            outside = np.isfinite(as_float) & (as_float > _FLOAT_MAX[kind])
            if outside.any():
                reasons.add(
                    outside,
                    f"parse:{column.name}",
                    lambda i: f"{column.name}: {tokens[i].as_py()!r} does not fit {kind}",
                )
                values = pc.if_else(pa.array(outside), pa.scalar(None, target), values)
    if bad.any():
        reasons.add(
            bad,
            f"parse:{column.name}",
            lambda i: f"{column.name}: cannot parse {tokens[i].as_py()!r} as {kind}",
        )
    return pc.cast(values, column.arrow_type)


def _check_column(
    values: pa.Array, column: ColumnContract, reasons: Reasons, parse_failed: np.ndarray
) -> None:
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
    high_ok = (
        True if column.max is None else (arr < column.max if column.max_exclusive else arr <= column.max)
    )
    outside = finite & ~(low_ok & high_ok)
    if outside.any():
        reasons.add(
            outside,
            f"range:{column.name}",
            lambda i: f"{column.name}: {arr[i]:g} outside {column.range_text()}",
        )


def validate_rows(
    raw: pa.Table, header: EcsvHeader, contract: TableContract, file_range: tuple[int, int]
) -> tuple[pa.Table, Reasons]:
    """Type and check one batch of a Gaia file.

    ``raw`` holds the file's columns in header order, as strings, or already converted by a
    reader that accepts only tokens :func:`_parse_column` would accept with the same value (the
    ingestion's typed CSV pass); converted columns are only cast to the contract type. Returns
    the typed table (same columns, contract types) and the rows' reasons (``None`` = accepted).
    """
    reasons = Reasons(raw.num_rows)
    typed = []
    for column in header.columns:
        spec = contract.by_name[column.name]
        before = reasons.rejected.copy()
        tokens = raw.column(column.name).combine_chunks()
        values = (
            _parse_column(tokens, spec, reasons)
            if pa.types.is_string(tokens.type)
            else pc.cast(tokens, spec.arrow_type)
        )
        _check_column(values, spec, reasons, reasons.rejected & ~before)
        typed.append(values)
    table = pa.Table.from_arrays(typed, names=header.names)
    _check_source_ids(table, reasons, file_range)
    return table, reasons


SOURCE_ID_SPAN_YEARS = 20.0
"""Years a source may have moved between the creation of its ``source_id`` and the DR3
reference epoch J2016.0, for :func:`_check_source_ids`.

A DR3 ``source_id`` keeps the level-12 pixel of the position where the source record was
created ("the source_id is assigned at the moment of the creation of the source record, but
its position ... can be modified later": Gaia DR3 documentation, §13.2.4 Data partitioning).
Gaia DR2's validation (documentation §10.2.1 Source identifiers) finds sources normally
within 0.015° of the encoded pixel's centre, and the exceptions "largely due to high proper
motion stars having moved to a neighbouring HEALPix either since the epoch for the input
catalogue prepared before launch or since their first observation". That input catalogue is
the Initial Gaia Source List (Smart & Nicastro 2014, A&A 570, A87), whose positions are at
epoch J2000 (Gaia DR1 data model, ``igsl_source.ra``). J2000.0 to J2016.0 is 16 years;
4 years of margin (25 %) cover input positions that came from older plates. Barnard's star
(DR3 4472832130942575872, 10.4″/yr) sits 157″ from its encoded pixel's centre: 15 years of
its motion."""


def _proper_motion_total(table: pa.Table) -> np.ndarray:
    """Total proper motion [mas/yr] of each row: √(pmra² + pmdec²), or the ``pm`` column where
    the components are absent; NaN where the row (or the file) has none."""

    def column(name: str) -> np.ndarray:
        if name not in table.column_names:
            return np.full(table.num_rows, np.nan)
        return pc.fill_null(table.column(name).cast(pa.float64()), np.nan).to_numpy(zero_copy_only=False)

    total = np.hypot(column("pmra"), column("pmdec"))
    return np.where(np.isfinite(total), total, column("pm"))


def allowed_offset(pm_total) -> np.ndarray:
    """Largest distance [degrees] a row may sit from the centre of its source_id's level-12 pixel.

    The pixel's own radius plus the row's total proper motion over
    :data:`SOURCE_ID_SPAN_YEARS`; at least twice the pixel radius (the reach of the pixel's
    neighbours), which is also the allowance of a row without a proper motion.
    """
    radius = healpix.max_pixel_radius(healpix.SOURCE_ID_LEVEL)
    motion = np.nan_to_num(np.asarray(pm_total, dtype=np.float64), nan=0.0) * SOURCE_ID_SPAN_YEARS / 3.6e6
    return np.maximum(radius + motion, 2.0 * radius)


def _check_source_ids(table: pa.Table, reasons: Reasons, file_range: tuple[int, int]) -> None:
    """Gaia-specific rules: the source_id must sit in the file's level-8 range, and the position
    must lie within :func:`allowed_offset` of the centre of the level-12 pixel the source_id
    encodes (the pixel where the source was first catalogued, so a fast star has moved on;
    farther than its motion explains is corrupt)."""
    sid_col = table.column("source_id")
    known = ~_mask(pc.is_null(sid_col))
    sid = pc.fill_null(sid_col, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    level8 = healpix.source_id_to_healpix(sid, healpix.FILE_LEVEL)
    start, end = file_range
    outside = known & ((level8 < start) | (level8 > end))
    if outside.any():
        reasons.add(
            outside,
            "source_id:file-range",
            lambda i: f"source_id {sid[i]} lies outside the file's level-8 HEALPix range {start}-{end}",
        )
    ra = pc.fill_null(table.column("ra"), np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    dec = pc.fill_null(table.column("dec"), np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    placed = (
        known & ~outside & np.isfinite(ra) & np.isfinite(dec) & (ra >= 0) & (ra < 360) & (np.abs(dec) <= 90)
    )
    if not placed.any():
        return
    idx = np.flatnonzero(placed)
    encoded = healpix.source_id_to_healpix(sid[idx])
    # A row inside its encoded pixel is within the pixel radius: only the others are measured.
    moved = encoded != healpix.radec_to_healpix(ra[idx], dec[idx], healpix.SOURCE_ID_LEVEL)
    if not moved.any():
        return
    idx, encoded = idx[moved], encoded[moved]
    offset = np.zeros(table.num_rows)
    offset[idx] = healpix.distance_to_centre(encoded, healpix.SOURCE_ID_LEVEL, ra[idx], dec[idx])
    allowed = allowed_offset(_proper_motion_total(table))
    far = offset > allowed
    if far.any():
        reasons.add(
            far,
            "source_id:position",
            lambda i: (
                f'source_id {sid[i]} encodes level-12 pixel {sid[i] >> 35} whose centre is {offset[i] * 3600:.1f}" from '
                f'(ra, dec) = ({ra[i]:.6f}, {dec[i]:.6f}); its proper motion allows {allowed[i] * 3600:.1f}"'
            ),
        )


def home_regions(
    source_id: pa.Array, file_range: tuple[int, int], level: int = healpix.REGION_LEVEL
) -> np.ndarray:
    """Region that answers for each row: its source_id's region when the source_id is usable
    and inside the file's range, else the region of the file's first pixel. Every row gets
    exactly one region, so per-region counts add up to the file's rows."""
    fallback = int(healpix.degrade(file_range[0], healpix.FILE_LEVEL, level))
    known = ~_mask(pc.is_null(source_id))
    sid = pc.fill_null(source_id, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    level8 = healpix.source_id_to_healpix(sid, healpix.FILE_LEVEL)
    usable = known & (level8 >= file_range[0]) & (level8 <= file_range[1])
    return np.where(usable, healpix.degrade(level8, healpix.FILE_LEVEL, level), fallback).astype(np.int64)
