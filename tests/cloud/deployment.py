"""A whole cloud deployment on one machine, for the multi-host test and benchmark.

The orchestrator host (a network namespace at ``ORCHESTRATOR_ADDRESS``) runs the cloud's
emulator (the OpenStack fake or moto EC2) on its loopback; a ``multihost.Hypervisor`` boots
every server the cloud reports running as a host of its own; every host mounts one shared
directory at the profile's mount path; ``Deployment.run`` runs Dagster steps
(``multihost_run.py``) on the orchestrator host, where the Spark driver lives.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest
import yaml

from cloud import multihost
from cloud.conftest import AWS_KEY_ID, AWS_SECRET, OS_PASSWORD, OS_USER
from cloud.emulators import ORCHESTRATOR_ADDRESS, TEST_NETWORK, aws_cloud, openstack_cloud, write_profile
from gaia_flows.contracts import load_contract
from gaia_flows.partitions import sky_regions
from gaia_flows.science import synthetic

# The marks of every test module that boots namespace hosts.
NAMESPACE_HOSTS = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        os.geteuid() != 0, reason="network namespaces, veth pairs and nftables need root (CI runs as root)"
    ),
    pytest.mark.skipif(
        not (shutil.which("ip") and shutil.which("nft")),
        reason="needs iproute2 and nftables (.ci/run installs them)",
    ),
]

HERE = Path(__file__).resolve().parent
MOUNT = "/mnt/gaia-flows"  # the profile's storage.mount: the share's path on every host
REGIONS = sky_regions.get_partition_keys()
NETWORK = ipaddress.ip_network(TEST_NETWORK)
MOTO_PORT = 4566  # inside the orchestrator's namespace: nothing else listens there
MLFLOW_PORT = 5000
MLFLOW_URL = f"http://127.0.0.1:{MLFLOW_PORT}"  # on the orchestrator's loopback, where runs start


def mount_share(shared: Path) -> list[str]:
    """Script lines giving an orchestrator process the share at the profile's mount path."""
    return [
        f"mount -t tmpfs -o mode=0755 gaia-mnt {Path(MOUNT).parent}",
        f"mkdir -p {MOUNT}",
        f"mount --bind {shared} {MOUNT}",
    ]


@dataclass
class Cloud:
    """One emulated cloud as the orchestrator host runs it, and the cloud's own view of it."""

    profile: str
    cluster: str
    worker_size: str
    credentials: dict[str, str]
    servers: Callable[[], list[multihost.Server]]
    group_rules: Callable[[str], list[dict]]
    inventory: Callable[
        [], dict
    ]  # {"servers": {name: address}, "key_pairs": [...], "security_groups": [...]}
    # What the cloud does when a guest powers itself off (None: not simulated for this cloud).
    guest_shutdown: Callable[[str], None] | None = None
    # The cloud taking a server back on its own, as a Spot interruption does (None: no spot).
    reclaim: Callable[[str], None] | None = None


@dataclass
class Deployment:
    lab: multihost.Lab
    orchestrator: multihost.InNamespace
    hypervisor: multihost.Hypervisor
    cloud: Cloud
    root: Path
    shared: Path
    home: Path  # the orchestrator's state folder
    profiles: Path
    workers: int  # what ``spark_cluster`` asks for

    def run(
        self,
        steps: str,
        regions: str = "all",
        timeout: float = 900,
        during: Callable[[subprocess.Popen], None] | None = None,
        profile: str | None = None,
    ) -> dict:
        """The Dagster run on the orchestrator host; returns its summary (fails the test on error).
        ``during`` gets the run's process as soon as it starts (to act on the cluster mid-run);
        ``profile`` is another profile in ``profiles`` for the same cloud."""
        profile = profile or self.cloud.profile
        out = self.root / f"run-{steps.replace(',', '-')}.json"
        out.unlink(missing_ok=True)  # a step run again reports afresh
        script = "\n".join(
            [
                "set -euo pipefail",
                *mount_share(self.shared),
                f"exec {sys.executable} {HERE / 'multihost_run.py'} --profile {profile} --profiles-dir {self.profiles} "
                f"--steps {steps} --regions {regions} --size {self.cloud.worker_size} --workers {self.workers} --out {out}",
            ]
        )
        env = {"GAIA_FLOWS_HOME": str(self.home), **self.cloud.credentials}
        log = self.root / "logs" / f"orchestrator-{steps.replace(',', '-')}.log"
        proc = self.lab.spawn("orchestrator", script, log, env=env)
        try:
            if during is not None:
                during(proc)
            code = proc.wait(timeout=timeout)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            raise
        summary = json.loads(out.read_text()) if out.exists() else {}
        assert code == 0, (
            f"run {steps} failed: {summary.get('error') or log.read_text()[-4000:]}\nhypervisor: {self.hypervisor.errors}"
        )
        return summary

    def derive_profile(self, name: str, cluster: dict, limits: dict | None = None) -> str:
        """Write profile ``name``: the deployment's own with ``cluster`` (and ``limits``) settings
        changed, for a test's shorter windows or other markets; returns its name."""
        spec = yaml.safe_load((self.profiles / f"{self.cloud.profile}.yaml").read_text())
        spec["name"] = name
        spec["cloud"]["cluster"].update(cluster)
        spec["cloud"]["limits"].update(limits or {})
        (self.profiles / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        return name

    def manifest(self) -> dict:
        return json.loads((self.home / "clusters" / f"{self.cloud.cluster}.json").read_text())

    def node_names(self) -> list[str]:
        workers = [f"{self.cloud.cluster}-worker-{i}" for i in range(self.workers)]
        return [f"{self.cloud.cluster}-master", *workers]


def write_cluster_profile(directory: Path, base: str, name: str, cloud: dict) -> None:
    cloud["limits"] = {"min_workers": 1, "max_workers": 4, "master_min_ram_mb": 2048}
    write_profile(directory, base, name, cloud)
    path = directory / f"{name}.yaml"
    spec = yaml.safe_load(path.read_text())
    spec["spark"]["conf"].update(
        {
            "spark.driver.memory": "1g",
            "spark.sql.shuffle.partitions": "4",
            # A host whose link is cut counts as lost after 30 s without heartbeats (checked every
            # 5 s) instead of 120 s, so its tasks are retried elsewhere within the test's time.
            "spark.executor.heartbeatInterval": "3s",
            "spark.network.timeout": "30s",
            "spark.network.timeoutInterval": "5s",
        }
    )
    spec["storage"] = {"mount": MOUNT, "mlflow_tracking_uri": MLFLOW_URL}
    path.write_text(yaml.safe_dump(spec, sort_keys=False))


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
        return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def serve_on_orchestrator(
    lab, orchestrator, script: str, log: Path, url: str, env: dict | None = None, timeout: float = 90
) -> subprocess.Popen:
    """Start a server on the orchestrator host's loopback and wait until it answers there."""
    proc = lab.spawn("orchestrator", script, log, env=env)
    deadline = time.monotonic() + timeout
    while not orchestrator(_answers, url):
        assert proc.poll() is None, f"{url} exited:\n{log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, (
            f"{url} does not answer on the orchestrator's loopback:\n{log.read_text()[-2000:]}"
        )
        time.sleep(0.2)
    return proc


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a server the test started, by its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``condition`` until it holds and return that moment (epoch seconds); fail the test
    naming ``what`` once ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting until {what}"
        time.sleep(0.2)
    return time.time()


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def openstack(lab, orchestrator, root: Path, profiles: Path) -> Cloud:
    port = 8774
    url = f"http://127.0.0.1:{port}"
    script = (
        f"exec {sys.executable} {HERE / 'openstack_fake.py'} --port-file {root / 'openstack.port'} --port {port} "
        f"--user {OS_USER} --subnet {TEST_NETWORK} --build-seconds 0.2\n"
    )
    serve_on_orchestrator(
        lab,
        orchestrator,
        script,
        root / "logs" / "openstack-fake.log",
        f"{url}/identity/v3",
        env={"FAKE_OS_PASSWORD": OS_PASSWORD},
    )
    write_cluster_profile(
        profiles,
        "openstack",
        "openstack-mh",
        openstack_cloud(SimpleNamespace(url=url), wait_timeout_s=300, verify_stack=True),
    )
    state = lambda: orchestrator(get_json, f"{url}/_fake/state")  # noqa: E731

    def servers():
        return [
            multihost.Server(
                s["id"],
                s["name"],
                s["status"] == "ACTIVE",
                s["address"],
                s["user_data"],
                (s["security_groups"] or [{}])[0].get("name"),
            )
            for s in state()["servers"]
        ]

    def group_rules(name):
        for group in state()["security_group_details"]:
            if group["name"] == name:
                return [
                    {"protocol": p, "from": lo, "to": hi, "source": "group" if src == group["id"] else src}
                    for p, lo, hi, src in group["rules"]
                ]
        return []

    def inventory():
        now = state()
        return {
            "servers": {s["name"]: s["address"] for s in now["servers"]},
            "key_pairs": now["keypairs"],
            "security_groups": [g for g in now["security_groups"] if g != "default"],
        }

    def guest_shutdown(server_id):
        """Nova's view of a guest that powered itself off: the server is SHUTOFF (os-stop)."""
        orchestrator(_nova_stop, url, server_id)

    credentials = {"GAIA_TEST_OS_USERNAME": OS_USER, "GAIA_TEST_OS_PASSWORD": OS_PASSWORD}
    return Cloud(
        "openstack-mh",
        "gaia-os",
        "general.v1.small",
        credentials,
        servers,
        group_rules,
        inventory,
        guest_shutdown,
    )


def _nova_stop(url: str, server_id: str) -> None:
    auth = {"auth": {"identity": {"methods": ["password"], "password": {"user": {
        "name": OS_USER, "domain": {"id": "default"}, "password": OS_PASSWORD}}}}}  # fmt: skip
    request = urllib.request.Request(
        f"{url}/identity/v3/auth/tokens", json.dumps(auth).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        token, project = r.headers["X-Subject-Token"], json.loads(r.read())["token"]["project"]["id"]
    stop = urllib.request.Request(
        f"{url}/compute/v2.1/{project}/servers/{server_id}/action",
        json.dumps({"os-stop": None}).encode(),
        {"Content-Type": "application/json", "X-Auth-Token": token},
    )
    urllib.request.urlopen(stop, timeout=10).close()


def ec2(lab, orchestrator, root: Path, profiles: Path) -> Cloud:
    url = f"http://127.0.0.1:{MOTO_PORT}"
    moto = Path(sys.executable).with_name("moto_server")
    serve_on_orchestrator(
        lab,
        orchestrator,
        f"exec {moto} -H 127.0.0.1 -p {MOTO_PORT}\n",
        root / "logs" / "moto.log",
        f"{url}/moto-api/",
    )
    ec2 = orchestrator(
        lambda: boto3.client(
            "ec2",
            endpoint_url=url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
    )
    call = lambda fn, **kw: orchestrator(lambda: getattr(ec2, fn)(**kw))  # noqa: E731 - every request from the orchestrator host
    # The cluster's subnet is the lab's network, so instances get addresses the lab can give them.
    vpc = call("create_vpc", CidrBlock=str(NETWORK.supernet(new_prefix=16)))["Vpc"]["VpcId"]
    subnet = call("create_subnet", VpcId=vpc, CidrBlock=TEST_NETWORK, AvailabilityZone="us-east-1a")[
        "Subnet"
    ]["SubnetId"]
    cloud = aws_cloud(SimpleNamespace(port=MOTO_PORT), wait_timeout_s=300, verify_stack=True)
    cloud["network"]["subnet"] = subnet
    cloud["network"]["use_public_ip"] = False
    write_cluster_profile(profiles, "aws", "aws-mh", cloud)
    user_data: dict[str, str] = {}

    def live():
        for reservation in call("describe_instances")["Reservations"]:
            for i in reservation["Instances"]:
                if i["State"]["Name"] not in ("terminated", "shutting-down"):
                    yield i, {t["Key"]: t["Value"] for t in i.get("Tags", [])}

    def servers():
        out = []
        for i, tags in live():
            iid = i["InstanceId"]
            if iid not in user_data:
                user_data[iid] = base64.b64decode(
                    call("describe_instance_attribute", InstanceId=iid, Attribute="userData")["UserData"][
                        "Value"
                    ]
                ).decode()
            group = (i.get("SecurityGroups") or [{}])[0].get("GroupName")
            out.append(
                multihost.Server(
                    iid,
                    tags.get("Name", iid),
                    i["State"]["Name"] == "running",
                    i.get("PrivateIpAddress"),
                    user_data[iid],
                    group,
                )
            )
        return out

    def group_rules(name):
        for g in call("describe_security_groups")["SecurityGroups"]:
            if g["GroupName"] == name:
                rules = []
                for p in g["IpPermissions"]:
                    base = {"protocol": p["IpProtocol"], "from": p["FromPort"], "to": p["ToPort"]}
                    rules += [
                        {**base, "source": "group"}
                        for pair in p.get("UserIdGroupPairs", [])
                        if pair["GroupId"] == g["GroupId"]
                    ]
                    rules += [{**base, "source": r["CidrIp"]} for r in p.get("IpRanges", [])]
                return rules
        return []

    def inventory():
        return {
            "servers": {tags.get("Name"): i.get("PrivateIpAddress") for i, tags in live()},
            "key_pairs": [k["KeyName"] for k in call("describe_key_pairs")["KeyPairs"]],
            "security_groups": [
                g["GroupName"]
                for g in call("describe_security_groups")["SecurityGroups"]
                if g["GroupName"] != "default"
            ],
        }

    def reclaim(instance_id):
        """A Spot interruption ends in termination (the default interruption behaviour)."""
        call("terminate_instances", InstanceIds=[instance_id])

    credentials = {"GAIA_TEST_AWS_KEY_ID": AWS_KEY_ID, "GAIA_TEST_AWS_SECRET": AWS_SECRET}
    return Cloud(
        "aws-mh", "gaia-aws", "m5.large", credentials, servers, group_rules, inventory, reclaim=reclaim
    )


@contextlib.contextmanager
def deployment(
    root: Path,
    make_cloud,
    regions: list[str],
    *,
    stars: int,
    workers: int = 2,
    deadman_every: float | None = None,
):
    """A lab with the orchestrator host, the emulator on it, a hypervisor and a catalogue of
    ``stars`` on the share (48 files for all regions, 4 otherwise); runs ask for ``workers``;
    with ``deadman_every`` the nodes run their dead-man switch that often (seconds)."""
    shared, home, profiles = root / "shared", root / "orchestrator-home", root / "profiles"
    shared.mkdir()
    lab = multihost.Lab(TEST_NETWORK).start()
    orchestrator = hypervisor = None
    try:
        lab.add_host("orchestrator", ORCHESTRATOR_ADDRESS)
        orchestrator = multihost.InNamespace(lab.hosts["orchestrator"].namespace)
        cloud = make_cloud(lab, orchestrator, root, profiles)
        secret_file = home / "clusters" / cloud.cluster / "spark-secret"
        hypervisor = multihost.Hypervisor(
            lab,
            servers=cloud.servers,
            group_rules=cloud.group_rules,
            mount=MOUNT,
            shared=shared,
            secret=lambda: secret_file.read_text() if secret_file.exists() else None,
            log_dir=root / "logs",
            deadman_every=deadman_every,
            guest_shutdown=cloud.guest_shutdown,
        )
        files = 48 if len(regions) == len(REGIONS) else 4
        synthetic.generate(
            stars, 14, shared / "landing", load_contract(), files=files, processes=1, progress=False
        )
        hypervisor.start()
        yield Deployment(lab, orchestrator, hypervisor, cloud, root, shared, home, profiles, workers)
    finally:
        try:
            if hypervisor is not None:
                hypervisor.stop()
            if orchestrator is not None:
                orchestrator.close()
        finally:
            lab.close()
    assert [ns for ns in multihost.lab_namespaces() if lab.tag in ns] == [], "namespaces left behind"
