"""A table contract as data: columns with ECSV datatypes, units, nullability and valid ranges.

Plain frozen dataclasses, so the pure code (validation, the synthetic generator) takes a
contract as an argument; :func:`gaia_flows.contracts.load_contract` builds one from
``data_contracts/<table>.yaml``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

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
            [
                pa.field(c.name, c.arrow_type, nullable=c.nullable)
                for c in self.columns
                if wanted is None or c.name in wanted
            ]
        )
