"""The ECSV 1.0 header that heads every Gaia bulk CSV file.

Gaia's ``GaiaSource_*.csv.gz`` files start with ``# %ECSV 1.0``, a ``# ---`` line and a YAML
block (``datatype:``) naming every column's name, type and unit, followed by one plain CSV
header line. The YAML block is the schema of record: the reader builds the table schema from
it, and a CSV header that disagrees with it is a garbled file, not something to guess around.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import yaml

ECSV_DATATYPES = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "string",
    }
)


class GaiaFileError(ValueError):
    """A whole input file is unusable; names the file and, where known, the 1-based line."""

    def __init__(self, file: str | Path, message: str, line: int | None = None):
        self.file = str(file)
        self.line = line
        self.reason = message
        where = f"{self.file}, line {line}" if line is not None else self.file
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class EcsvColumn:
    name: str
    datatype: str
    unit: str | None = None
    description: str | None = None


@dataclass(frozen=True)
class EcsvHeader:
    columns: tuple[EcsvColumn, ...]
    delimiter: str = ","
    meta: dict = field(default_factory=dict)
    comment_lines: int = 0
    """Number of ``#`` lines; the CSV column-name line is line ``comment_lines + 1`` (1-based)."""

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def first_data_line(self) -> int:
        return self.comment_lines + 2


def read_header(stream: TextIO, source: str | Path) -> EcsvHeader:
    """Parse the ECSV preamble and the CSV column-name line; leave ``stream`` at the first row."""
    comment: list[str] = []
    line_no = 0
    csv_header: str | None = None
    for raw in stream:
        line_no += 1
        if raw.startswith("#"):
            comment.append(raw.rstrip("\r\n"))
            continue
        csv_header = raw.rstrip("\r\n")
        break
    if not comment:
        raise GaiaFileError(source, "missing ECSV header (file must start with '# %ECSV 1.0')", line=1)
    if not comment[0].startswith("# %ECSV"):
        raise GaiaFileError(
            source, f"missing ECSV header: first line is {comment[0][:40]!r}, expected '# %ECSV 1.0'", line=1
        )
    version = comment[0].split("%ECSV", 1)[1].strip()
    if version not in {"0.9", "1.0"}:
        raise GaiaFileError(source, f"unsupported ECSV version {version!r}", line=1)
    if len(comment) < 2 or comment[1].strip() != "# ---":
        raise GaiaFileError(source, "garbled ECSV header: second line must be '# ---'", line=2)
    body = "\n".join(line[2:] if line.startswith("# ") else line[1:] for line in comment[2:])
    try:
        spec = yaml.load(body, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 3 if mark is not None else None
        raise GaiaFileError(
            source, f"garbled ECSV header: YAML does not parse ({getattr(exc, 'problem', exc)})", line=line
        ) from None
    if not isinstance(spec, dict) or not isinstance(spec.get("datatype"), list) or not spec["datatype"]:
        raise GaiaFileError(source, "garbled ECSV header: no 'datatype:' column list", line=3)
    columns = []
    for i, entry in enumerate(spec["datatype"]):
        if not isinstance(entry, dict) or "name" not in entry or "datatype" not in entry:
            raise GaiaFileError(source, f"garbled ECSV header: datatype entry {i + 1} lacks name/datatype")
        if entry["datatype"] not in ECSV_DATATYPES:
            raise GaiaFileError(
                source,
                f"garbled ECSV header: column {entry['name']!r} has unknown datatype {entry['datatype']!r}",
            )
        columns.append(
            EcsvColumn(
                str(entry["name"]), str(entry["datatype"]), entry.get("unit"), entry.get("description")
            )
        )
    delimiter = spec.get("delimiter", ",")
    header = EcsvHeader(
        tuple(columns), delimiter=delimiter, meta=spec.get("meta") or {}, comment_lines=len(comment)
    )
    if csv_header is None:
        raise GaiaFileError(source, "no CSV column-name line after the ECSV header", line=line_no + 1)
    names = next(csv.reader([csv_header], delimiter=delimiter))
    if names != header.names:
        detail = _first_difference(header.names, names)
        raise GaiaFileError(
            source,
            f"garbled header: CSV column names disagree with the ECSV datatype block ({detail})",
            line=header.comment_lines + 1,
        )
    return header


def _first_difference(declared: Sequence[str], found: Sequence[str]) -> str:
    for i, (a, b) in enumerate(zip(declared, found)):
        if a != b:
            return f"column {i + 1}: ECSV says {a!r}, CSV header says {b!r}"
    return f"ECSV declares {len(declared)} columns, CSV header has {len(found)}"


def read_file_header(path: str | Path) -> EcsvHeader:
    """Header of a (possibly gzipped) Gaia CSV file, reading only the first lines."""
    path = Path(path)
    try:
        with _open_text(path) as stream:
            return read_header(stream, path)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise GaiaFileError(path, f"unreadable: {exc}") from None


def _open_text(path: Path) -> TextIO:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def format_header(columns: Sequence[EcsvColumn], meta: dict | None = None, delimiter: str = ",") -> str:
    """ECSV 1.0 preamble plus CSV column-name line, in the layout of Gaia's bulk files."""
    lines = ["# %ECSV 1.0", "# ---", f"# delimiter: '{delimiter}'", "# datatype:"]
    for col in columns:
        entry = {"name": col.name}
        if col.unit:
            entry["unit"] = col.unit
        entry["datatype"] = col.datatype
        if col.description:
            entry["description"] = col.description
        lines.append(
            "# - " + yaml.safe_dump(entry, default_flow_style=True, sort_keys=False, width=10**6).strip()
        )
    if meta:
        lines.extend("# " + line for line in yaml.safe_dump({"meta": meta}, sort_keys=False).splitlines())
    lines.append("# schema: astropy-2.0")
    lines.append(delimiter.join(col.name for col in columns))
    return "\n".join(lines) + "\n"
