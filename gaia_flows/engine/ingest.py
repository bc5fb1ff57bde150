"""Ingest Gaia bulk files into the per-region ``gaia_source`` table with Spark.

One Spark task per landing file (gzip is not splittable) parses it with pyarrow's streaming
CSV reader, so a file is read once, sequentially, with line numbers known, and the contract
is enforced by :mod:`gaia_flows.science.validation`; the task stages the parsed rows as
Parquet next to the output, which Spark then reads natively. Accepted rows are range-partitioned by
``source_id`` so each region's Parquet files hold neighbouring stars; rejected rows go to the
quarantine with a reason. Nothing is published until every write of the run has succeeded.
"""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from pyspark import StorageLevel
from pyspark.sql import SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from gaia_flows.layout import SOURCE_TABLE, StateLayout, landing_files, publish
from gaia_flows.science import healpix
from gaia_flows.science.contract import TableContract
from gaia_flows.science.ecsv import EcsvHeader, GaiaFileError, read_file_header
from gaia_flows.engine.sizing import files_per_region
from gaia_flows.science.validation import check_header, home_regions, validate_rows
from gaia_flows.tables import footer_rows, write_manifest

DIAGNOSTIC_COLUMNS = [("_file", pa.string()), ("_line", pa.int64()), ("_rule", pa.string()), ("_reason", pa.string()), ("_region", pa.int64())]
DUPLICATE_RULE = "duplicate:source_id"
BATCH_BYTES = 8 << 20


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


# --- landing files ------------------------------------------------------------------------------


def region_schema(headers: dict[str, EcsvHeader], contract: TableContract) -> pa.Schema:
    """Union of the columns the run's files carry, in contract order, plus diagnostics."""
    present = {name for header in headers.values() for name in header.names}
    fields = [pa.field(f.name, f.type) for f in contract.arrow_schema(sorted(present))]
    return pa.schema(fields + [pa.field(n, t) for n, t in DIAGNOSTIC_COLUMNS])


# --- executor side --------------------------------------------------------------------------------


def read_gaia_file(path: str, contract: TableContract, schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    """Parse and validate one file, yielding batches in ``schema`` with provenance columns."""
    header = read_file_header(path)
    check_header(header, contract, path)
    file_range = healpix.parse_file_range(path)
    invalid: list = []

    def on_invalid_row(row) -> str:
        invalid.append(row)
        return "error"

    line = header.first_data_line
    for batch in _csv_batches(path, header, on_invalid_row, invalid, lambda: line):
        typed, reasons = validate_rows(pa.Table.from_batches([batch]), header, contract, file_range)
        n = typed.num_rows
        extra = {
            "_file": pa.array([path] * n, pa.string()),
            "_line": pa.array(range(line, line + n), pa.int64()),
            "_rule": pa.array(reasons.rules, pa.string()),
            "_reason": pa.array(reasons.values, pa.string()),
            "_region": pa.array(home_regions(typed.column("source_id"), file_range), pa.int64()),
        }
        columns = [typed.column(f.name) if f.name in typed.column_names else extra.get(f.name, pa.nulls(n, f.type)) for f in schema]
        yield pa.RecordBatch.from_arrays([c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in columns], schema=schema)
        line += n


def _csv_batches(path: str, header: EcsvHeader, on_invalid_row, invalid: list, current_line) -> Iterator[pa.RecordBatch]:
    """Raw string batches; any parse or decompression failure becomes a GaiaFileError that
    names the file and the line where reading stopped."""
    try:
        stream = pa.input_stream(path, compression="gzip" if path.endswith(".gz") else None)
        reader = pcsv.open_csv(
            stream,
            read_options=pcsv.ReadOptions(
                skip_rows=header.comment_lines + 1, column_names=header.names, use_threads=False, block_size=BATCH_BYTES
            ),
            parse_options=pcsv.ParseOptions(delimiter=header.delimiter, invalid_row_handler=on_invalid_row),
            convert_options=pcsv.ConvertOptions(
                column_types={name: pa.string() for name in header.names}, strings_can_be_null=False, quoted_strings_can_be_null=False
            ),
        )
        yield from reader
    except (pa.ArrowInvalid, OSError, EOFError) as exc:
        line = current_line()
        if invalid:
            row = invalid[0]
            where = row.number if row.number is not None else line
            raise GaiaFileError(path, f"wrong column count: expected {row.expected_columns}, found {row.actual_columns}", line=where) from None
        raise GaiaFileError(path, f"unreadable after line {line - 1} ({exc}); truncated or corrupt file", line=line) from None


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
            results, rows = _ingest_once(spark, layout, wanted, contract, bucket_bytes)
        except GaiaFileError as error:
            failed = _regions_of_file(error.file, pending)
            for region in failed:
                report.failures[region] = str(error)
            pending = [r for r in pending if r not in failed]
            continue
        report.regions.update(results)
        report.rows_read += rows
        break
    report.seconds = time.perf_counter() - started
    return report


def _ingest_once(
    spark: SparkSession, layout: StateLayout, wanted: dict[str, list[Path]], contract: TableContract, bucket_bytes: int
) -> tuple[dict[str, RegionResult], int]:
    all_files = sorted({str(p) for paths in wanted.values() for p in paths})
    headers = {}
    for path in all_files:
        headers[path] = read_file_header(path)
        check_header(headers[path], contract, path)
    schema = region_schema(headers, contract)
    pixels = {healpix.parse_region_key(r)[1]: r for r in wanted}
    planned = {r: files_per_region(_region_bytes(paths, r), bucket_bytes) for r, paths in wanted.items()}
    staging = layout.staging_dir(SOURCE_TABLE)
    try:
        try:
            counts = _run_spark(spark, all_files, schema, contract, list(pixels), sum(planned.values()), staging)
        except Exception as exc:  # noqa: BLE001 - re-raised below, typed where we can name the file
            error = _file_error_from(exc)
            if error is not None:
                raise error from None
            raise
        results = {}
        for pixel, region in pixels.items():
            results[region] = _publish_region(layout, staging, pixel, region, schema, counts, wanted[region])
        return results, sum(counts.values())
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _region_bytes(paths: list[Path], region: str) -> int:
    """Bytes of input that belong to a region: each file's size times the share of its
    level-8 range inside the region. Feeds the planner's bucket count."""
    level, pixel = healpix.parse_region_key(region)
    lo, hi = healpix.children_range(pixel, level, healpix.FILE_LEVEL)
    total = 0.0
    for path in paths:
        start, end = healpix.parse_file_range(path)
        overlap = min(end, hi) - max(start, lo) + 1
        total += path.stat().st_size * overlap / (end - start + 1)
    return int(total)


def parse_to_parquet(path: str, contract: TableContract, schema: pa.Schema, pixels: list[int], target: Path) -> int:
    """Parse one file into a staged Parquet copy holding only the wanted regions' rows.

    Written by the Python worker itself: handing every row back to the JVM through Arrow costs
    more than the parsing, while Spark reads the staged Parquet natively and in parallel.
    """
    wanted = pa.array(pixels, pa.int64())
    partial = target.with_name(f".{target.name}.partial")
    rows = 0
    with pq.ParquetWriter(partial, schema, compression="zstd") as writer:
        for batch in read_gaia_file(path, contract, schema):
            kept = batch.filter(pc.is_in(batch.column("_region"), value_set=wanted))
            writer.write_batch(kept)
            rows += kept.num_rows
    partial.replace(target)
    return rows


def _run_spark(
    spark: SparkSession, files: list[str], schema: pa.Schema, contract: TableContract, pixels: list[int], partitions: int, staging: Path
) -> Counter:
    spark.sparkContext.setJobGroup(SOURCE_TABLE, f"ingest {len(files)} files into {len(pixels)} regions", interruptOnCancel=True)
    parsed_dir = staging / "parsed"
    parsed_dir.mkdir(parents=True)

    def parse(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            for path in batch.column("path").to_pylist():
                target = parsed_dir / (Path(path).name.split(".")[0] + ".parquet")
                rows = parse_to_parquet(path, contract, schema, pixels, target)
                yield pa.RecordBatch.from_pydict({"path": [path], "rows": [rows]})

    paths = spark.createDataFrame([(p,) for p in files], "path string").repartition(max(1, len(files)))
    paths.mapInArrow(parse, "path string, rows long").collect()
    parsed = spark.read.schema(from_arrow_schema(schema)).parquet(str(parsed_dir))
    first_valid = Window.partitionBy("source_id").orderBy(F.col("_rule").isNotNull(), "_file", "_line")
    marked = (
        parsed.repartitionByRange(max(1, partitions), "source_id")
        .withColumn("_rank", F.row_number().over(first_valid))
        .withColumn("_duplicate", F.col("_rule").isNull() & F.col("source_id").isNotNull() & (F.col("_rank") > 1))
        .withColumn("_rule", F.when(F.col("_duplicate"), F.lit(DUPLICATE_RULE)).otherwise(F.col("_rule")))
        .withColumn(
            "_reason",
            F.when(F.col("_duplicate"), F.format_string("duplicate source_id %d (first kept)", F.col("source_id"))).otherwise(F.col("_reason")),
        )
        .drop("_rank", "_duplicate")
        .sortWithinPartitions("_region", "source_id")
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    try:
        gaia_columns = [f.name for f in schema if not f.name.startswith("_")]
        accepted = marked.filter(F.col("_rule").isNull()).select(*gaia_columns, "_region")
        accepted.write.partitionBy("_region").parquet(str(staging / "accepted"))
        marked.filter(F.col("_rule").isNotNull()).write.partitionBy("_region").parquet(str(staging / "rejected"))
        rows = marked.groupBy("_region", F.col("_rule").isNull().alias("ok"), "_rule").count().collect()
    finally:
        marked.unpersist()
    counts: Counter = Counter()
    for row in rows:
        counts[(row["_region"], row["_rule"])] += row["count"]
    return counts


def _publish_region(
    layout: StateLayout, staging: Path, pixel: int, region: str, schema: pa.Schema, counts: Counter, inputs: list[Path]
) -> RegionResult:
    by_rule = {rule: n for (p, rule), n in counts.items() if p == pixel and rule is not None}
    accepted_dir = staging / "accepted" / f"_region={pixel}"
    rejected_dir = staging / "rejected" / f"_region={pixel}"
    gaia_schema = pa.schema([f for f in schema if not f.name.startswith("_")])
    for directory, table_schema in ((accepted_dir, gaia_schema), (rejected_dir, pa.schema([f for f in schema if f.name != "_region"]))):
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
