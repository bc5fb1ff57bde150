"""Ingest Gaia bulk files into the per-region ``gaia_source`` table with Spark tasks.

Each Spark task takes a run of landing files in sky order (gzip is not splittable, so a file
is one task's), parses them with pyarrow's CSV reader, so a file is read once, sequentially,
with line numbers known, and enforces the contract with :mod:`gaia_flows.science.validation`.
It then cuts the rows at region boundaries and writes each region's part itself, sorted by
``source_id``, and the rejected rows with their reasons next to it. Gaia files are sorted by
``source_id`` and cover disjoint level-8 ranges, and a row is accepted only inside its file's
range, so the parts of a region are disjoint ranges and no rows move between tasks: files
whose ranges overlap (the same stars landed twice) go to the same task, which keeps the first
of each duplicated source_id. Nothing is published until every task of the run has succeeded;
then each region's directory of parts is published in one rename.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from pyspark.sql import SparkSession

from gaia_flows.engine.metrics import timed_task
from gaia_flows.layout import SOURCE_TABLE, StateLayout, landing_files
from gaia_flows.science import healpix
from gaia_flows.science.contract import TableContract
from gaia_flows.science.ecsv import EcsvHeader, GaiaFileError, read_file_header
from gaia_flows.science.validation import NULL_TOKENS, check_header, home_regions, validate_rows
from gaia_flows.warehouse import claim_staging, footer_rows, publish, release_staging, write_manifest

DIAGNOSTIC_COLUMNS = [
    ("_file", pa.string()),
    ("_line", pa.int64()),
    ("_rule", pa.string()),
    ("_reason", pa.string()),
    ("_region", pa.int64()),
]
DUPLICATE_RULE = "duplicate:source_id"
BATCH_BYTES = 8 << 20
PARQUET_COMPRESSION = "zstd"
"""Parts are zstd-compressed; only string columns (flags, provenance) are dictionary-encoded:
measurements are nearly all distinct, so a dictionary is attempted, abandoned, and leaves the
write about 3.5 times slower and the file a third larger (synthetic catalogue, 40 columns)."""


@dataclass
class RegionResult:
    region: str
    rows_in: int
    accepted: int
    rejected: int
    rejected_by_rule: dict[str, int]
    input_files: list[str]
    output_files: int
    output_bytes: int
    path: str

    @property
    def conserved(self) -> bool:
        return self.rows_in == self.accepted + self.rejected


@dataclass
class IngestReport:
    regions: dict[str, RegionResult] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    rows_read: int = 0
    task_records: list[dict] = field(default_factory=list)  # engine.metrics.timed_task, one per task


# --- landing files ------------------------------------------------------------------------------


def region_schema(headers: dict[str, EcsvHeader], contract: TableContract) -> pa.Schema:
    """Union of the columns the run's files carry, in contract order, plus diagnostics."""
    present = {name for header in headers.values() for name in header.names}
    fields = [pa.field(f.name, f.type) for f in contract.arrow_schema(sorted(present))]
    return pa.schema(fields + [pa.field(n, t) for n, t in DIAGNOSTIC_COLUMNS])


# --- executor side --------------------------------------------------------------------------------


def _converted_types(header: EcsvHeader, contract: TableContract) -> dict[str, pa.DataType]:
    """Column types for the CSV reader's typed pass: numbers converted while parsing.

    Floats are read as float64 and integers as their contract type, so a token the reader
    accepts has the value :func:`validate_rows` would give it, and one out of range fails the
    pass. Strings, booleans and uint64 (whose bound is checked after an int64 parse) stay
    tokens for :func:`validate_rows` to parse.
    """
    types = {}
    for column in header.columns:
        kind = contract.by_name[column.name].datatype
        if kind.startswith("float"):
            types[column.name] = pa.float64()
        elif kind.startswith(("int", "uint")) and kind != "uint64":
            types[column.name] = contract.by_name[column.name].arrow_type
        else:
            types[column.name] = pa.string()
    return types


def read_gaia_file(
    path: str, contract: TableContract, schema: pa.Schema, header: EcsvHeader | None = None
) -> Iterator[pa.RecordBatch]:
    """Parse and validate one file, yielding batches in ``schema`` with provenance columns;
    ``header``: the file's header when the caller has read and checked it already.

    The first pass lets the CSV reader convert the numeric columns while it parses (about as
    fast as parsing alone, where parsing every column as text and converting afterwards cost
    twice that). Its batches are held until the file ends, because any token the reader cannot
    convert (a typo, a value out of range, a bad row, a truncated file) abandons the pass: the
    file is then read again as text, which names every bad value and the line of a file error.
    """
    if header is None:
        header = read_file_header(path)
        check_header(header, contract, path)
    file_range = healpix.parse_file_range(path)
    try:
        yield from list(
            _validated_batches(path, header, contract, schema, file_range, _converted_types(header, contract))
        )
    except GaiaFileError:
        yield from _validated_batches(
            path, header, contract, schema, file_range, {name: pa.string() for name in header.names}
        )


def _validated_batches(
    path: str,
    header: EcsvHeader,
    contract: TableContract,
    schema: pa.Schema,
    file_range: tuple[int, int],
    column_types: dict,
) -> Iterator[pa.RecordBatch]:
    invalid: list = []

    def on_invalid_row(row) -> str:
        invalid.append(row)
        return "error"

    line = header.first_data_line
    for batch in _csv_batches(path, header, column_types, on_invalid_row, invalid, lambda: line):
        _check_narrowing(path, batch, contract)
        typed, reasons = validate_rows(pa.Table.from_batches([batch]), header, contract, file_range)
        n = typed.num_rows
        any_rejected = reasons.rejected.any()
        extra = {
            "_file": pa.repeat(pa.scalar(path, pa.string()), n),
            "_line": pa.array(np.arange(line, line + n, dtype=np.int64)),
            "_rule": pa.array(reasons.rules, pa.string()) if any_rejected else pa.nulls(n, pa.string()),
            "_reason": pa.array(reasons.values, pa.string()) if any_rejected else pa.nulls(n, pa.string()),
            "_region": pa.array(home_regions(typed.column("source_id"), file_range), pa.int64()),
        }
        columns = [
            typed.column(f.name) if f.name in typed.column_names else extra.get(f.name, pa.nulls(n, f.type))
            for f in schema
        ]
        yield pa.RecordBatch.from_arrays(
            [c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns], schema=schema
        )
        line += n


def _check_narrowing(path: str, batch: pa.RecordBatch, contract: TableContract) -> None:
    """A float read as float64 must stay finite in its contract type (float32): a value beyond
    that type's range ends the typed pass, so the text pass quarantines it with its token."""
    for name, column in zip(batch.schema.names, batch.columns):
        target = contract.by_name[name].arrow_type
        if pa.types.is_float64(column.type) and target != column.type:
            if pc.sum(pc.is_inf(pc.cast(column, target))).as_py() != pc.sum(pc.is_inf(column)).as_py():
                raise GaiaFileError(path, f"column {name!r} holds a value beyond {target}")


def _csv_batches(
    path: str, header: EcsvHeader, column_types: dict, on_invalid_row, invalid: list, current_line
) -> Iterator[pa.RecordBatch]:
    """Batches with ``column_types``; any parse, conversion or decompression failure becomes a
    GaiaFileError that names the file and the line where reading stopped."""
    try:
        stream = pa.input_stream(path, compression="gzip" if path.endswith(".gz") else None)
        reader = pcsv.open_csv(
            stream,
            read_options=pcsv.ReadOptions(
                skip_rows=header.comment_lines + 1,
                column_names=header.names,
                use_threads=False,
                block_size=BATCH_BYTES,
            ),
            parse_options=pcsv.ParseOptions(delimiter=header.delimiter, invalid_row_handler=on_invalid_row),
            convert_options=pcsv.ConvertOptions(
                column_types=column_types,
                null_values=NULL_TOKENS,
                strings_can_be_null=False,
                quoted_strings_can_be_null=True,
            ),
        )
        yield from reader
    except (pa.ArrowInvalid, OSError, EOFError) as exc:
        line = current_line()
        if invalid:
            row = invalid[0]
            where = row.number if row.number is not None else line
            raise GaiaFileError(
                path,
                f"wrong column count: expected {row.expected_columns}, found {row.actual_columns}",
                line=where,
            ) from None
        raise GaiaFileError(
            path, f"unreadable after line {line - 1} ({exc}); truncated or corrupt file", line=line
        ) from None


def file_groups(paths: list[str]) -> list[list[str]]:
    """Files in groups whose level-8 ranges overlap, groups in sky order, files by name.

    A row is accepted only inside its file's range, so two accepted rows can share a
    source_id only if their files' ranges overlap: de-duplication is needed within a group
    and never between groups. Gaia's own files never overlap, so each is its own group.
    """
    groups: list[list[str]] = []
    reach = -1
    for path in sorted(paths, key=lambda p: (healpix.parse_file_range(p), p)):
        start, end = healpix.parse_file_range(path)
        if groups and start <= reach:
            groups[-1].append(path)
        else:
            groups.append([path])
        reach = max(reach, end)
    return [sorted(group) for group in groups]


def task_chunks(
    groups: list[list[str]], sizes: dict[str, int], bucket_bytes: int, cores: int
) -> list[list[list[str]]]:
    """Consecutive file groups cut into tasks of similar input bytes: enough tasks for two per
    core, and none holding much more than ``bucket_bytes`` of input (a task writes one part
    per region it touches, so a bucket is about a region file)."""
    weights = np.array([sum(sizes[p] for p in group) for group in groups], dtype=np.float64)
    count = min(len(groups), max(2 * cores, math.ceil(weights.sum() / bucket_bytes)))
    if count <= 1:
        return [groups] if groups else []
    cumulative = np.cumsum(weights)
    cuts = np.searchsorted(cumulative, cumulative[-1] * np.arange(1, count) / count, side="right")
    bounds = [0, *sorted(set(int(c) for c in cuts if 0 < c < len(groups))), len(groups)]
    return [groups[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def split_duplicates(part: pa.Table) -> tuple[pa.Table, pa.Table]:
    """One region's rows of a file group, in file and line order -> (accepted rows sorted by
    source_id, rejected rows). Of the valid rows sharing a source_id, the first (by file name,
    then line) is kept and the others are quarantined as duplicates."""
    ok = np.asarray(pc.is_null(part.column("_rule")))
    accepted = part if ok.all() else part.filter(ok)
    rejected = part.filter(~ok)
    sid = accepted.column("source_id").to_numpy()
    if sid.size > 1 and not (sid[1:] > sid[:-1]).all():
        order = np.argsort(sid, kind="stable")  # stable: file and line order among equal ids
        accepted, sid = accepted.take(order), sid[order]
        repeat = np.r_[False, sid[1:] == sid[:-1]]
        if repeat.any():
            duplicates = accepted.filter(repeat)
            ids = duplicates.column("source_id").to_pylist()
            duplicates = duplicates.set_column(
                duplicates.schema.get_field_index("_rule"),
                "_rule",
                pa.array([DUPLICATE_RULE] * len(ids), pa.string()),
            ).set_column(
                duplicates.schema.get_field_index("_reason"),
                "_reason",
                pa.array([f"duplicate source_id {i} (first kept)" for i in ids], pa.string()),
            )
            accepted, rejected = accepted.filter(~repeat), pa.concat_tables([rejected, duplicates])
    return accepted, rejected


@dataclass(frozen=True)
class IngestTask:
    """One Spark task's work over a run of consecutive file groups: parse, validate,
    de-duplicate and write each wanted region's part of them, sorted by source_id.

    Parts are ``<staging>/{accepted,rejected}/<pixel>/part-<task>.parquet``. Groups cover
    disjoint source_id ranges in sky order, so a region's parts, in name order, are its rows
    in source_id order, without a shuffle. Returns the task's record: ``counts``, the rows per
    (region pixel, rule), ``None`` for accepted; ``rows`` read, ``written_bytes``, and what
    :func:`~gaia_flows.engine.metrics.timed_task` measures. Picklable: the driver sends it to
    the executors.
    """

    contract: TableContract
    schema: pa.Schema
    pixels: frozenset[int]
    staging: Path

    def __call__(self, index: int, groups: list[list[str]], headers: dict[str, EcsvHeader]) -> dict:
        """``headers``: the groups' files' headers, read and checked by the driver."""
        return timed_task(
            [path for group in groups for path in group], lambda: self._ingest(index, groups, headers)
        )

    def _ingest(self, index: int, groups: list[list[str]], headers: dict[str, EcsvHeader]) -> dict:
        counts: Counter = Counter()
        writers: dict[Path, pq.ParquetWriter] = {}
        accepted_columns = [f.name for f in self.schema if not f.name.startswith("_")]
        try:
            for group in groups:
                table = pa.concat_tables(
                    pa.Table.from_batches(
                        list(read_gaia_file(path, self.contract, self.schema, headers[path])),
                        schema=self.schema,
                    )
                    for path in group
                )
                regions = table.column("_region").to_numpy()
                for pixel in sorted(set(np.unique(regions).tolist()) & self.pixels):
                    part = table if (regions == pixel).all() else table.filter(regions == pixel)
                    accepted, rejected = split_duplicates(part)
                    self._write(
                        writers,
                        self.staging / "accepted" / str(pixel) / f"part-{index:05d}.parquet",
                        accepted.select(accepted_columns),
                    )
                    self._write(
                        writers,
                        self.staging / "rejected" / str(pixel) / f"part-{index:05d}.parquet",
                        rejected.drop_columns(["_region"]),
                    )
                    counts[(pixel, None)] += accepted.num_rows
                    counts.update(
                        {
                            (pixel, rule): n
                            for rule, n in Counter(rejected.column("_rule").to_pylist()).items()
                        }
                    )
        except BaseException:
            for writer in writers.values():
                writer.close()
            raise
        for path, writer in writers.items():
            writer.close()
            _partial(path).replace(path)
        return {
            "counts": counts,
            "rows": sum(counts.values()),
            "written_bytes": sum(path.stat().st_size for path in writers),
        }

    @staticmethod
    def _write(writers: dict[Path, pq.ParquetWriter], path: Path, rows: pa.Table) -> None:
        if rows.num_rows == 0:
            return
        if path not in writers:
            path.parent.mkdir(parents=True, exist_ok=True)
            writers[path] = pq.ParquetWriter(
                _partial(path),
                rows.schema,
                compression=PARQUET_COMPRESSION,
                use_dictionary=[f.name for f in rows.schema if pa.types.is_string(f.type)],
            )
        writers[path].write_table(rows)


def _partial(path: Path) -> Path:
    """Where a part is written until its task has finished: hidden from readers, and replaced
    whole if Spark runs the task again."""
    return path.with_name(f".{path.name}.partial")


# --- driver side --------------------------------------------------------------------------------

_ERROR_RE = re.compile(r"GaiaFileError: (?P<file>\S+?)(?:, line (?P<line>\d+))?: (?P<reason>[^\n]*)")


def _file_error_from(exc: Exception) -> GaiaFileError | None:
    """Recover the executor's GaiaFileError from the Py4J/Spark exception that wraps it."""
    match = _ERROR_RE.search(str(exc))
    if not match:
        return None
    line = match.group("line")
    return GaiaFileError(match.group("file"), match.group("reason"), line=int(line) if line else None)


def _regions_of_file(path: str | Path, regions: list[str]) -> list[str]:
    return [r for r in regions if Path(path) in healpix.files_for_region([Path(path)], r)]


def ingest_regions(
    spark: SparkSession,
    layout: StateLayout,
    regions: list[str],
    contract: TableContract,
    bucket_bytes: int,
) -> IngestReport:
    """Ingest ``regions`` in one Spark application; a bad file fails only the regions it feeds."""
    report = IngestReport()
    started = time.perf_counter()
    pending = list(regions)
    files = landing_files(layout.landing)
    while pending:
        wanted = {r: healpix.files_for_region(files, r) for r in pending}
        try:
            results, records = _ingest_once(spark, layout, wanted, contract, bucket_bytes)
        except GaiaFileError as error:
            failed = _regions_of_file(error.file, pending)
            for region in failed:
                report.failures[region] = str(error)
            pending = [r for r in pending if r not in failed]
            continue
        report.regions.update(results)
        report.rows_read += sum(record["rows"] for record in records)
        report.task_records = records
        break
    report.seconds = time.perf_counter() - started
    return report


def _ingest_once(
    spark: SparkSession,
    layout: StateLayout,
    wanted: dict[str, list[Path]],
    contract: TableContract,
    bucket_bytes: int,
) -> tuple[dict[str, RegionResult], list[dict]]:
    all_files = sorted({str(p) for paths in wanted.values() for p in paths})
    headers = {}
    for path in all_files:
        headers[path] = read_file_header(path)
        check_header(headers[path], contract, path)
    schema = region_schema(headers, contract)
    pixels = {healpix.parse_region_key(r)[1]: r for r in wanted}
    staging = claim_staging(layout, SOURCE_TABLE)
    try:
        try:
            records = _run_tasks(
                spark, headers, IngestTask(contract, schema, frozenset(pixels), staging), bucket_bytes
            )
        except Exception as exc:  # noqa: BLE001 - re-raised below, typed where we can name the file
            error = _file_error_from(exc)
            if error is not None:
                raise error from None
            raise
        counts: Counter = Counter()
        for record in records:
            counts.update(record["counts"])
        results = {}
        for pixel, region in pixels.items():
            results[region] = _publish_region(layout, staging, pixel, region, schema, counts, wanted[region])
        return results, records
    finally:
        release_staging(staging)


def _run_tasks(
    spark: SparkSession, headers: dict[str, EcsvHeader], task: IngestTask, bucket_bytes: int
) -> list[dict]:
    """Every file parsed and written by Python tasks of one plain RDD job (no SQL plan, no
    rows through the JVM); each task gets its files' headers, and the driver receives one
    small record per task."""
    sc = spark.sparkContext
    files = sorted(headers)
    chunks = task_chunks(
        file_groups(files), {p: os.path.getsize(p) for p in files}, bucket_bytes, sc.defaultParallelism
    )
    sc.setJobDescription(f"ingest {len(files)} files into {len(task.pixels)} regions")
    if not chunks:
        return []
    items = [(i, chunk, {p: headers[p] for group in chunk for p in group}) for i, chunk in enumerate(chunks)]
    return sc.parallelize(items, len(items)).map(lambda item: task(*item)).collect()


def _publish_region(
    layout: StateLayout,
    staging: Path,
    pixel: int,
    region: str,
    schema: pa.Schema,
    counts: Counter,
    inputs: list[Path],
) -> RegionResult:
    by_rule = {rule: n for (p, rule), n in counts.items() if p == pixel and rule is not None}
    accepted_dir = staging / "accepted" / str(pixel)
    rejected_dir = staging / "rejected" / str(pixel)
    gaia_schema = pa.schema([f for f in schema if not f.name.startswith("_")])
    for directory, table_schema in (
        (accepted_dir, gaia_schema),
        (rejected_dir, pa.schema([f for f in schema if f.name != "_region"])),
    ):
        if not directory.exists():
            directory.mkdir(parents=True)
            pq.write_table(table_schema.empty_table(), directory / "part-00000-empty.parquet")
    accepted = footer_rows(accepted_dir.glob("*.parquet"))
    rejected = footer_rows(rejected_dir.glob("*.parquet"))
    files = sorted(accepted_dir.glob("*.parquet"))
    result = RegionResult(
        region=region,
        rows_in=counts.get((pixel, None), 0) + sum(by_rule.values()),
        accepted=accepted,
        rejected=rejected,
        rejected_by_rule=dict(sorted(by_rule.items(), key=lambda kv: -kv[1])),
        input_files=[p.name for p in inputs],
        output_files=len(files),
        output_bytes=sum(p.stat().st_size for p in files),
        path=str(layout.region_dir(SOURCE_TABLE, region)),
    )
    manifest = {
        "region": region,
        "rows_in": result.rows_in,
        "rows_accepted": accepted,
        "rows_rejected": rejected,
        "rejected_by_rule": result.rejected_by_rule,
        "input_files": result.input_files,
    }
    write_manifest(accepted_dir, manifest)
    write_manifest(rejected_dir, manifest)
    publish(rejected_dir, layout.quarantine_dir(SOURCE_TABLE, region))
    publish(accepted_dir, layout.region_dir(SOURCE_TABLE, region))
    return result
