"""``spark_cluster`` and ``teardown_cluster`` against EC2 (moto) and OpenStack (fake) over real
HTTP on loopback, through libcloud's own drivers: tagging, idempotency, shrinking, teardown,
and failures (5xx, 429, slow answers, quota) with bounded retries and nothing leaked.

Every claim is checked on the cloud's side - boto3 against moto, the fake's own state - and by
the requests the cloud received, not only by what the asset reports about itself.
"""

import json
import re

from dagster import materialize

from cloud.emulators import ORCHESTRATOR_ADDRESS, ORCHESTRATOR_CIDR
from gaia_flows.assets.cluster import spark_cluster
from gaia_flows.cloud.settings import TAG_CLUSTER, TAG_ROLE
from gaia_flows.cloud.stack import local_stack, mismatches
from gaia_flows.jobs import teardown_cluster_job
from gaia_flows.resources.cloud import CloudResource
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource

# SSH, master, worker, master UI, worker UI, node exporter, then the block managers' range.
ORCHESTRATOR_PORTS = [
    (22, 22),
    (7077, 7077),
    (7078, 7078),
    (8080, 8080),
    (8081, 8081),
    (9100, 9100),
    (7080, 7088),
]


def _resources(target, profile=None):
    storage = StorageResource()
    return {
        "cloud": CloudResource(
            storage=storage, profile=profile or target.profile, profiles_dir=str(target.profiles_dir)
        ),
        "storage": storage,
        "spark": SparkResource(),
    }


def materialise(target, workers, profile=None, raise_on_error=True, instance=None):
    # Size and count pinned, so a test says exactly which machines it expects.
    config = {"workers": workers, "size": target.worker_size, "data_bytes": 50 * 2**30}
    return materialize(
        [spark_cluster],
        resources=_resources(target, profile),
        run_config={"ops": {"spark_cluster": {"config": config}}},
        raise_on_error=raise_on_error,
        instance=instance,
    )


def metadata(result) -> dict:
    (event,) = result.asset_materializations_for_node("spark_cluster")
    return {k: v.value for k, v in event.metadata.items()}


def failure(result):
    """(message, metadata) of the spark_cluster step's Failure."""
    assert not result.success
    (event,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    data = event.step_failure_data
    meta = {
        k: v.value for k, v in (data.user_failure_data.metadata if data.user_failure_data else {}).items()
    }
    return data.error.message, meta


def teardown(target, profile=None, **execute):
    return teardown_cluster_job.execute_in_process(
        resources={"cloud": _resources(target, profile)["cloud"]}, **execute
    )


def test_materialise_builds_a_tagged_cluster_and_rematerialise_makes_no_changes(target, layout):
    result = materialise(target, workers=3)
    meta = metadata(result)
    live = target.servers()
    assert sorted(s["name"] for s in live) == [
        f"{target.cluster}-master",
        *(f"{target.cluster}-worker-{i}" for i in range(3)),
    ]
    assert all(s["tags"][TAG_CLUSTER] == target.cluster for s in live)
    assert sorted(s["tags"][TAG_ROLE] for s in live) == ["master", "worker", "worker", "worker"]
    assert all(s["groups"] == [f"{target.cluster}-sg"] for s in live)
    assert target.key_pairs() == [f"{target.cluster}-key"]
    # The group admits its own members (tcp + udp) and the orchestrator on Spark's ports and SSH, nothing else.
    (group,) = target.security_groups()
    assert group["name"] == f"{target.cluster}-sg"
    inside = [
        ["tcp", 0 if target.name == "aws" else 1, 65535, group["id"]],
        ["udp", 0 if target.name == "aws" else 1, 65535, group["id"]],
    ]
    assert group["rules"] == sorted(
        inside + [["tcp", low, high, ORCHESTRATOR_CIDR] for low, high in ORCHESTRATOR_PORTS]
    )

    manifest = json.loads((layout.clusters / f"{target.cluster}.json").read_text())
    master = manifest["master"]
    assert meta["master_url"] == manifest["master_url"]
    assert meta["master_url"].startswith("spark://") and meta["master_url"].endswith(":7077")
    assert meta["worker_count"] == 3 and len(meta["node_ids"]) == 4 and master["id"] in meta["node_ids"]
    assert sorted(meta["created"]) == sorted(s["name"] for s in live)
    assert meta["api_calls"]["calls"]["create_node"] == 4
    assert target.count(target.create_request) == 4

    before = target.requests()
    again = metadata(materialise(target, workers=3))
    assert again["created"] == [] and again["destroyed"] == []
    assert sorted(again["kept"]) == sorted(s["name"] for s in live)
    calls = again["api_calls"]["calls"]
    assert not [
        op
        for op in calls
        if op.startswith(("create", "destroy", "ex_create", "ex_delete", "import", "delete", "ex_authorize"))
    ], calls
    assert target.count(target.create_request, before) == 0
    assert target.count(target.destroy_request, before) == 0
    assert again["node_ids"] == meta["node_ids"] and again["master_url"] == meta["master_url"]


# (vCPUs, RAM in MiB) of each target's worker size as the emulator lists it, and the memory its
# Spark worker may give executors: RAM less max(1 GiB, 10 %) for the OS, daemon and page cache.
WORKER_SHAPES = {"general.v1.medium": (4, 8192, 7168), "m5.xlarge": (4, 16384, 14746)}


def test_nodes_boot_with_cloud_init_that_leaves_memory_for_the_os_and_serves_the_scraped_metrics(
    target, layout
):
    materialise(target, workers=2)
    booted = target.user_data()
    cores, ram, usable = WORKER_SHAPES[target.worker_size]
    assert usable < ram
    master = booted[f"{target.cluster}-master"]
    assert "GAIA_ROLE=master\n" in master
    workers = [f"{target.cluster}-worker-{i}" for i in range(2)]
    assert sorted(booted) == sorted([f"{target.cluster}-master", *workers])
    for name in workers:
        assert f"SPARK_WORKER_CORES={cores}\n" in booted[name], name
        assert f"SPARK_WORKER_MEMORY={usable}m\n" in booted[name], name
    assert not [name for name, text in booted.items() if target.secret in text]

    # Prometheus file_sd: every node at the UI port and metrics path its own cloud-init serves,
    # and its node exporter at the port cloud-init gives it.
    targets_file = layout.clusters / f"{target.cluster}.prometheus.json"
    groups = json.loads(targets_file.read_text())
    by_node = {}
    for group in groups:
        (address,) = group["targets"]
        by_node.setdefault(group["labels"]["node"], []).append(
            (group["labels"]["job"], address, group["labels"]["__metrics_path__"])
        )
        assert group["labels"]["gaia_cluster"] == target.cluster
    assert sorted(by_node) == sorted(booted)
    assert sorted(job for job, _, _ in by_node[f"{target.cluster}-master"]) == [
        "node",
        "spark-applications",
        "spark-master",
    ]
    for name, scraped in by_node.items():
        [(address, path)] = [(address, path) for job, address, path in scraped if job == "node"]
        port = address.rsplit(":", 1)[1]
        assert f'ARGS="--web.listen-address=:{port}"' in booted[name] and path == "/metrics", (name, address)
        assert "[systemctl, restart, prometheus-node-exporter.service]" in booted[name], name
        for job, address, path in [s for s in scraped if s[0] != "node"]:
            host, port = address.rsplit(":", 1)
            webui = (
                "SPARK_MASTER_WEBUI_PORT" if name == f"{target.cluster}-master" else "SPARK_WORKER_WEBUI_PORT"
            )
            assert host and re.search(rf"^\s*{webui}={port}$", booted[name], re.M), (name, address)
            assert f"prometheusServlet.path={path}" in booted[name], (name, path)
            assert (job == "spark-worker") == (name != f"{target.cluster}-master")
    teardown(target)
    assert not targets_file.exists(), "teardown leaves no targets for Prometheus to scrape"


def test_smaller_plan_destroys_only_the_surplus_workers(target, layout):
    first = metadata(materialise(target, workers=3))
    before = target.requests()
    smaller = metadata(materialise(target, workers=1))
    assert sorted(smaller["destroyed"]) == [f"{target.cluster}-worker-1", f"{target.cluster}-worker-2"]
    assert smaller["created"] == []
    assert target.count(target.destroy_request, before) == 2
    assert target.count(target.create_request, before) == 0
    assert set(smaller["node_ids"]) < set(first["node_ids"]), (
        "master and worker-0 are the same machines as before"
    )
    assert sorted(s["name"] for s in target.servers()) == [
        f"{target.cluster}-master",
        f"{target.cluster}-worker-0",
    ]


def test_teardown_job_removes_every_node_group_and_key(target, layout):
    materialise(target, workers=2)
    assert len(target.servers()) == 3
    result = teardown(target)
    assert result.success
    summary = result.output_for_node("teardown_cluster_nodes")
    assert len(summary["destroyed_nodes"]) == 3
    assert target.servers() == []
    assert target.security_groups() == []
    assert target.key_pairs() == []
    assert not (layout.clusters / f"{target.cluster}.json").exists()
    # Tearing down nothing is not an error: the job can be run blindly.
    assert teardown(target).output_for_node("teardown_cluster_nodes")["destroyed_nodes"] == []


def test_transient_errors_are_retried_without_duplicates(target, layout):
    # Two 5xx on create and two throttled lists: within the budget of 3 attempts per call.
    target.api.set_faults(
        [
            {
                "match": target.create_request,
                "kind": "error",
                "status": 503 if target.name == "openstack" else 500,
                "after": 1,
                "times": 2,
            },
            {"match": target.list_request, "kind": "throttle", "after": 1, "times": 2},
        ]
    )
    meta = metadata(materialise(target, workers=2))
    retries = meta["api_calls"]["retries"]
    assert retries.get("create_node") == 2 and retries.get("list_nodes") == 2
    assert sorted(s["name"] for s in target.servers()) == [
        f"{target.cluster}-master",
        f"{target.cluster}-worker-0",
        f"{target.cluster}-worker-1",
    ]
    fired = target.api.stats()["faults_fired"]
    assert sum(fired.values()) == 4


def test_a_create_answered_too_late_is_adopted_not_duplicated(target, layout):
    # The cloud takes 1.6 s to answer one create; the client gives up after 1 s and retries.
    # The first request still lands: the provisioner must find that node, not make a twin.
    profile = target.profile_with("impatient", timeout=1)
    target.api.set_faults(
        [{"match": target.create_request, "kind": "slow", "delay_s": 1.6, "after": 1, "times": 1}]
    )
    meta = metadata(materialise(target, workers=1, profile=profile))
    names = sorted(s["name"] for s in target.servers())
    assert names == [f"{target.cluster}-master", f"{target.cluster}-worker-0"]
    assert meta["api_calls"]["retries"]["create_node"] == 1
    assert target.count(target.create_request) == 2, "master + the one late create, no second create"


def test_quota_error_midway_rolls_back_everything_this_run_created(target, layout):
    # Master and two workers fit; the fourth create hits the quota (node 4 of 5).
    target.api.set_faults([{"match": target.create_request, "kind": "quota", "after": 3, "times": -1}])
    message, meta = failure(materialise(target, workers=4, raise_on_error=False))
    assert "failed after creating 3 of the node(s)" in message
    assert "permanent error" in message and (
        "Quota exceeded" in message or "InstanceLimitExceeded" in message
    )
    assert "Rolled back" in message
    assert meta["rolled_back"] is True and meta["leftover_nodes"] == []
    assert target.count(target.create_request) == 4, "a quota error is not retried"
    assert target.servers() == [] and target.security_groups() == [] and target.key_pairs() == []
    assert not (layout.clusters / f"{target.cluster}.json").exists()


def test_quota_error_with_on_failure_keep_leaves_tagged_nodes_for_teardown(target, layout):
    profile = target.profile_with("keep", on_failure="keep")
    target.api.set_faults([{"match": target.create_request, "kind": "quota", "after": 2, "times": -1}])
    message, meta = failure(materialise(target, workers=3, profile=profile, raise_on_error=False))
    assert "Left in place (on_failure=keep)" in message and f"{TAG_CLUSTER}={target.cluster}" in message
    assert meta["rolled_back"] is False
    kept = sorted(n["name"] for n in meta["leftover_nodes"])
    assert kept == [f"{target.cluster}-master", f"{target.cluster}-worker-0"]
    assert sorted(s["name"] for s in target.servers()) == kept
    assert all(s["tags"][TAG_CLUSTER] == target.cluster for s in target.servers())
    target.api.clear_faults()
    assert teardown(target, profile).success
    assert target.servers() == [] and target.security_groups() == [] and target.key_pairs() == []


def test_persistent_server_errors_stop_after_the_retry_budget(target, layout):
    target.api.set_faults(
        [{"match": target.create_request, "kind": "error", "status": 500, "after": 1, "times": -1}]
    )
    message, meta = failure(materialise(target, workers=2, raise_on_error=False))
    assert "create_node failed after 3 attempts (transient error)" in message
    assert "Rolled back" in message and meta["rolled_back"] is True
    assert target.count(target.create_request) == 1 + 3, "master, then exactly 3 attempts at worker-0"
    assert target.servers() == [] and target.key_pairs() == []


def test_no_cloud_profile_is_a_no_op(layout):
    storage = StorageResource()
    result = materialize(
        [spark_cluster],
        resources={
            "cloud": CloudResource(storage=storage, profile="local"),
            "storage": storage,
            "spark": SparkResource(),
        },
    )
    meta = metadata(result)
    assert meta["mode"] == "no cluster" and meta["master_url"].startswith("local[")
    assert not layout.clusters.exists() or not any(layout.clusters.iterdir())


def test_the_driver_advertises_the_orchestrator_on_fixed_ports_and_authenticates(target, layout):
    meta = metadata(materialise(target, workers=1))
    conf = meta["spark_conf"]
    assert conf["spark.driver.host"] == conf["spark.driver.bindAddress"] == ORCHESTRATOR_ADDRESS
    assert (conf["spark.driver.port"], conf["spark.blockManager.port"]) == ("7079", "7080")
    assert conf["spark.authenticate"] == conf["spark.network.crypto.enabled"] == "true"
    secret = layout.clusters / target.cluster / "spark-secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    value = secret.read_text()
    assert len(value) == 64
    shown = [
        json.dumps(meta),
        (layout.clusters / f"{target.cluster}.json").read_text(),
        *target.user_data().values(),
    ]
    assert not [text for text in shown if value in text], "the Spark secret stays in its own file"
    assert teardown(target).success
    assert not secret.exists()


def test_the_placeholder_orchestrator_is_refused_before_any_cloud_call(target, layout):
    profile = target.profile_with("placeholder")
    path = target.profiles_dir / f"{profile}.yaml"
    path.write_text(path.read_text().replace(ORCHESTRATOR_CIDR, "192.0.2.10/32"))
    before = target.requests()
    message, _ = failure(materialise(target, workers=1, profile=profile, raise_on_error=False))
    assert (
        "192.0.2.10/32, the documentation placeholder" in message
        and "private address of the host that runs Dagster" in message
    )
    assert target.count(target.create_request, before) == 0 and target.servers() == []


def test_a_worker_stack_that_differs_from_the_drivers_is_named_with_both_versions():
    driver = local_stack()
    same, older = dict(driver), {**driver, "numpy": "1.26.4", "python": "3.10"}
    assert mismatches(driver, {"10.0.0.12": same}) == []
    assert mismatches(driver, {"10.0.0.12": same, "10.0.0.13": older}) == [
        f"worker 10.0.0.13: python 3.10 (driver {driver['python']})",
        f"worker 10.0.0.13: numpy 1.26.4 (driver {driver['numpy']})",
    ]
