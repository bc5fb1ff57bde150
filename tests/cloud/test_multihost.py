"""The asset graph on a provisioned cluster whose nodes are separate network hosts.

One machine plays a whole cloud deployment (``tests/cloud/multihost.py``): the OpenStack fake
runs on the orchestrator host's loopback, ``spark_cluster`` provisions through libcloud as it
would on a real cloud, a test hypervisor boots every server the fake reports running as its own
network namespace with the address the fake gave it, the security group as nftables rules, and
the start part of its user data. The Dagster run - the Spark driver - runs on the orchestrator
host and reaches the master only at its bridge address. Every host mounts the cluster's shared
directory at the profile's mount path.

The module provisions one cluster (1 master + 2 workers), runs ``gaia_source`` and ``pm_stats``
over all 48 regions of a small synthetic catalogue and ``proper_motion_maps`` on it, checks the
tables against a ``local`` run of the same catalogue, trains the classifier with MLflow as
``mlflow server`` on the orchestrator (PostgreSQL backend, artifacts on the share) and
classifies one region, probes the cluster from outside its group and with a wrong secret, cuts
a worker's link in the middle of a rerun, then tears it down and checks nothing is left. A
second deployment on moto EC2 runs one region on Spot workers, replaces a worker the cloud takes
back, and tears down.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import materialize
from support.spark import TEST_SPARK_CONF

from cloud import multihost
from cloud.deployment import (
    MLFLOW_PORT,
    MLFLOW_URL,
    MOUNT,
    NAMESPACE_HOSTS,
    NETWORK,
    REGIONS,
    Deployment,
    ec2,
    mount_share,
    openstack,
    serve_on_orchestrator,
    stop,
    wait_until,
)
from cloud.deployment import deployment as cluster_deployment
from cloud.emulators import ORCHESTRATOR_ADDRESS
from cloud.multihost_run import CLASSIFIER_CONFIG
from gaia_flows import maps
from gaia_flows.assets.catalogue import gaia_landing, gaia_source
from gaia_flows.assets.classified_sources import classified_sources
from gaia_flows.assets.classifier import astrometric_classifier
from gaia_flows.assets.proper_motion import pm_stats
from gaia_flows.assets.proper_motion_maps import proper_motion_maps
from gaia_flows.assets.training_set import astrometric_training_set
from gaia_flows.cloud.stack import local_stack
from gaia_flows.layout import StateLayout
from gaia_flows.resources.mlflow import SERVER_ENV, MlflowResource
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource

pytestmark = NAMESPACE_HOSTS

STARS = 12_000
# What a Spark driver logs when the master closes the connection during the authentication
# handshake (the bootstrap of every RPC connection once spark.authenticate is on).
AUTH_REFUSED = re.compile(r"Exception while bootstrapping client")
PG_PORT = 5432  # inside the orchestrator's namespace: nothing else listens there
PG_BIN = Path("/usr/lib/postgresql/15/bin")
CLASSIFY_REGION = REGIONS[7]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    with cluster_deployment(
        tmp_path_factory.mktemp("multihost"), openstack, REGIONS, stars=STARS
    ) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def graph_run(deployment):
    return deployment.run("cluster,catalogue,maps")


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, deployment, _spark_application):
    """The same catalogue through the ``local`` profile's engine (local[2] in this process)."""
    home = tmp_path_factory.mktemp("local-run")
    storage = StorageResource(home=str(home), landing=str(deployment.shared / "landing"))
    spark = SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF)
    resources = {"storage": storage, "spark": spark}
    tags = {
        "dagster/asset_partition_range_start": REGIONS[0],
        "dagster/asset_partition_range_end": REGIONS[-1],
    }
    assert materialize(
        [gaia_landing, gaia_source, pm_stats],
        selection=[gaia_source.key, pm_stats.key],
        resources=resources,
        tags=tags,
    ).success
    assert materialize(
        [pm_stats, proper_motion_maps], selection=[proper_motion_maps.key], resources=resources
    ).success
    return storage.layout


@pytest.fixture(scope="module")
def mlflow_server(deployment):
    """``mlflow server`` on the orchestrator host's loopback, its backend store a PostgreSQL
    there too and its artifacts on the share; both stopped by process group at the end.

    PostgreSQL refuses to run as root, so its data folder belongs to ``nobody`` (outside the
    test's 0700 temp folder)."""
    data = Path(tempfile.mkdtemp(prefix="gfmh-pg-"))
    logs = deployment.root / "logs"
    servers = []
    try:
        shutil.chown(data, "nobody")
        multihost.run(
            "runuser",
            "-u",
            "nobody",
            "--",
            str(PG_BIN / "initdb"),
            "-D",
            str(data / "db"),
            "-U",
            "gaia",
            "-A",
            "trust",
            "--no-sync",
            "-E",
            "UTF8",
        )
        postgres = f"exec runuser -u nobody -- {PG_BIN / 'postgres'} -D {data / 'db'} -p {PG_PORT} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off\n"
        servers.append(deployment.lab.spawn("orchestrator", postgres, logs / "postgres.log"))
        deadline = time.monotonic() + 60
        while not deployment.orchestrator(_connects, "127.0.0.1", PG_PORT):
            assert servers[0].poll() is None and time.monotonic() < deadline, (
                logs / "postgres.log"
            ).read_text()[-2000:]
            time.sleep(0.2)
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        script = "\n".join(
            [
                "set -euo pipefail",
                *mount_share(deployment.shared),
                f"exec {mlflow_bin} server --backend-store-uri postgresql+psycopg2://gaia@127.0.0.1:{PG_PORT}/postgres "
                f"--artifacts-destination file://{MOUNT}/mlflow-artifacts --host 127.0.0.1 --port {MLFLOW_PORT} --workers 1",
            ]
        )
        servers.append(
            serve_on_orchestrator(
                deployment.lab,
                deployment.orchestrator,
                script,
                logs / "mlflow-server.log",
                f"{MLFLOW_URL}/health",
                env=SERVER_ENV,
                timeout=300,
            )
        )
        yield MLFLOW_URL
    finally:
        for proc in reversed(servers):
            stop(proc, signal.SIGINT)  # PostgreSQL's fast shutdown; uvicorn stops on it too
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="module")
def local_classified(local_run):
    """``classified_sources`` for the region through the ``local`` profile: local[2], MLflow in
    the state folder (SQLite)."""
    storage = StorageResource(home=str(local_run.home), landing=str(local_run.landing))
    resources = {
        "storage": storage,
        "spark": SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF),
        "mlflow": MlflowResource(storage=storage),
    }
    graph = [gaia_source, astrometric_training_set, astrometric_classifier, classified_sources]
    config = {"ops": {"astrometric_classifier": {"config": CLASSIFIER_CONFIG}}}
    assert materialize(
        graph,
        selection=[astrometric_training_set.key, astrometric_classifier.key],
        resources=resources,
        run_config=config,
    ).success
    assert materialize(
        graph, selection=[classified_sources.key], partition_key=CLASSIFY_REGION, resources=resources
    ).success
    return local_run


def _table(path: Path, key: str):
    return pq.read_table(path).sort_by(key).to_pandas()


def test_the_graph_runs_on_the_cluster_hosts(deployment, graph_run):
    manifest = deployment.manifest()
    servers = deployment.cloud.inventory()["servers"]
    master, *worker_names = deployment.node_names()
    assert sorted(servers) == [master, *worker_names]
    master_address = servers[master]
    workers = sorted(servers[name] for name in worker_names)
    # The master URL the manifest records is reachable exactly as written, from the orchestrator host.
    assert manifest["master_url"] == f"spark://{master_address}:7077"
    assert graph_run["catalogue"]["master"] == manifest["master_url"]
    # spark_cluster waited until both worker hosts ran a task, on the driver's own stack.
    stacks = graph_run["cluster"]["metadata"]["worker_stacks"]
    assert sorted(stacks) == workers
    assert all(stack == local_stack() for stack in stacks.values())
    driver = graph_run["catalogue"]["driver"]
    assert driver == {
        "spark.driver.host": ORCHESTRATOR_ADDRESS,
        "spark.driver.port": "7079",
        "spark.blockManager.port": "7080",
        "spark.authenticate": "true",
        "spark.network.crypto.enabled": "true",
    }
    assert (
        set(graph_run["catalogue"]["task_hosts"]) <= set(workers) and graph_run["catalogue"]["task_hosts"]
    ), "tasks ran on the worker hosts"
    # The evidence is broken down per executor host: Spark's stage figures and what the Python
    # tasks read themselves, keyed alike by the worker hosts' addresses.
    for asset, figures in graph_run["catalogue"]["evidence"].items():
        python_hosts = figures["python_per_host"]
        assert set(python_hosts) <= set(workers) and python_hosts, asset
        assert sum(h["read_bytes"] for h in python_hosts.values()) == figures["python_read_bytes"], asset
        assert set(figures["spark_per_host"]) <= set(workers) and figures["spark_per_host"], asset
    assert graph_run["maps"]["success"]
    assert deployment.hypervisor.errors == []


def _cluster_layout(deployment: Deployment) -> StateLayout:
    """The orchestrator's layout with the share as the test process sees it."""
    return StateLayout.from_env(deployment.home).with_storage({"mount": str(deployment.shared)})


def _assert_region_tables_equal(cluster: StateLayout, local_run: StateLayout) -> None:
    for region in REGIONS:
        got, want = (
            _table(cluster.region_dir("gaia_source", region), "source_id"),
            _table(local_run.region_dir("gaia_source", region), "source_id"),
        )
        assert got.equals(want), region
        got, want = (
            _table(cluster.region_dir("pm_stats", region), "pixel"),
            _table(local_run.region_dir("pm_stats", region), "pixel"),
        )
        assert list(got.columns) == list(want.columns) and len(got) == len(want), region
        for column in got.columns:
            assert got[column].to_numpy() == pytest.approx(want[column].to_numpy(), rel=1e-12, nan_ok=True), (
                region,
                column,
            )


def test_tables_and_maps_equal_a_local_run(deployment, graph_run, local_run):
    cluster = _cluster_layout(deployment)
    assert cluster.warehouse == deployment.shared / "warehouse"
    _assert_region_tables_equal(cluster, local_run)
    got, want = maps.map_table(6, cluster).to_pandas(), maps.map_table(6, local_run).to_pandas()
    assert len(got) == len(want) == 12 * 4**6
    for column in got.columns:
        assert got[column].to_numpy() == pytest.approx(want[column].to_numpy(), rel=1e-12, nan_ok=True), (
            column
        )


def test_classified_sources_with_mlflow_on_the_orchestrator_equal_a_local_run(
    deployment, graph_run, mlflow_server, local_classified
):
    """The classifier trained on the cluster and tracked by ``mlflow server`` (PostgreSQL
    backend, artifacts on the share), then one region classified on the cluster."""
    run = deployment.run("classify", regions=CLASSIFY_REGION)["classify"]["classifier"]
    assert run["mlflow_tracking_uri"] == mlflow_server and run["mlflow_registry_uri"] == mlflow_server
    assert list((deployment.shared / "mlflow-artifacts").rglob("MLmodel")), (
        "the model's artifacts are on the share"
    )
    cluster = _cluster_layout(deployment)
    got = _table(cluster.region_dir("classified_sources", CLASSIFY_REGION), "source_id")
    want = _table(local_classified.region_dir("classified_sources", CLASSIFY_REGION), "source_id")
    assert len(got) > 0 and list(got.columns) == list(want.columns)
    assert got["source_id"].equals(want["source_id"]) and got["label"].equals(want["label"])
    assert got["probability"].to_numpy() == pytest.approx(want["probability"].to_numpy(), rel=1e-12)
    assert deployment.hypervisor.errors == []


def _connects(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=1.5):
            return True
    except OSError:
        return False


def test_a_host_outside_the_security_group_is_refused(deployment, graph_run):
    servers = deployment.cloud.inventory()["servers"]
    master, worker = (servers[name] for name in deployment.node_names()[:2])
    deployment.lab.add_host("outsider", str(NETWORK.network_address + 200))
    outsider = multihost.InNamespace(deployment.lab.hosts["outsider"].namespace)
    try:
        probes = [
            (master, 7077),
            (master, 8080),
            (worker, 7078),
            (worker, 8081),
            (worker, 7080),
            (master, 22),
        ]
        assert [p for p in probes if outsider(_connects, *p)] == []
        # The same ports answer the orchestrator, which the group admits: the refusal is the group's.
        assert deployment.orchestrator(_connects, master, 7077) and deployment.orchestrator(
            _connects, worker, 8081
        )
    finally:
        outsider.close()
        deployment.lab.remove_host("outsider")


def test_a_driver_with_a_wrong_secret_is_refused(deployment, graph_run):
    """A driver inside the orchestrator's address, with the cluster's settings but another secret."""
    manifest = deployment.manifest()
    conf = {
        **manifest["spark_conf"],
        "spark.authenticate.secret": "0" * 64,
        "spark.driver.memory": "512m",
        "spark.ui.enabled": "false",
    }
    code = f"from gaia_flows import spark; spark.session({manifest['master_url']!r}, {conf!r}, app_name='intruder').range(1).count()"
    master_log = deployment.root / "logs" / f"{deployment.cloud.cluster}-master.log"
    driver_log = deployment.root / "logs" / "intruder.log"
    seen = len(master_log.read_text(errors="replace"))
    proc = deployment.lab.spawn("orchestrator", f"exec {sys.executable} -c {shlex.quote(code)}\n", driver_log)
    try:
        deadline = time.monotonic() + 120
        refused = []
        while time.monotonic() < deadline and proc.poll() is None and not refused:
            time.sleep(0.5)
            refused = AUTH_REFUSED.findall(driver_log.read_text(errors="replace"))
        text = driver_log.read_text(errors="replace")
        assert refused and "Failed to connect to master" in text, (
            f"the driver was not refused during authentication:\n{text[-3000:]}"
        )
        assert "Registering app intruder" not in master_log.read_text(errors="replace")[seen:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _tasks_in_flight(work: Path, known_apps: set[str]) -> set[str]:
    """Task ids an executor of an application newer than ``known_apps`` started in ``work``
    and has not finished (from the executor's own log)."""
    started, finished = set(), set()
    for stderr in work.glob("app-*/*/stderr"):
        if stderr.parent.parent.name not in known_apps:
            text = stderr.read_text(errors="replace")
            started |= set(re.findall(r"Running task .*?\(TID (\d+)\)", text))
            finished |= set(re.findall(r"Finished task .*?\(TID (\d+)\)", text))
    return started - finished


def test_a_worker_cut_mid_run_does_not_change_the_result(deployment, graph_run, local_run):
    """``gaia_source`` and ``pm_stats`` again over every region; while a worker is in the
    middle of a task of that run, its link to the bridge goes down. Spark declares its executor lost and retries its
    tasks on the other worker; the tables equal the local run's as before."""
    victim = deployment.node_names()[2]
    work = deployment.root / "logs" / f"{victim}-work"
    known_apps = {p.name for p in work.glob("app-*")}
    driver_log = deployment.root / "logs" / "orchestrator-catalogue.log"
    seen = len(driver_log.read_text(errors="replace")) if driver_log.exists() else 0

    def cut_once_busy(proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + 300
        while not _tasks_in_flight(work, known_apps):
            assert proc.poll() is None, f"the run ended before {victim} ran any of its tasks"
            assert time.monotonic() < deadline, f"{victim} ran no task of the run"
            time.sleep(0.2)
        deployment.lab.cut(victim)

    try:
        deployment.run("catalogue", during=cut_once_busy)
    finally:
        deployment.lab.mend(victim)
    log = driver_log.read_text(errors="replace")[seen:]
    victim_address = deployment.cloud.inventory()["servers"][victim]
    assert re.search(rf"Lost executor \S+ on {re.escape(victim_address)}", log), (
        f"the driver never lost {victim}'s executor:\n{log[-3000:]}"
    )
    _assert_region_tables_equal(_cluster_layout(deployment), local_run)


def _teardown_leaves_nothing(deployment: Deployment) -> None:
    pids = {
        name: multihost.netns_pids(host.namespace)
        for name, host in deployment.lab.hosts.items()
        if name != "orchestrator"
    }
    assert sorted(pids) == deployment.node_names() and all(pids.values()), (
        "every node host runs its daemon until teardown"
    )
    summary = deployment.run("teardown")["teardown"]["summary"]
    assert sorted(summary["destroyed_nodes"]) == deployment.node_names()
    assert deployment.cloud.inventory() == {"servers": {}, "key_pairs": [], "security_groups": []}
    deadline = time.monotonic() + 30
    while set(deployment.lab.hosts) != {"orchestrator"} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert set(deployment.lab.hosts) == {"orchestrator"}, "the hypervisor powered off every deleted server"
    alive = [pid for pids_of in pids.values() for pid in pids_of if Path(f"/proc/{pid}").exists()]
    assert alive == [], "no process of a node host outlives it"
    assert not (deployment.home / "clusters" / deployment.cloud.cluster / "spark-secret").exists()
    assert deployment.hypervisor.errors == []


def test_teardown_leaves_no_server_group_key_host_or_process(deployment, graph_run):
    _teardown_leaves_nothing(deployment)


@pytest.fixture(scope="module")
def ec2_deployment(tmp_path_factory):
    with cluster_deployment(
        tmp_path_factory.mktemp("multihost"), ec2, REGIONS[7:8], stars=2_000
    ) as deployment:
        yield deployment


def test_ec2_spot_workers_one_region_a_reclaimed_worker_replaced_and_teardown(ec2_deployment):
    """moto EC2, the same shape with Spot workers and an on-demand master: provision, one
    region's gaia_source on the cluster; the cloud takes a worker back (a Spot interruption) and
    its host goes; the next reconcile replaces it with a host that runs the driver's stack;
    teardown leaves nothing."""
    deployment, region = ec2_deployment, REGIONS[7]
    profile = deployment.derive_profile("aws-mh-spot", {"spot_workers": True, "spot_max_price": 0.05})
    master, *worker_names = deployment.node_names()

    run = deployment.run("cluster,catalogue", regions=region, profile=profile)
    servers = deployment.cloud.inventory()["servers"]
    workers = sorted(servers[name] for name in worker_names)
    assert all(ipaddress.ip_address(a) in NETWORK for a in servers.values()), servers
    assert run["catalogue"]["master"] == f"spark://{servers[master]}:7077"
    assert sorted(run["cluster"]["metadata"]["worker_stacks"]) == workers
    markets = {n["role"]: n["market"] for n in run["cluster"]["metadata"]["plan_cost"]["nodes"]}
    assert markets == {"master": "on-demand", "worker": "spot"}
    assert set(run["catalogue"]["task_hosts"]) <= set(workers)
    layout = StateLayout.from_env(deployment.home).with_storage({"mount": str(deployment.shared)})
    rows = pq.read_table(layout.region_dir("gaia_source", region)).num_rows
    truth = pq.read_table(next((deployment.shared / "landing" / "truth").glob("*.parquet")))
    assert rows > 0 and rows <= truth.num_rows

    lost_name = worker_names[-1]
    lost = {w["name"]: w["id"] for w in deployment.manifest()["workers"]}[lost_name]
    deployment.cloud.reclaim(lost)
    wait_until(
        lambda: lost_name not in deployment.lab.hosts, 60, "the hypervisor powered off the reclaimed worker"
    )

    again = deployment.run("cluster", profile=profile)["cluster"]["metadata"]
    assert again["created"] == [lost_name] and again["destroyed"] == []
    assert sorted(again["kept"]) == [master, *worker_names[:-1]] and lost not in again["node_ids"]
    servers = deployment.cloud.inventory()["servers"]
    assert sorted(again["worker_stacks"]) == sorted(servers[name] for name in worker_names)
    _teardown_leaves_nothing(deployment)
