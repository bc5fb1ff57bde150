"""React to new or changed Gaia files in the landing folder."""

import hashlib
import json
from pathlib import Path

from dagster import DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, SkipReason, sensor

from gaia_flows.jobs import catalogue_job
from gaia_flows.layout import REGION_MANIFEST, SOURCE_TABLE, StateLayout, landing_files
from gaia_flows.partitions import range_tags
from gaia_flows.science.healpix import files_for_region, parse_region_key, region_keys


def affected_regions(files: list[Path]) -> list[str]:
    return [region for region in region_keys() if files_for_region(files, region)]


def contiguous_runs(regions: list[str]) -> list[tuple[str, str]]:
    """Group region keys into contiguous ranges: one run (one Spark start) per range."""
    pixels = sorted(parse_region_key(r)[1] for r in regions)
    keys = region_keys()
    runs: list[tuple[str, str]] = []
    for pixel in pixels:
        if runs and parse_region_key(runs[-1][1])[1] == pixel - 1:
            runs[-1] = (runs[-1][0], keys[pixel])
        else:
            runs.append((keys[pixel], keys[pixel]))
    return runs


def _fingerprint(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _already_ingested(layout: StateLayout, path: Path) -> bool:
    """Every region the file feeds was published after the file was last written."""
    regions = affected_regions([path])
    manifests = [layout.region_dir(SOURCE_TABLE, region) / REGION_MANIFEST for region in regions]
    return bool(regions) and all(
        m.exists() and m.stat().st_mtime_ns > path.stat().st_mtime_ns for m in manifests
    )


@sensor(job=catalogue_job, minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING)
def landing_files_sensor(context: SensorEvaluationContext):
    """Launch only the regions whose landing files are new or changed since the last look.

    The cursor remembers each file's size and mtime, so a rewritten file triggers its regions
    again, and an untouched folder triggers nothing. The first look (no cursor, e.g. the first
    ``gaia-flows ui`` after ``make demo``) skips files older than the published versions of all
    their regions, so turning the daemon on does not ingest the catalogue a second time.
    """
    layout = StateLayout.from_env()
    seen = json.loads(context.cursor) if context.cursor else None
    current = {p.name: _fingerprint(p) for p in landing_files(layout.landing)}
    if seen is None:
        changed = [p for p in (layout.landing / name for name in current) if not _already_ingested(layout, p)]
    else:
        changed = [layout.landing / name for name, mark in current.items() if seen.get(name) != mark]
    if not changed:
        return SkipReason(f"no new or changed files among {len(current)} in {layout.landing}")
    state = hashlib.sha1(json.dumps(current, sort_keys=True).encode()).hexdigest()[:12]
    requests = [
        RunRequest(run_key=f"{first}..{last}@{state}", tags=range_tags(first, last))
        for first, last in contiguous_runs(affected_regions(changed))
    ]
    return SensorResult(run_requests=requests, cursor=json.dumps(current, sort_keys=True))
