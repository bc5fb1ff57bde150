"""Elastic and interruptible workers, checked in the emulators' own state.

- On a real Spark standalone cluster (the local driver, profile ``local-cluster``): an
  application that started on one worker gets an executor on a worker added while it runs
  (dynamic allocation with shuffle tracking, under the manifest's settings).
- On the OpenStack fake (over HTTP; no Spark runs on its servers): a queued backfill over many
  regions makes ``cluster_sensor`` grow the cluster toward what the planner asks for, idle
  time (shortened) shrinks it back to ``limits.min_workers``, and the later teardown counts
  from the backfill's end, not from the sensor's own resizes.
- On moto EC2: with ``spot_workers`` the workers are Spot instances and the master is not; a
  Spot worker the cloud takes back is replaced by the next reconcile.
"""

import json
import time
from dataclasses import replace

import pytest
import yaml
from dagster import DagsterInstance, build_sensor_context, job, materialize, op

from cloud.emulators import aws_cloud, openstack_cloud, write_profile
from cloud.test_cloud_provisioning import _resources, materialise, metadata, teardown
from cloud.test_cluster_lifecycle import _mount_share
from gaia_flows import spark as spark_factory
from gaia_flows.assets.cluster import spark_cluster
from gaia_flows.cloud import local_spark
from gaia_flows.cloud.settings import (
    RUN_TAG_RESIZE_DECISION,
    RUN_TAG_RESIZE_REASON,
    RUN_TAG_TEARDOWN_DECISION,
    CloudConfigError,
    CloudSettings,
)
from gaia_flows.jobs import resize_cluster_job, teardown_cluster_job
from gaia_flows.partitions import range_tags, run_regions, sky_regions
from gaia_flows.profiles import PROFILES_DIR, load_profile
from gaia_flows.resources import build_resources
from gaia_flows.resources.cloud import CloudResource
from gaia_flows.resources.storage import StorageResource
from gaia_flows.sensors import cluster_sensor

WORKER_IDLE_MINUTES = 0.05  # 3 s
IDLE_MINUTES = 0.15  # 9 s
REGION_PIXELS = 4**7  # level-8 pixels per level-1 sky region: one bulk file per region here
GIB = 2**30


def _landing_file(landing, region: int, size: int) -> None:
    """A Gaia bulk file of ``size`` bytes for one region, sparse: the planner reads only its size."""
    start, end = region * REGION_PIXELS, (region + 1) * REGION_PIXELS - 1
    with open(landing / f"GaiaSource_{start:06d}-{end:06d}.csv.gz", "wb") as fh:
        fh.truncate(size)


@op
def _read_regions():
    pass


@job(name="backfill_on_cluster")
def _backfill_job():
    _read_regions()


def _tick(instance, resource):
    with build_sensor_context(instance=instance, resources={"cloud": resource}) as context:
        return cluster_sensor.evaluate_tick(context)


def _workers(target) -> list[str]:
    return sorted(s["name"] for s in target.servers() if s["tags"].get("gaia-flows-role") == "worker")


@pytest.mark.parametrize("target", ["openstack"], indirect=True)
def test_a_backfill_grows_the_cluster_and_idle_time_shrinks_it_to_min_workers(target, layout):
    cloud = openstack_cloud(target.api, idle_minutes=IDLE_MINUTES, worker_idle_minutes=WORKER_IDLE_MINUTES)
    cloud["limits"] = {"min_workers": 1, "max_workers": 4}
    profile = write_profile(target.profiles_dir, "openstack", "openstack-elastic", cloud)
    _mount_share(target.profiles_dir / f"{profile}.yaml", layout.home / "share")  # the lease's home
    resource = CloudResource(
        storage=StorageResource(), profile=profile, profiles_dir=str(target.profiles_dir)
    )
    resources = _resources(target, profile)
    # 12 regions x 1.75 GiB = 21 GiB; an aggregate scans 2 GiB per core: 11 cores, and a
    # general.v1.medium worker (4 vCPU, one 4-core executor) gives 4, so 3 workers.
    for region in range(12):
        _landing_file(layout.landing, region, 7 * GIB // 4)
    keys = sky_regions.get_partition_keys()

    with DagsterInstance.local_temp(str(layout.dagster_home)) as instance:
        up = {"size": target.worker_size, "data_bytes": 0}  # nothing to read yet: min_workers
        first = metadata(
            materialize(
                [spark_cluster],
                resources=resources,
                run_config={"ops": {"spark_cluster": {"config": up}}},
                instance=instance,
            )
        )
        assert first["worker_count"] == 1 and _workers(target) == [f"{target.cluster}-worker-0"]
        master = first["node_ids"][0]
        quiet = _tick(instance, resource)
        assert not quiet.run_requests and "kept" in quiet.skip_message

        # A single-run backfill over regions 0..11 is queued: the sensor grows the cluster.
        backfill = instance.create_run_for_job(job_def=_backfill_job, tags=range_tags(keys[0], keys[11]))
        (grow,) = _tick(instance, resource).run_requests
        assert grow.job_name == resize_cluster_job.name and grow.tags[RUN_TAG_RESIZE_DECISION] == "grow"
        assert "12 region(s) read 21.00 GiB" in grow.tags[RUN_TAG_RESIZE_REASON]
        assert f"3 x {target.worker_size} (max_workers 4)" in grow.tags[RUN_TAG_RESIZE_REASON]
        grown = metadata(_execute(grow, resources, instance))
        assert grown["worker_count"] == 3 and grown["node_ids"][0] == master
        assert _workers(target) == [f"{target.cluster}-worker-{i}" for i in range(3)]
        assert sorted(grown["kept"]) == [f"{target.cluster}-master", f"{target.cluster}-worker-0"]
        assert grown["spark_conf"]["spark.dynamicAllocation.maxExecutors"] == "4"  # max_workers x 1
        again = _tick(instance, resource)  # the planner's count is met: nothing more to do
        assert not again.run_requests and "in use by 1 unfinished run(s)" in again.skip_message

        instance.report_run_canceled(backfill)
        ended = instance.get_run_record_by_id(backfill.run_id).end_time
        assert not _tick(instance, resource).run_requests, "within worker_idle_minutes the workers stay"
        _sleep_until(ended + WORKER_IDLE_MINUTES * 60 + 0.5)
        (shrink,) = _tick(instance, resource).run_requests
        assert shrink.job_name == resize_cluster_job.name and shrink.tags[RUN_TAG_RESIZE_DECISION] == "shrink"
        assert "3 worker(s) -> min_workers 1" in shrink.tags[RUN_TAG_RESIZE_REASON]
        shrunk = metadata(_execute(shrink, resources, instance))
        assert shrunk["worker_count"] == 1 and shrunk["node_ids"][0] == master
        assert _workers(target) == [f"{target.cluster}-worker-0"]
        assert sorted(shrunk["destroyed"]) == [f"{target.cluster}-worker-{i}" for i in (1, 2)]
        assert not _tick(instance, resource).run_requests, "at min_workers, before idle_minutes"

        # The resizes were the sensor's own runs: the idle window counts from the backfill's end.
        shrink_ended = max(r.end_time for r in instance.get_run_records())
        _sleep_until(ended + IDLE_MINUTES * 60 + 0.5)
        assert time.time() < shrink_ended + IDLE_MINUTES * 60
        (down,) = _tick(instance, resource).run_requests
        assert down.job_name == teardown_cluster_job.name and down.tags[RUN_TAG_TEARDOWN_DECISION] == "idle"
        assert teardown(target, profile, instance=instance, tags=down.tags).success
        assert target.servers() == [] and target.security_groups() == []


def _execute(request, resources, instance):
    """The run a request asks for, in process (resize_cluster is spark_cluster alone)."""
    return materialize(
        [spark_cluster],
        resources=resources,
        run_config=request.run_config,
        tags=request.tags,
        instance=instance,
    )


def _sleep_until(epoch: float) -> None:
    time.sleep(max(0.0, epoch - time.time()))


@pytest.mark.parametrize("target", ["aws"], indirect=True)
def test_spot_workers_with_an_on_demand_master_and_a_lost_one_replaced(target, layout):
    profile = write_profile(
        target.profiles_dir, "aws", "aws-spot", aws_cloud(target.api, spot_workers=True, spot_max_price=0.05)
    )
    _mount_share(target.profiles_dir / f"{profile}.yaml", layout.home / "share")
    first = metadata(materialise(target, workers=2, profile=profile))
    assert first["worker_count"] == 2
    markets = {n["role"]: n["market"] for n in first["plan_cost"]["nodes"]}
    assert markets == {"master": "on-demand", "worker": "spot"}

    def lifecycles() -> dict[str, str]:
        out = {}
        for reservation in target._ec2().describe_instances()["Reservations"]:
            for i in reservation["Instances"]:
                if i["State"]["Name"] == "running":
                    name = {t["Key"]: t["Value"] for t in i["Tags"]}["Name"]
                    out[name] = i.get("InstanceLifecycle", "on-demand")
        return out

    names = [f"{target.cluster}-master", f"{target.cluster}-worker-0", f"{target.cluster}-worker-1"]
    assert lifecycles() == dict(zip(names, ["on-demand", "spot", "spot"], strict=True))

    # The cloud takes worker-1 back (a Spot interruption ends in termination).
    lost = first["node_ids"][names.index(f"{target.cluster}-worker-1")]
    target._ec2().terminate_instances(InstanceIds=[lost])
    assert sorted(lifecycles()) == names[:2]

    again = metadata(materialise(target, workers=2, profile=profile))
    assert again["created"] == [f"{target.cluster}-worker-1"] and again["destroyed"] == []
    assert sorted(again["kept"]) == names[:2] and lost not in again["node_ids"]
    assert lifecycles() == dict(zip(names, ["on-demand", "spot", "spot"], strict=True))
    assert teardown(target, profile).success and target.servers() == []


def test_spot_workers_are_refused_where_the_cloud_has_none():
    profile = load_profile("openstack")
    spec = {**profile.cloud, "cluster": {**profile.cloud["cluster"], "spot_workers": True}}
    with pytest.raises(CloudConfigError, match="spot_workers is for ec2 and gce; openstack has no spot"):
        CloudSettings.from_profile(replace(profile, cloud=spec))


@pytest.mark.cluster
def test_a_running_application_gets_executors_on_workers_added_while_it_runs(
    layout, tmp_path, _spark_application
):
    spec = yaml.safe_load((PROFILES_DIR / "local-cluster.yaml").read_text())
    spec["name"] = "local-elastic"
    spec["cloud"]["limits"].update({"min_workers": 1, "max_workers": 2})
    # One core per worker, with the 1 GiB per core an aggregate's executor needs.
    spec["cloud"]["sizes"]["local"] = [{"name": "local.1x3g", "vcpus": 1, "ram_mb": 3072}]
    spec["spark"]["conf"].update(
        {
            "spark.driver.memory": "1g",
            "spark.dynamicAllocation.enabled": "true",
            "spark.dynamicAllocation.shuffleTracking.enabled": "true",
            "spark.dynamicAllocation.executorIdleTimeout": "5s",  # 60 s in the shipped profiles
        }
    )
    (tmp_path / "local-elastic.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    resources = build_resources(load_profile("local-elastic", tmp_path))

    def reconcile(data_bytes: int) -> dict:
        config = {"size": "local.1x3g", "data_bytes": data_bytes}
        run_config = {"ops": {"spark_cluster": {"config": config}}}
        return metadata(materialize([spark_cluster], resources=resources, run_config=run_config))

    def slow_task(i: int) -> int:  # nested, so it pickles by value: the workers cannot import tests
        time.sleep(1.0)
        return i

    def busy_workers() -> int:
        status = local_spark.master_status(master_ui)
        return sum(1 for w in status["workers"] if w["state"] == "ALIVE" and w["coresused"] > 0)

    try:
        small = reconcile(0)
        assert small["worker_count"] == 1
        conf = small["spark_conf"]  # a 1-core worker, one 1-core executor; room for max_workers
        assert (conf["spark.cores.max"], conf["spark.dynamicAllocation.maxExecutors"]) == ("2", "2")
        manifest_path = layout.clusters / "gaia-local.json"
        master_ui = json.loads(manifest_path.read_text())["master"]["ui_port"]
        session = resources["spark"].session()
        assert session.conf.get("spark.dynamicAllocation.enabled") == "true"
        assert session.sparkContext.parallelize(range(4), 4).map(slow_task).sum() == 6
        assert busy_workers() == 1

        # The cluster grows while the application lives: 3 GiB at 2 GiB a core is 2 workers.
        grown = reconcile(3 * GIB)
        assert grown["worker_count"] == 2 and grown["created"] == ["gaia-local-worker-1"]
        assert session.sparkContext.parallelize(range(16), 16).map(slow_task).sum() == 120
        assert busy_workers() == 2, "cores.max leaves room for max_workers: the new worker got an executor"
        # Dynamic allocation gives idle executors back (a static application would keep them).
        deadline = time.monotonic() + 60
        while busy_workers() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert busy_workers() == 0
    finally:
        spark_factory.stop_active()
        assert teardown_cluster_job.execute_in_process(resources={"cloud": resources["cloud"]}).success


def test_the_regions_a_run_covers_come_from_its_partition_tags():
    assert run_regions(range_tags("hpx1-02", "hpx1-05")) == ["hpx1-02", "hpx1-03", "hpx1-04", "hpx1-05"]
    assert run_regions({"dagster/partition": "hpx1-07"}) == ["hpx1-07"]
    # Runs partitioned some other way, or not at all, read no region's landing files.
    assert run_regions({"dagster/partition": "2026-12-06"}) == []
    assert run_regions(range_tags("2026-12-01", "2026-12-06")) == []
    assert run_regions({}) == []
