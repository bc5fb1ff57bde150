"""React to the world outside a run: new or changed Gaia files in each release's landing
folder, and a provisioned cluster that no run has used for its profile's ``idle_minutes``."""

import calendar
import functools
import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dagster import (
    DagsterInstance,
    DagsterRunStatus,
    DefaultSensorStatus,
    RunRequest,
    RunsFilter,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    sensor,
)

from gaia_flows.cloud.lease import renew_lease
from gaia_flows.cloud.settings import RUN_TAG_TEARDOWN_DECISION, RUN_TAG_TEARDOWN_REASON
from gaia_flows.jobs import release_catalogue_job, teardown_cluster_job
from gaia_flows.layout import REGION_MANIFEST, SOURCE_TABLE, StateLayout, landing_files
from gaia_flows.partitions import range_tags
from gaia_flows.releases import RELEASES, Release
from gaia_flows.resources.cloud import CloudResource
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


@functools.cache
def build_landing_files_sensor(releases: tuple[Release, ...]) -> SensorDefinition:
    """``landing_files_sensor`` over the landing folders of ``releases``, each launching that
    release's catalogue job (:func:`gaia_flows.jobs.release_catalogue_job`)."""
    jobs = {release: release_catalogue_job(release) for release in releases}

    @sensor(
        name="landing_files_sensor",
        jobs=list(jobs.values()),
        minimum_interval_seconds=60,
        default_status=DefaultSensorStatus.RUNNING,
    )
    def landing_files_sensor(context: SensorEvaluationContext):
        """Launch only the regions whose landing files are new or changed since the last look,
        per release: DR3's files in the landing folder, another release's in ``landing/<release>/``.

        The cursor remembers each file's size and mtime (by its path under the landing folder),
        so a rewritten file triggers its regions again, and an untouched folder triggers
        nothing. The first look (no cursor, e.g. the first ``gaia-flows ui`` after ``make demo``)
        skips files older than the published versions of all their regions, so turning the
        daemon on does not ingest the catalogue a second time.
        """
        base = StateLayout.from_env()
        seen = json.loads(context.cursor) if context.cursor else None
        current: dict[str, str] = {}
        requests = []
        for release, job in jobs.items():
            layout = release.layout(base)
            files = {str(p.relative_to(base.landing)): p for p in landing_files(layout.landing)}
            marks = {key: _fingerprint(p) for key, p in files.items()}
            current.update(marks)
            if seen is None:
                changed = [p for p in files.values() if not _already_ingested(layout, p)]
            else:
                changed = [files[key] for key, mark in marks.items() if seen.get(key) != mark]
            if not changed:
                continue
            state = hashlib.sha1(json.dumps(marks, sort_keys=True).encode()).hexdigest()[:12]
            prefix = "" if release.is_default else f"{release.name}:"
            requests += [
                RunRequest(
                    run_key=f"{prefix}{first}..{last}@{state}",
                    job_name=job.name,
                    tags=range_tags(first, last),
                )
                for first, last in contiguous_runs(affected_regions(changed))
            ]
        if not requests:
            return SkipReason(f"no new or changed files among {len(current)} in {base.landing}")
        return SensorResult(run_requests=requests, cursor=json.dumps(current, sort_keys=True))

    return landing_files_sensor


landing_files_sensor = build_landing_files_sensor(tuple(RELEASES.values()))


FINISHED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


@dataclass(frozen=True)
class Idleness:
    idle: bool
    reason: str


def cluster_idleness(instance: DagsterInstance, manifest: dict, idle_minutes: float, now: float) -> Idleness:
    """Whether the cluster in ``manifest`` has had no run for ``idle_minutes``, and why.

    With a cloud profile every run's Spark session goes to the cluster, so any run other than
    a teardown counts as use: one still queued or running keeps the cluster; otherwise it has
    been idle since the later of its provisioning and the end of the last run after it.
    """
    provisioned = float(calendar.timegm(time.strptime(manifest["updated_at"], "%Y-%m-%dT%H:%M:%SZ")))
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(provisioned))
    records = [
        r
        for r in instance.get_run_records(filters=RunsFilter(updated_after=_utc(provisioned)))
        if r.dagster_run.job_name != teardown_cluster_job.name
    ]
    busy = [r.dagster_run for r in records if r.dagster_run.status not in FINISHED]
    if busy:
        names = ", ".join(f"{r.job_name} ({r.run_id[:8]}, {r.status.value})" for r in busy[:3])
        return Idleness(False, f"in use by {len(busy)} unfinished run(s): {names}")
    last = max(records, key=lambda r: r.end_time or 0.0, default=None)
    last_used = max(provisioned, (last.end_time or 0.0) if last else 0.0)
    what = (
        f"last run {last.dagster_run.job_name} ({last.dagster_run.run_id[:8]}) ended "
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(last_used))}"
        if last and last_used > provisioned
        else f"no run since it was provisioned at {since}"
    )
    idle = (now - last_used) / 60
    if idle < idle_minutes:
        return Idleness(False, f"idle {idle:.1f} min < idle_minutes {idle_minutes:g}; {what}")
    return Idleness(True, f"idle {idle:.1f} min >= idle_minutes {idle_minutes:g}; {what}")


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


@sensor(job=teardown_cluster_job, minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING)
def idle_cluster_sensor(context: SensorEvaluationContext, cloud: CloudResource):
    """Launch ``teardown_cluster`` when the profile's cluster has had no run for ``idle_minutes``.

    The orchestrator decides, from its own run history, so a cluster someone provisioned and
    forgot costs at most the idle window; the decision and its reason travel as run tags. A
    tick that keeps the cluster renews the orchestrator's lease (``cloud.lease``), which the
    nodes' dead-man switch watches.
    """
    if not cloud.enabled:
        return SkipReason(f"profile {cloud.profile!r} has no cloud")
    settings = cloud.settings()
    path = Path(settings.manifest_path)
    if not path.exists():
        return SkipReason(f"no cluster {settings.name!r} is provisioned (no manifest at {path})")
    manifest = json.loads(path.read_text())
    verdict = cluster_idleness(context.instance, manifest, settings.cluster.idle_minutes, time.time())
    if not verdict.idle:
        lease = renew_lease(settings)
        renewed = f"; lease renewed at {lease}" if lease else ""
        return SkipReason(f"cluster {settings.name!r} kept: {verdict.reason}{renewed}")
    context.log.info(f"tearing down cluster {settings.name!r}: {verdict.reason}")
    return RunRequest(
        run_key=f"idle-teardown:{settings.name}:{manifest['updated_at']}",
        tags={RUN_TAG_TEARDOWN_DECISION: "idle", RUN_TAG_TEARDOWN_REASON: verdict.reason},
    )
