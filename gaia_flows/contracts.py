"""The one loader for ``data_contracts/*.yaml``: the table contracts the code enforces.

A contract is data a person can read and review (names, ECSV datatypes, units, nullability,
valid ranges); the reader, the validator and the Parquet schema are all derived from it, so
code and contract cannot drift apart silently.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import yaml

from gaia_flows.layout import REPO_ROOT
from gaia_flows.science.ecsv import ECSV_DATATYPES

CONTRACTS_DIR = REPO_ROOT / "data_contracts"

ARROW_TYPES: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint8": pa.uint8(),
    "uint16": pa.uint16(),
    "uint32": pa.uint32(),
    "uint64": pa.uint64(),
    "float16": pa.float32(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.string(),
}
_COLUMN_KEYS = {"name", "datatype", "unit", "description", "required", "nullable", "min", "max", "min_exclusive", "max_exclusive"}


class ContractError(ValueError):
    """The contract file itself is malformed."""


@dataclass(frozen=True)
class ColumnContract:
    name: str
    datatype: str
    unit: str | None = None
    description: str | None = None
    required: bool = False
    nullable: bool = True
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False

    @property
    def arrow_type(self) -> pa.DataType:
        return ARROW_TYPES[self.datatype]

    def range_text(self) -> str:
        lo = "(" if self.min_exclusive else "["
        hi = ")" if self.max_exclusive else "]"
        low = "-inf" if self.min is None else f"{self.min:g}"
        high = "inf" if self.max is None else f"{self.max:g}"
        return f"{lo}{low}, {high}{hi}"

    @property
    def has_range(self) -> bool:
        return self.min is not None or self.max is not None


@dataclass(frozen=True)
class TableContract:
    table: str
    primary_key: str
    sort_key: str
    columns: tuple[ColumnContract, ...]
    source: Path

    @functools.cached_property
    def by_name(self) -> dict[str, ColumnContract]:
        return {c.name: c for c in self.columns}

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def required(self) -> list[str]:
        return [c.name for c in self.columns if c.required]

    def arrow_schema(self, names: list[str] | None = None) -> pa.Schema:
        """Schema for the given subset of columns, in the contract's order."""
        wanted = set(names) if names is not None else None
        return pa.schema(
            [pa.field(c.name, c.arrow_type, nullable=c.nullable) for c in self.columns if wanted is None or c.name in wanted]
        )


def _column(entry: dict, where: str) -> ColumnContract:
    if not isinstance(entry, dict) or "name" not in entry or "datatype" not in entry:
        raise ContractError(f"{where}: every column needs 'name' and 'datatype'")
    unknown = set(entry) - _COLUMN_KEYS
    if unknown:
        raise ContractError(f"{where}: column {entry['name']!r} has unknown keys {sorted(unknown)}")
    if entry["datatype"] not in ECSV_DATATYPES:
        raise ContractError(f"{where}: column {entry['name']!r} has unknown datatype {entry['datatype']!r}")
    col = ColumnContract(**entry)
    for bound in (col.min, col.max):
        if bound is not None and not (isinstance(bound, (int, float)) and math.isfinite(bound)):
            raise ContractError(f"{where}: column {col.name!r} has a non-numeric bound {bound!r}")
    return col


@functools.cache
def load_contract(table: str = "gaia_source", directory: Path = CONTRACTS_DIR) -> TableContract:
    path = Path(directory) / f"{table}.yaml"
    try:
        spec = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ContractError(f"no contract for table {table!r} at {path}") from None
    where = str(path)
    if not isinstance(spec, dict) or not isinstance(spec.get("columns"), list):
        raise ContractError(f"{where}: expected a mapping with a 'columns' list")
    columns = tuple(_column(entry, where) for entry in spec["columns"])
    names = [c.name for c in columns]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ContractError(f"{where}: duplicate columns {duplicates}")
    contract = TableContract(
        table=spec.get("table", table),
        primary_key=spec.get("primary_key", "source_id"),
        sort_key=spec.get("sort_key", spec.get("primary_key", "source_id")),
        columns=columns,
        source=path,
    )
    for key in (contract.primary_key, contract.sort_key):
        if key not in contract.by_name:
            raise ContractError(f"{where}: key column {key!r} is not among the columns")
    return contract
