"""The one loader for ``data_contracts/*.yaml``: the table contracts the code enforces, one
file per table and data release (``gaia_source_dr3.yaml``; a further release's contract sits
beside it, see :mod:`gaia_flows.releases`).

A contract is data a person can read and review (names, ECSV datatypes, units, nullability,
valid ranges); the reader, the validator and the Parquet schema are all derived from it, so
code and contract cannot drift apart silently. The contract objects themselves
(:mod:`gaia_flows.science.contract`) are plain dataclasses; this module reads and checks the
YAML and builds them.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import yaml

from gaia_flows.layout import (
    CONTRACTS_PACKAGE_DIR,
    DEFAULT_RELEASE,
    SOURCE_TABLE,
    contract_file_name,
    package_data,
)
from gaia_flows.science.contract import ColumnContract, TableContract
from gaia_flows.science.ecsv import ECSV_DATATYPES

CONTRACTS_DIR = package_data(CONTRACTS_PACKAGE_DIR)

_COLUMN_KEYS = {
    "name",
    "datatype",
    "unit",
    "description",
    "required",
    "nullable",
    "min",
    "max",
    "min_exclusive",
    "max_exclusive",
}


class ContractError(ValueError):
    """The contract file itself is malformed."""


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


def load_contract(
    table: str = SOURCE_TABLE, directory: Path = CONTRACTS_DIR, release: str = DEFAULT_RELEASE
) -> TableContract:
    """The contract of ``table`` in ``release`` (default: DR3's) from ``directory``."""
    return load_contract_file(Path(directory) / contract_file_name(table, release), table)


@functools.cache
def load_contract_file(path: Path, table: str = SOURCE_TABLE) -> TableContract:
    """The contract in the YAML file ``path``, for ``table`` unless the file names its own."""
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
