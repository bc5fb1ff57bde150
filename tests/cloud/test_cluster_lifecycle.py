"""A cluster's life from a person's side: what it costs before create (``cluster plan``, the
``max_hourly_cost`` gate), one command each way (``cluster up`` / ``status`` / ``down`` by
subprocess), and the orchestrator's idle teardown (``cluster_sensor`` evaluated for real,
then the job it launches).

Against moto EC2 behind the request-counting proxy and the OpenStack fake over HTTP; every
claim about what exists is checked in the emulator's own state.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, DagsterInstance, DagsterRunStatus, build_sensor_context, job, op

from cloud.emulators import aws_cloud, openstack_cloud, write_profile
from cloud.test_cloud_provisioning import failure, materialise, metadata, teardown
from gaia_flows.cloud.lease import release_lease, renew_lease
from gaia_flows.cloud.provision import render_user_data
from gaia_flows.cloud.settings import (
    LEASE_DIR,
    RUN_TAG_TEARDOWN_DECISION,
    RUN_TAG_TEARDOWN_REASON,
    CloudSettings,
)
from gaia_flows.profiles import load_profile
from gaia_flows.resources.cloud import CloudResource
from gaia_flows.resources.storage import StorageResource
from gaia_flows.sensors import cluster_idleness, cluster_sensor

# A price table of the kind a profile carries (per-hour on-demand, the test's own figures).
PRICES = {"c5.large": 0.085, "m5.xlarge": 0.192}
PRICE_SOURCE = "test table, 2026-12-06"
# What moto's EC2 receives when anything would be created or changed.
EC2_MUTATIONS = (
    "Action=RunInstances",
    "Action=CreateSecurityGroup",
    "Action=AuthorizeSecurityGroupIngress",
    "Action=CreateKeyPair",
    "Action=ImportKeyPair",
    "Action=CreateTags",
)


def _budget_profile(target, max_hourly_cost: float) -> str:
    cloud = aws_cloud(target.api, max_hourly_cost=max_hourly_cost)
    cloud["sizes"] = {"allowed": sorted(PRICES), "prices": PRICES, "price_source": PRICE_SOURCE}
    return write_profile(target.profiles_dir, "aws", "aws-budget", cloud)


@pytest.mark.parametrize("target", ["aws"], indirect=True)
def test_a_plan_over_max_hourly_cost_is_refused_before_any_create_request(target, layout):
    # 3 x m5.xlarge + a c5.large master = 0.661/h.
    before = target.requests()
    refused = materialise(target, workers=3, profile=_budget_profile(target, 0.5), raise_on_error=False)
    message, meta = failure(refused)
    assert "0.6610/h" in message and "max_hourly_cost 0.5" in message
    assert not [k for k in target.requests() if k in EC2_MUTATIONS and target.count(k, before)]
    assert target.count(target.create_request, before) == 0
    assert target.servers() == [] and target.security_groups() == [] and target.key_pairs() == []
    cost = meta["plan_cost"]
    assert cost["cost_per_hour"] == pytest.approx(3 * PRICES["m5.xlarge"] + PRICES["c5.large"])
    assert {n["price_source"] for n in cost["nodes"]} == {f"profile: {PRICE_SOURCE}"}

    # Under the budget the same profile provisions, and the figures are in the metadata.
    meta = metadata(materialise(target, workers=2, profile=_budget_profile(target, 0.5)))
    assert target.count(target.create_request, before) == 3
    assert meta["plan_cost"]["cost_per_hour"] == pytest.approx(2 * 0.192 + 0.085)
    assert (meta["vcpus_total"], meta["ram_mb_total"]) == (2 * 4 + 2, 2 * 16384 + 4096)
    # A node that powers itself off (the dead-man switch) is terminated, not kept stopped.
    ec2 = target._ec2()
    for instance_id in meta["node_ids"]:
        attribute = ec2.describe_instance_attribute(
            InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior"
        )
        assert attribute["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    teardown(target, _budget_profile(target, 0.5))


def _cli(*args: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "gaia_flows.cli", "cluster", *args]
    return subprocess.run(argv, env=dict(os.environ), capture_output=True, text=True, timeout=300)


def _profile_path(target, name: str) -> str:
    return str(target.profiles_dir / f"{name}.yaml")


@pytest.mark.parametrize("target", ["openstack"], indirect=True)
def test_cluster_plan_shows_the_quota_footprint_on_openstack_and_creates_nothing(target, layout):
    before = target.requests()
    proc = _cli("plan", "--profile", _profile_path(target, target.profile), "--workers", "3", "--size",
                target.worker_size, "--data-bytes", str(50 * 2**30), "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    workers = next(n for n in report["nodes"] if n["role"] == "worker")
    assert (workers["size"], workers["count"], workers["vcpus"]) == (target.worker_size, 3, 4)
    assert report["cost_per_hour"] is None and workers["price_source"] is None
    # The fake's quota (--max-cores 128 etc. by default), read through Nova's os-quota-sets.
    quota = report["quota"]
    assert quota["cores"] == {
        "needs": report["vcpus"],
        "limit": 128,
        "in_use": 0,
        "free_after": 128 - report["vcpus"],
    }
    assert quota["instances"]["needs"] == 4 and quota["instances"]["limit"] == 20
    assert [s["stage"] for s in report["estimate"]["stages"]] == ["gaia_source (ingest)", "pm_stats"]
    assert target.count(target.create_request, before) == 0 and target.servers() == []

    human = _cli("plan", "--profile", _profile_path(target, target.profile), "--workers", "3", "--size",
                 target.worker_size)  # fmt: skip
    assert human.returncode == 0, human.stderr
    assert "Quota footprint" in human.stdout and target.worker_size in human.stdout


@pytest.mark.parametrize("target", ["openstack"], indirect=True)
def test_cluster_up_status_down_by_subprocess(target, layout, monkeypatch):
    profile = _profile_path(target, target.profile)
    up = _cli("up", "--profile", profile, "--workers", "2", "--size", target.worker_size)
    assert up.returncode == 0, up.stdout + up.stderr
    names = sorted(s["name"] for s in target.servers())
    assert names == [f"{target.cluster}-master", f"{target.cluster}-worker-0", f"{target.cluster}-worker-1"]
    assert "up (run " in up.stdout

    status = _cli("status", "--profile", profile, "--json")
    assert status.returncode == 0, status.stderr
    seen = json.loads(status.stdout)
    assert sorted(n["name"] for n in seen["nodes"]) == names
    assert seen["security_group"] == f"{target.cluster}-sg" and seen["key_pair"] == f"{target.cluster}-key"
    assert seen["master_url"].startswith("spark://") and seen["idle"]["idle"] is False

    down = _cli("down", "--profile", profile)
    assert down.returncode == 0, down.stdout + down.stderr
    assert target.servers() == [] and target.security_groups() == [] and target.key_pairs() == []
    assert not (layout.clusters / f"{target.cluster}.json").exists()
    after = json.loads(_cli("status", "--profile", profile, "--json").stdout)
    assert after["nodes"] == [] and after["manifest"] is None

    # Both were runs of the state folder's instance, as the UI and the idle sensor see them.
    monkeypatch.setenv("DAGSTER_HOME", str(layout.dagster_home))  # the instance's dagster.yaml reads it
    with DagsterInstance.from_config(str(layout.dagster_home)) as instance:
        runs = instance.get_runs()
        materialised = instance.get_latest_materialization_event(AssetKey("spark_cluster"))
    assert [r.job_name for r in runs][0] == "teardown_cluster" and len(runs) == 2
    assert materialised is not None and materialised.run_id == runs[1].run_id


IDLE_MINUTES = 0.05  # 3 s


def _sensor_profile(target, layout, name: str, **settings):
    """An OpenStack profile ``name`` with cluster ``settings``, its share mounted under the state
    folder: (profile, the cluster's lease file, the CloudResource the sensor gets)."""
    profile = write_profile(target.profiles_dir, "openstack", name, openstack_cloud(target.api, **settings))
    share = _mount_share(target.profiles_dir / f"{profile}.yaml", layout.home / "share")
    resource = CloudResource(
        storage=StorageResource(), profile=profile, profiles_dir=str(target.profiles_dir)
    )
    return profile, share / LEASE_DIR / target.cluster, resource


@pytest.mark.parametrize("target", ["openstack"], indirect=True)
def test_idle_sensor_tears_the_cluster_down_after_idle_minutes(target, layout):
    profile, lease, resource = _sensor_profile(target, layout, "openstack-idle", idle_minutes=IDLE_MINUTES)
    with DagsterInstance.local_temp(str(layout.dagster_home)) as instance:
        materialise(target, workers=2, profile=profile, instance=instance)
        manifest = json.loads((layout.clusters / f"{target.cluster}.json").read_text())
        assert lease.exists(), "spark_cluster writes the lease before the nodes boot"
        provisioned_lease = lease.stat().st_mtime
        (run,) = instance.get_run_records()
        # Within the window the cluster stays; past it, it goes.
        early = cluster_idleness(instance, manifest, IDLE_MINUTES, now=run.end_time + 1)
        assert not early.idle and "idle 0.0 min < idle_minutes 0.05" in early.reason
        late = cluster_idleness(instance, manifest, IDLE_MINUTES, now=run.end_time + 4)
        assert late.idle and run.dagster_run.run_id[:8] in late.reason

        # A run still going keeps the cluster, however long since the last one ended.
        time.sleep(IDLE_MINUTES * 60 + 0.5)
        busy = instance.create_run_for_job(job_def=_busy_job)  # NOT_STARTED: not finished
        kept = _tick(instance, resource)
        assert not kept.run_requests and "unfinished" in kept.skip_message, kept
        assert lease.stat().st_mtime > provisioned_lease + IDLE_MINUTES * 60, (
            "a kept cluster's lease is renewed"
        )
        instance.report_run_canceled(busy)
        time.sleep(IDLE_MINUTES * 60 + 0.5)

        (request,) = _tick(instance, resource).run_requests
        assert request.tags[RUN_TAG_TEARDOWN_DECISION] == "idle"
        assert "idle_minutes 0.05" in request.tags[RUN_TAG_TEARDOWN_REASON]
        assert target.servers(), "the sensor decides; the job removes"

        result = teardown(target, profile, instance=instance, tags=request.tags)
        assert result.success
        assert target.servers() == [] and target.security_groups() == [] and target.key_pairs() == []
        assert not (layout.clusters / f"{target.cluster}.json").exists() and not lease.exists()
        (observation,) = [
            e.asset_observation_data.asset_observation
            for e in result.all_events
            if e.event_type_value == "ASSET_OBSERVATION"
        ]
        assert observation.metadata["decision"].value == "idle"
        assert observation.metadata["reason"].value == request.tags[RUN_TAG_TEARDOWN_REASON]
        stored = instance.get_run_by_id(result.run_id)
        assert stored.tags[RUN_TAG_TEARDOWN_DECISION] == "idle" and stored.status == DagsterRunStatus.SUCCESS

        gone = _tick(instance, resource)
        assert not gone.run_requests and "no cluster" in gone.skip_message


def _tick(instance, resource):
    """One evaluation of the sensor as the daemon runs it (a tick: requests or a skip reason)."""
    with build_sensor_context(instance=instance, resources={"cloud": resource}) as context:
        return cluster_sensor.evaluate_tick(context)


@op
def _wait():
    pass


@job(name="busy_on_cluster")
def _busy_job():
    _wait()


def _mount_share(profile_yaml, share):
    """Point the profile's storage.mount at a folder of the test (the share on this host)."""
    share.mkdir(parents=True, exist_ok=True)
    spec = yaml.safe_load(profile_yaml.read_text())
    spec["storage"]["mount"] = str(share)
    profile_yaml.write_text(yaml.safe_dump(spec, sort_keys=False))
    return share


def test_dead_man_switch_powers_the_node_off_when_the_lease_is_not_renewed(tmp_path):
    """The switch as cloud-init installs it, run with systemctl replaced by a recorder."""
    settings = CloudSettings.from_profile(load_profile("openstack"))
    share = tmp_path / "share"
    share.mkdir()
    settings = replace(
        settings, storage={"mount": str(share)}, cluster=replace(settings.cluster, orphan_minutes=1)
    )
    user_data = render_user_data(
        settings,
        role="master",
        node_name="gaia-os-master",
        master_host="0.0.0.0",
        worker_cores=2,
        worker_memory_mb=1024,
    )
    files = {f["path"]: f["content"] for f in yaml.safe_load(user_data)["write_files"]}
    assert "OnUnitActiveSec=1min" in files["/etc/systemd/system/gaia-deadman.timer"]
    assert "[systemctl, enable, --now, gaia-deadman.timer]" in user_data.replace("'", "")
    switch = tmp_path / "gaia-deadman"
    switch.write_text(files["/opt/gaia-flows/bin/gaia-deadman"])
    switch.chmod(0o755)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "systemctl.calls"
    for tool, body in (("systemctl", f'echo "$@" >> {calls}'), ("logger", "true")):
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}

    def tick() -> list[str]:
        calls.unlink(missing_ok=True)
        subprocess.run([str(switch)], env=env, check=True, timeout=30)
        return calls.read_text().split("\n")[:-1] if calls.exists() else []

    uptime = float(Path("/proc/uptime").read_text().split()[0])
    assert uptime > 60, "the host booted under a minute ago: a missing lease is not yet stale"
    assert tick() == ["poweroff"], "never renewed since boot, longer than orphan_minutes"
    lease = renew_lease(settings)
    assert lease == share / LEASE_DIR / "gaia-os" and tick() == []
    os.utime(lease, (time.time() - 59, time.time() - 59))
    assert tick() == []
    os.utime(lease, (time.time() - 61, time.time() - 61))
    assert tick() == ["poweroff"]
    release_lease(settings)
    assert not lease.exists()


@pytest.mark.parametrize("target", ["openstack"], indirect=True)
def test_nodes_that_powered_themselves_off_are_replaced_by_the_next_reconcile(target, layout):
    """On OpenStack a node's dead-man switch leaves a SHUTOFF server holding quota; the
    orchestrator's next reconcile replaces it and teardown removes it."""
    first = metadata(materialise(target, workers=2))
    driver = CloudResource(
        storage=StorageResource(), profile=target.profile, profiles_dir=str(target.profiles_dir)
    ).driver()
    for node in driver.list_nodes():  # each guest ran `systemctl poweroff`
        driver.ex_stop_node(node)
    assert {s["status"] for s in target.api.state()["servers"]} == {"SHUTOFF"}

    again = metadata(materialise(target, workers=2))
    assert sorted(again["destroyed"]) == sorted(first["created"]) and len(again["created"]) == 3
    assert set(again["node_ids"]).isdisjoint(first["node_ids"])
    assert {s["status"] for s in target.api.state()["servers"]} == {"ACTIVE"}
    assert teardown(target).success and target.servers() == []


@pytest.mark.parametrize("target", ["openstack"], indirect=True)
def test_cluster_sensor_removes_a_cluster_that_powered_off_while_the_orchestrator_was_away(target, layout):
    """Back after orphan_minutes, the orchestrator finds a stale lease and SHUTOFF servers
    holding quota: the sensor tears them down at once, before idle_minutes and with no new run."""
    profile, lease, resource = _sensor_profile(
        target, layout, "openstack-orphan", orphan_minutes=1
    )  # idle_minutes stays 30
    with DagsterInstance.local_temp(str(layout.dagster_home)) as instance:
        materialise(target, workers=2, profile=profile, instance=instance)

        def away() -> None:  # nobody renewed the lease for longer than orphan_minutes
            stale = time.time() - 61
            os.utime(lease, (stale, stale))

        away()
        running = _tick(instance, resource)  # the switch has not fired yet: a stale lease alone is no reason
        assert not running.run_requests and "kept" in running.skip_message
        assert time.time() - lease.stat().st_mtime < 5, "the returning orchestrator renews the lease"

        away()
        driver = resource.driver()
        for node in driver.list_nodes():  # each node's gaia-deadman ran `systemctl poweroff`
            driver.ex_stop_node(node)
        (request,) = _tick(instance, resource).run_requests
        assert request.tags[RUN_TAG_TEARDOWN_DECISION] == "orphaned"
        reason = request.tags[RUN_TAG_TEARDOWN_REASON]
        assert ">= orphan_minutes 1" in reason and "(3 node(s): stopped)" in reason, reason
        assert teardown(target, profile, instance=instance, tags=request.tags).success
        assert target.servers() == [] and target.security_groups() == [] and target.key_pairs() == []
        assert not lease.exists()
