"""Elastic workers on separate hosts: a backfill grows the cluster, idle time shrinks it back to
``min_workers``, and a longer idle time removes everything.

The multi-host simulation (``tests/cloud/deployment.py``) with the OpenStack fake: every server
boots as a network host of its own running the Spark daemons its user data starts, and the
Dagster runs (the Spark driver) run on the orchestrator host. ``cluster_sensor`` is evaluated
there against the orchestrator's persistent instance (``multihost_run.py``'s ``tick`` step), and
the run it asks for is executed as the daemon would launch it. The profile scans 4 KiB per core
(``target_bytes_per_core``), so the small catalogue asks the planner for more workers than
``max_workers`` allows, and the idle windows are seconds, not minutes.
"""

from __future__ import annotations

import time

from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

from cloud import multihost
from cloud.deployment import NAMESPACE_HOSTS, REGIONS, openstack, wait_until
from cloud.deployment import deployment as cluster_deployment
from gaia_flows.cloud.settings import (
    LEASE_DIR,
    RUN_TAG_RESIZE_DECISION,
    RUN_TAG_RESIZE_REASON,
    RUN_TAG_TEARDOWN_DECISION,
)
from gaia_flows.jobs import resize_cluster_job, teardown_cluster_job
from gaia_flows.layout import StateLayout
from gaia_flows.partitions import run_regions

pytestmark = NAMESPACE_HOSTS

PROFILE = "openstack-mh-elastic"
BACKFILL = REGIONS[:4]
WORKER_IDLE_MINUTES = 0.1  # 6 s
IDLE_MINUTES = 1.0  # 60 s: the shrink's tick (a process of its own) decides well inside it


def test_a_backfill_grows_the_cluster_onto_new_hosts_and_idle_time_shrinks_then_removes_it(tmp_path):
    with cluster_deployment(tmp_path, openstack, BACKFILL, stars=4_000, workers=1) as deployment:
        cluster_settings = {
            "worker_idle_minutes": WORKER_IDLE_MINUTES,
            "idle_minutes": IDLE_MINUTES,
            "target_bytes_per_core": 2**12,
        }
        deployment.derive_profile(PROFILE, cluster_settings, {"min_workers": 1, "max_workers": 3})
        cluster = deployment.cloud.cluster
        master, worker_0 = deployment.node_names()
        workers = [worker_0, f"{cluster}-worker-1", f"{cluster}-worker-2"]
        regions = ",".join(BACKFILL)

        def tick() -> dict:
            return deployment.run("tick", profile=PROFILE)["tick"]

        def hosts() -> list[str]:
            return sorted(n for n in deployment.lab.hosts if n != "orchestrator")

        first = deployment.run("cluster", profile=PROFILE)["cluster"]["metadata"]
        assert first["worker_count"] == 1 and sorted(first["created"]) == [master, worker_0]
        assert "kept" in tick()["skip"], "no run yet: nothing to grow, shrink or tear down"
        master_pids = multihost.netns_pids(deployment.lab.hosts[master].namespace)

        # The backfill's run is going on the orchestrator: the sensor sees it and grows the cluster.
        grows: list[dict] = []
        dagster_home = str(StateLayout.from_env(deployment.home).dagster_home)

        def grow_once_going(proc) -> None:
            with DagsterInstance.local_temp(dagster_home) as instance:

                def going() -> bool:
                    assert proc.poll() is None, "the backfill ended before its run was seen going"
                    started = instance.get_runs(filters=RunsFilter(statuses=[DagsterRunStatus.STARTED]))
                    return any(run_regions(r.tags) == list(BACKFILL) for r in started)

                wait_until(going, 120, "the backfill's run is going")
            grows.append(tick())

        backfill = deployment.run("catalogue", regions=regions, profile=PROFILE, during=grow_once_going)
        assert backfill["catalogue"]["success"]
        with DagsterInstance.local_temp(dagster_home) as instance:  # the idle windows count from here
            (last_use,) = [
                r.end_time
                for r in instance.get_run_records(filters=RunsFilter(statuses=[DagsterRunStatus.SUCCESS]))
                if run_regions(r.dagster_run.tags) == list(BACKFILL)
            ]
        (grow,) = grows
        assert grow["job"] == resize_cluster_job.name and grow["tags"][RUN_TAG_RESIZE_DECISION] == "grow"
        reason = grow["tags"][RUN_TAG_RESIZE_REASON]
        assert "1 unfinished run(s) over 4 region(s)" in reason
        assert f"the planner asks for 3 x {deployment.cloud.worker_size} (max_workers 3), 1 run" in reason
        grown = grow["metadata"]
        assert grow["success"] and grown["worker_count"] == 3
        assert sorted(grown["created"]) == workers[1:] and sorted(grown["kept"]) == [master, worker_0]
        servers = deployment.cloud.inventory()["servers"]
        # The resize's own Spark application (started on the orchestrator once the servers were
        # up) ran a task on each of the three worker hosts: a new application gets executors on
        # the new hosts, and their stack is the driver's.
        assert sorted(grown["worker_stacks"]) == sorted(servers[name] for name in workers)
        assert hosts() == sorted([master, *workers])

        # worker_idle_minutes after the backfill, the workers beyond min_workers go, highest first.
        time.sleep(max(0.0, last_use + WORKER_IDLE_MINUTES * 60 + 1 - time.time()))
        shrink = tick()
        assert shrink["job"] == resize_cluster_job.name
        assert shrink["tags"][RUN_TAG_RESIZE_DECISION] == "shrink"
        assert "3 worker(s) -> min_workers 1" in shrink["tags"][RUN_TAG_RESIZE_REASON]
        shrunk = shrink["metadata"]
        assert shrunk["worker_count"] == 1 and sorted(shrunk["destroyed"]) == workers[1:]
        assert shrunk["node_ids"] == first["node_ids"], "the master and worker-0 stay, the same servers"
        assert sorted(shrunk["worker_stacks"]) == [servers[worker_0]], "the cluster still runs tasks"
        wait_until(lambda: hosts() == [master, worker_0], 60, "the removed workers' hosts are powered off")
        assert set(master_pids) <= set(multihost.netns_pids(deployment.lab.hosts[master].namespace)), (
            "the master's daemon ran on through both resizes"
        )
        assert sorted(deployment.cloud.inventory()["servers"]) == [master, worker_0]

        # idle_minutes after the backfill, the last run (the resizes are not use), the cluster goes.
        time.sleep(max(0.0, last_use + IDLE_MINUTES * 60 + 1 - time.time()))
        down = tick()
        assert down["job"] == teardown_cluster_job.name and down["tags"][RUN_TAG_TEARDOWN_DECISION] == "idle"
        assert down["success"] and sorted(down["summary"]["destroyed_nodes"]) == [master, worker_0]
        wait_until(lambda: hosts() == [], 60, "every host is powered off")
        assert deployment.cloud.inventory() == {"servers": {}, "key_pairs": [], "security_groups": []}
        assert not (deployment.shared / LEASE_DIR / cluster).exists()
        assert deployment.hypervisor.errors == []
