"""The warehouse on disk, with pyarrow alone: listing, manifests, atomic publishing, footers.

Every partitioned table is ``warehouse/<table>/<region>/`` (``hpx1-07``), a symlink to an
immutable version directory, so one region can be rewritten while the others and any reader
stay untouched. Every write goes through this module: a staging folder claimed by the writing
process (:func:`claim_staging`), a manifest beside the data (:func:`write_manifest`), then one
atomic :func:`publish`. The Spark writers (:mod:`gaia_flows.engine.tables`) use the same steps;
nothing here imports Spark, so the maps, the CLI and the tests read and write tables without it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from gaia_flows.layout import REGION_MANIFEST, StateLayout

STAGING_LOCK = ".lock"
_HELD_STAGING: dict[Path, int] = {}


class WarehouseWriteError(OSError):
    """The warehouse refused a write (full disk, no permission): says which table, where, and
    that the previously published version is untouched."""


class CorruptTableError(ValueError):
    """A published Parquet file of a region cannot be read back."""


def claim_staging(layout: StateLayout, table: str) -> Path:
    """A fresh staging path for ``table``, owned by this process until :func:`release_staging`.

    Ownership is an exclusive ``flock`` on ``<staging>.lock``, taken before the lock file
    appears under its name, so every visible lock file is held by a live process or by none.
    The kernel drops the lock when its process dies (even by ``kill -9``); the next claim for
    the same table then removes that dead run's staging directory, never a live run's.
    """
    layout.staging_root.mkdir(parents=True, exist_ok=True)
    path = layout.staging_dir(table)
    remove_stale_staging(layout, table)
    pending = path.with_name(f".{path.name}{STAGING_LOCK}")
    fd = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.replace(pending, _lock_of(path))
    _HELD_STAGING[path] = fd
    return path


def release_staging(path: Path) -> None:
    """Remove a claimed staging directory, then give up its lock."""
    shutil.rmtree(path, ignore_errors=True)
    _lock_of(path).unlink(missing_ok=True)
    fd = _HELD_STAGING.pop(path, None)
    if fd is not None:
        os.close(fd)


def remove_stale_staging(layout: StateLayout, table: str) -> list[Path]:
    """Remove the staging directories of ``table`` whose owner is gone; returns them."""
    removed = []
    for path in sorted(layout.staging_root.glob(f"{table}-*")):
        if not re.fullmatch(rf"{re.escape(table)}-[0-9a-f]{{12}}", path.name) or path in _HELD_STAGING:
            continue
        lock = _lock_of(path)
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = None  # no lock file: a staging directory whose owner has already released it
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live run's
            shutil.rmtree(path, ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed.append(path)
        finally:
            if fd is not None:
                os.close(fd)
    return removed


def _lock_of(path: Path) -> Path:
    return path.with_name(path.name + STAGING_LOCK)


_REFUSALS = {
    "no space left on device": re.compile(
        r"No space left on device|ENOSPC|\[Errno 28\]|Disk quota exceeded", re.I
    ),
    "permission denied": re.compile(
        r"Permission denied|EACCES|\[Errno 13\]|Read-only file system|EROFS", re.I
    ),
}


@contextmanager
def warehouse_errors(layout: StateLayout, table: str, regions: Iterable[str] = ()) -> Iterator[None]:
    """Turn a full disk or a refused write anywhere below (Python, PyArrow, or the Spark JVM)
    into one :class:`WarehouseWriteError` naming the refusal, the path and the table."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unchanged unless it is a refused write
        text = _error_chain_text(exc)
        for refusal, pattern in _REFUSALS.items():
            if pattern.search(text):
                where = _refused_path(exc, text, layout, table)
                named = f" (regions {', '.join(regions)})" if regions else ""
                raise WarehouseWriteError(
                    f"{refusal} at {where} while writing table {table!r}{named}; the previously published version is kept"
                ) from exc
        raise


def _error_chain_text(exc: BaseException) -> str:
    parts: list[str] = []
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        parts.append(f"{type(link).__name__}: {link}")
        link = link.__cause__ or link.__context__
    return "\n".join(parts)


def _refused_path(exc: BaseException, text: str, layout: StateLayout, table: str) -> str:
    """The refused file or directory when the error names one inside the state folder (the
    warehouse's staging, a region), else the table's directory."""
    named = [getattr(exc, "filename", None), *re.findall(r"(?:file:)?(/[^\s'\"\],)]+)", text)]
    inside = [str(p) for p in named if p and str(p).startswith(str(layout.home))]
    return inside[0] if inside else str(layout.table(table))


def verify_region(layout: StateLayout, table: str, region: str) -> int:
    """Read every data page of a published region, page checksums verified; returns its rows.

    Raises :class:`CorruptTableError` naming the table, the region and the file when a file
    cannot be read back (overwritten bytes, a truncated footer).
    """
    rows = 0
    for path in layout.region_files(table, region):
        try:
            with pq.ParquetFile(path, page_checksum_verification=True) as parquet:
                for batch in parquet.iter_batches(batch_size=1 << 16):
                    rows += batch.num_rows
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise CorruptTableError(
                f"table {table!r} region {region}: file {path.resolve()} is unreadable: {exc}"
            ) from exc
    return rows


def published_regions(layout: StateLayout, table: str) -> list[str]:
    """The regions of ``table`` that are published now, sorted."""
    return sorted(layout.region_versions(table))


def region_paths(layout: StateLayout, table: str, regions: list[str] | None = None) -> list[str]:
    """The directories of ``regions`` (all published ones by default); a region not published
    raises :class:`FileNotFoundError` naming it."""
    wanted = published_regions(layout, table) if regions is None else regions
    missing = [r for r in wanted if not layout.region_dir(table, r).exists()]
    if missing:
        raise FileNotFoundError(
            f"table {table!r} has no published region(s) {missing} under {layout.table(table)}"
        )
    return [str(layout.region_dir(table, r)) for r in wanted]


def footer_rows(paths: Iterable[str | Path]) -> int:
    """Rows of Parquet files from their footers (no data read), independent of the counts of the
    job that wrote them."""
    return sum(pq.ParquetFile(path).metadata.num_rows for path in paths)


def version_manifest(directory: Path) -> dict:
    """The manifest of a published version directory (``{}`` when it has none, or when the
    version was replaced and removed meanwhile)."""
    try:
        return json.loads((directory / REGION_MANIFEST).read_text())
    except FileNotFoundError:
        return {}


def read_manifest(layout: StateLayout, table: str, region: str) -> dict:
    """The manifest of a region's published version (``{}`` when there is none)."""
    return version_manifest(layout.region_dir(table, region))


def write_manifest(directory: Path, manifest: dict | None) -> None:
    """Sidecar a person (or an asset check) reads to see what a version holds and where it came from."""
    if manifest is not None:
        (directory / REGION_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))


ARROW_WRITE_OPTIONS: dict[str, Any] = {"compression": "lz4", "use_dictionary": False}
"""Parquet options for the tables the driver writes (per-pixel sums and their pyramid). Their
float columns are nearly all distinct values, so dictionary encoding would be attempted and
abandoned on every page; lz4 rather than zstd trades ~10 % more bytes for about twice the write
and read speed of these small, often re-read tables."""


def write_region_arrow(
    data: pa.Table, layout: StateLayout, table: str, region: str, manifest: dict | None = None
) -> Path:
    """Publish a small per-region table (statistics, predictions) written from the driver.

    Parameters
    ----------
    data
        The region's rows, written as one Parquet file with :data:`ARROW_WRITE_OPTIONS`.
    layout, table, region
        Where it is published: ``warehouse/<table>/<region>``.
    manifest
        Written as the version's ``_region.json``.

    Returns
    -------
    Path
        The published version directory.

    Raises
    ------
    WarehouseWriteError
        The disk is full or the write is refused; the previous version stays published.
    """
    with warehouse_errors(layout, table, [region]):
        staging = claim_staging(layout, table)
        try:
            staging.mkdir()
            pq.write_table(data, staging / "part-00000.parquet", **ARROW_WRITE_OPTIONS)
            write_manifest(staging, manifest)
            return publish(staging, layout.region_dir(table, region))
        finally:
            release_staging(staging)


def _write_grouped(data: pa.Table, schema: pa.Schema, path: Path, table: str, row_group_key: str) -> None:
    with pq.ParquetWriter(path, schema, **ARROW_WRITE_OPTIONS) as writer:
        data = data.replace_schema_metadata(schema.metadata)
        keys = data.column(row_group_key).to_numpy()
        starts = (
            np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]]) if keys.size else np.zeros(0, dtype=np.int64)
        )
        if np.unique(keys[starts]).size != starts.size:
            raise ValueError(f"rows of {table!r} are not grouped by {row_group_key!r}")
        for start, end in zip(starts.tolist(), np.r_[starts[1:], keys.size].tolist()):
            writer.write_table(data.slice(start, end - start))


def write_table_files(
    files: Iterable[tuple[str, pa.Table | Path]],
    schema: pa.Schema,
    layout: StateLayout,
    table: str,
    manifest: Callable[[], dict | None],
    row_group_key: str,
) -> Path:
    """Publish an unpartitioned table file by file, as one atomic directory.

    Each item names a file and gives either its rows (written now) or a file of the published
    version, hard-linked unchanged (published files are never modified), so a table of which
    one file changed (the maps pyramid after one region's rerun) is republished for the price
    of that file. Items are consumed one at a time, so the whole table need never be in
    memory; ``manifest`` is asked for once every file is in place.

    Parameters
    ----------
    files
        ``(file name, rows or a published file to hard-link)`` pairs, consumed one at a time.
    schema
        Schema of the written files.
    layout, table
        Where the table is published: ``warehouse/<table>``.
    manifest
        Called once every file is in place; its result is the version's ``_region.json``.
    row_group_key
        One row group per run of equal values of this column, so a reader selecting on it
        decodes only its groups. Rows must already be grouped by the key (the pyramid is
        sorted by level): each group is then a zero-copy slice.

    Returns
    -------
    Path
        The published version directory. A failure before publishing removes the staging
        folder and leaves the previous version in place.
    """
    staging = claim_staging(layout, table)
    try:
        staging.mkdir()
        for name, content in files:
            if isinstance(content, Path):
                link_or_copy(content, staging / name)
            else:
                _write_grouped(content, schema, staging / name, table, row_group_key)
        write_manifest(staging, manifest())
        return publish(staging, layout.table(table))
    finally:
        release_staging(staging)


def publish(staged: Path, final: Path) -> Path:
    """Make ``staged`` the content of ``final`` in one atomic step.

    ``final`` is a symlink into ``<table>/.versions/``; swapping the link is a single
    ``rename``, so a reader sees the old version or the new one, never a half-written mix,
    and a failure before the swap leaves the previous version untouched. Spark and DuckDB
    skip dot-directories, so old versions never leak into a table scan.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    versions = final.parent / ".versions"
    versions.mkdir(exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    target = versions / f"{final.name}-{tag}"
    os.replace(staged, target)
    link = final.parent / f".{final.name}.link-{tag}"
    os.symlink(os.path.relpath(target, final.parent), link)
    previous = final.resolve() if final.is_symlink() else None
    if final.exists() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(link, final)
    if previous is not None and previous != target:
        shutil.rmtree(previous, ignore_errors=True)
    return target


def link_or_copy(source: Path, target: Path) -> None:
    """Put an immutable published file into a new version without copying its bytes: a hard
    link, or a copy on a filesystem without hard links."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copy2(source, target)
