"""React to the world outside a run: new or changed Gaia files in each release's landing
folder, and the provisioned cluster's use (grown for a backfill, shrunk to ``min_workers`` and
torn down when idle)."""

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
    DagsterRun,
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

from gaia_flows.assets.cluster import region_bytes
from gaia_flows.cloud.lease import lease_age, renew_lease
from gaia_flows.cloud.provision import HEALTHY
from gaia_flows.cloud.settings import (
    RUN_TAG_RESIZE_DECISION,
    RUN_TAG_RESIZE_REASON,
    RUN_TAG_TEARDOWN_DECISION,
    RUN_TAG_TEARDOWN_REASON,
    CloudSettings,
)
from gaia_flows.jobs import release_catalogue_job, resize_cluster_job, teardown_cluster_job
from gaia_flows.layout import REGION_MANIFEST, SOURCE_TABLE, StateLayout, landing_files
from gaia_flows.partitions import range_tags, run_regions
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
UNFINISHED = [s for s in DagsterRunStatus if s not in FINISHED]
HEALTHY_STATES = {str(state) for state in HEALTHY}


@dataclass(frozen=True)
class Idleness:
    idle: bool
    reason: str


def _decided_by_orchestrator(run: DagsterRun) -> bool:
    """Teardowns and the sensor's own resizes are not use of the cluster."""
    return run.job_name == teardown_cluster_job.name or RUN_TAG_RESIZE_DECISION in run.tags


def cluster_idleness(
    instance: DagsterInstance, manifest: dict, minutes: float, now: float, setting: str = "idle_minutes"
) -> Idleness:
    """Whether the cluster in ``manifest`` has had no run for ``minutes`` (the profile's ``setting``), and why.

    With a cloud profile every run's Spark session goes to the cluster, so any run other than
    a teardown or a resize the sensor decided counts as use: one still queued or running keeps
    the cluster; otherwise it has been idle since the later of its creation and the end of the
    last run after it.
    """
    created = manifest.get("created_at", manifest["updated_at"])
    provisioned = float(calendar.timegm(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ")))
    busy = _unfinished_runs(instance)
    if busy:
        names = ", ".join(f"{r.job_name} ({r.run_id[:8]}, {r.status.value})" for r in busy[:3])
        return Idleness(False, f"in use by {len(busy)} unfinished run(s): {names}")
    # The run table's update times have whole seconds: look one second further back.
    ended = RunsFilter(statuses=list(FINISHED), updated_after=_utc(provisioned - 1))
    records = [
        r for r in instance.get_run_records(filters=ended) if not _decided_by_orchestrator(r.dagster_run)
    ]
    last = max(records, key=lambda r: r.end_time or 0.0, default=None)
    last_used = max(provisioned, (last.end_time or 0.0) if last else 0.0)
    what = (
        f"last run {last.dagster_run.job_name} ({last.dagster_run.run_id[:8]}) ended "
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(last_used))}"
        if last and last_used > provisioned
        else f"no run since it was created at {created}"
    )
    idle = (now - last_used) / 60
    if idle < minutes:
        return Idleness(False, f"idle {idle:.1f} min < {setting} {minutes:g}; {what}")
    return Idleness(True, f"idle {idle:.1f} min >= {setting} {minutes:g}; {what}")


def _utc(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _unfinished_runs(instance: DagsterInstance) -> list[DagsterRun]:
    """Runs queued or going that use the cluster, whenever they were created."""
    unfinished = instance.get_runs(filters=RunsFilter(statuses=UNFINISHED))
    return [r for r in unfinished if not _decided_by_orchestrator(r)]


def backfill_regions(instance: DagsterInstance) -> tuple[list[str], list[str]]:
    """Sky regions of the unfinished partitioned runs (queued or going), and those runs' ids."""
    runs = [r for r in _unfinished_runs(instance) if run_regions(r.tags)]
    regions = sorted({region for r in runs for region in run_regions(r.tags)})
    return regions, sorted(r.run_id for r in runs)


def _resize(
    settings: CloudSettings, manifest: dict, decision: str, workers: int, data_bytes: int, reason: str
):
    """A run of ``spark_cluster`` planned for ``data_bytes`` on the cluster's own worker size (a
    resize never replaces the workers it keeps), tagged with the decision and its reason."""
    size = manifest["size"]["id"]
    return RunRequest(
        job_name=resize_cluster_job.name,
        run_key=f"{decision}:{settings.name}:{manifest['updated_at']}:{workers}",
        run_config={"ops": {"spark_cluster": {"config": {"data_bytes": data_bytes, "size": size}}}},
        tags={RUN_TAG_RESIZE_DECISION: decision, RUN_TAG_RESIZE_REASON: reason},
    )


def _powered_off(cloud: CloudResource, settings: CloudSettings, now: float) -> str | None:
    """Why the cluster is to be removed at once, if its lease went stale and no node runs.

    An orchestrator that was away (crashed, asleep) for ``orphan_minutes`` stopped renewing the
    lease, so the nodes' dead-man switch powered them off. On clouds where a powered-off VM
    stays (OpenStack SHUTOFF) it still holds quota; only then does the sensor ask the cloud.
    """
    age = lease_age(settings, now)
    if age is None or age < settings.cluster.orphan_minutes * 60:
        return None
    nodes = cloud.provisioner().inventory()["nodes"]
    running = [n for n in nodes if n["state"] in HEALTHY_STATES]
    if running:
        return None
    states = ", ".join(sorted({n["state"] for n in nodes})) or "none left"
    return (
        f"lease not renewed for {age / 60:.1f} min >= orphan_minutes {settings.cluster.orphan_minutes:g}: "
        f"the nodes powered themselves off ({len(nodes)} node(s): {states})"
    )


@sensor(
    jobs=[teardown_cluster_job, resize_cluster_job],
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
)
def cluster_sensor(context: SensorEvaluationContext, cloud: CloudResource):
    """Fit the profile's cluster to its use, from the orchestrator's own run history.

    - **Grow**: unfinished partitioned runs (a backfill, queued or going) read the landing
      files of their regions; when the planner, on the cluster's worker size, asks for more
      workers than run (at most ``limits.max_workers``), ``resize_cluster`` adds them. Spark's
      dynamic allocation gives running applications executors on them as they join.
    - **Shrink**: after ``worker_idle_minutes`` without a run, ``resize_cluster`` removes the
      workers beyond ``limits.min_workers``.
    - **Tear down**: after ``idle_minutes`` without a run, ``teardown_cluster`` removes it all.
      So a cluster someone provisioned and forgot costs at most the idle window. It goes at
      once, without waiting for ``idle_minutes``, when the lease went stale (the orchestrator
      was away for ``orphan_minutes``) and no node runs: the dead-man switch powered them off.

    Resizes do not count as use, so they never postpone the teardown. Every decision and its
    reason travel as run tags. A tick that keeps the cluster renews the orchestrator's lease
    (``cloud.lease``), which the nodes' dead-man switch watches.
    """
    if not cloud.enabled:
        return SkipReason(f"profile {cloud.profile!r} has no cloud")
    settings = cloud.settings()
    path = Path(settings.manifest_path)
    if not path.exists():
        return SkipReason(f"no cluster {settings.name!r} is provisioned (no manifest at {path})")
    manifest = json.loads(path.read_text())
    now = time.time()
    orphaned = _powered_off(cloud, settings, now)
    if orphaned:
        context.log.info(f"tearing down cluster {settings.name!r}: {orphaned}")
        return RunRequest(
            job_name=teardown_cluster_job.name,
            run_key=f"orphan-teardown:{settings.name}:{manifest['updated_at']}",
            tags={RUN_TAG_TEARDOWN_DECISION: "orphaned", RUN_TAG_TEARDOWN_REASON: orphaned},
        )
    verdict = cluster_idleness(context.instance, manifest, settings.cluster.idle_minutes, now)
    if verdict.idle:
        context.log.info(f"tearing down cluster {settings.name!r}: {verdict.reason}")
        return RunRequest(
            job_name=teardown_cluster_job.name,
            run_key=f"idle-teardown:{settings.name}:{manifest['updated_at']}",
            tags={RUN_TAG_TEARDOWN_DECISION: "idle", RUN_TAG_TEARDOWN_REASON: verdict.reason},
        )
    lease = renew_lease(settings)
    kept = f"cluster {settings.name!r} kept: {verdict.reason}" + (
        f"; lease renewed at {lease}" if lease else ""
    )
    workers, floor = manifest["worker_count"], settings.limits.min_workers

    regions, runs = backfill_regions(context.instance)
    data_bytes = region_bytes(cloud.layout, regions) if regions else 0
    if data_bytes:
        plan = cloud.provisioner().plan(data_bytes, size=manifest["size"]["id"])
        if plan.worker_count > workers:
            reason = (
                f"{len(runs)} unfinished run(s) over {len(regions)} region(s) read {data_bytes / 2**30:.2f} GiB: "
                f"the planner asks for {plan.worker_count} x {plan.size.name} (max_workers {plan.max_workers}), "
                f"{workers} run"
            )
            context.log.info(f"growing cluster {settings.name!r}: {reason}")
            return _resize(settings, manifest, "grow", plan.worker_count, data_bytes, reason)

    if workers > floor:
        spare = cluster_idleness(
            context.instance, manifest, settings.cluster.worker_idle_minutes, now, "worker_idle_minutes"
        )
        if spare.idle:
            reason = f"{spare.reason}: {workers} worker(s) -> min_workers {floor}"
            context.log.info(f"shrinking cluster {settings.name!r}: {reason}")
            return _resize(settings, manifest, "shrink", floor, 0, reason)
    return SkipReason(kept)
