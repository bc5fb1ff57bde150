"""Cloud targets on loopback for the provisioning tests: a real ``moto_server`` (behind the
fault proxy) for EC2 and the OpenStack fake, each a process started once per session and
stopped by PID, reset to an empty account before every test.

A test asks for ``target`` (parametrised over both clouds) and gets a profile written for
that emulator, the secret set in the environment only, and independent views of what the
cloud holds (boto3 for moto, the fake's own state for OpenStack) so assertions never trust
the code under test to report on itself.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest

from cloud import servers
from cloud.emulators import FAST, aws_cloud, openstack_cloud, write_profile

OS_USER = "gaia-tester"
# Distinctive values: the secrets test greps logs, metadata and files for them.
OS_PASSWORD = f"os-pw-{uuid.uuid4().hex}"
AWS_KEY_ID = f"AKIA{uuid.uuid4().hex[:16].upper()}"
AWS_SECRET = f"aws-secret-{uuid.uuid4().hex}"


@pytest.fixture(scope="session")
def openstack_server(tmp_path_factory):
    server = servers.start_openstack_fake(
        tmp_path_factory.mktemp("openstack-fake"), OS_USER, OS_PASSWORD, build_seconds=0.2
    )
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto(tmp_path_factory):
    server = servers.start_moto(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ec2_proxy(moto, tmp_path_factory):
    proxy = servers.start_fault_proxy(moto.url, tmp_path_factory.mktemp("ec2-proxy"))
    yield proxy
    proxy.stop()


@dataclass
class Target:
    """One emulated cloud as a test sees it."""

    name: str  # openstack | aws
    profiles_dir: Path
    profile: str
    cluster: str
    api: servers.FakeServer  # where faults are injected and requests counted
    create_request: str
    destroy_request: str
    list_request: str
    secret: str
    worker_size: str
    _moto_url: str | None = None

    def profile_with(self, variant: str, timeout: float = FAST["client_timeout_s"], **cluster) -> str:
        """Another profile for the same emulator (e.g. on_failure=keep, a short client timeout)."""
        name = f"{self.profile}-{variant}"
        make = openstack_cloud if self.name == "openstack" else aws_cloud
        return write_profile(self.profiles_dir, self.name, name, make(self.api, timeout=timeout, **cluster))

    def requests(self) -> dict[str, int]:
        return dict(self.api.stats()["requests"])

    def count(self, key: str, before: dict | None = None) -> int:
        now = sum(v for k, v in self.requests().items() if k == key)
        return now - sum(v for k, v in (before or {}).items() if k == key)

    # --- the cloud's own view, not ours ------------------------------------------------
    def servers(self) -> list[dict]:
        """Live instances: name, metadata/tags, security groups."""
        if self.name == "openstack":
            return [
                {
                    "name": s["name"],
                    "tags": s["metadata"],
                    "groups": [g["name"] for g in s["security_groups"]],
                }
                for s in self.api.state()["servers"]
            ]
        out = []
        for i, tags in self._live_instances():
            out.append(
                {
                    "name": tags.get("Name"),
                    "tags": tags,
                    "groups": [g["GroupName"] for g in i.get("SecurityGroups", [])],
                }
            )
        return out

    def user_data(self) -> dict[str, str]:
        """The cloud-init each live instance was booted with, by name."""
        if self.name == "openstack":
            return {s["name"]: s["user_data"] for s in self.api.state()["servers"]}
        ec2, out = self._ec2(), {}
        for i, tags in self._live_instances():
            attribute = ec2.describe_instance_attribute(InstanceId=i["InstanceId"], Attribute="userData")
            out[tags.get("Name")] = base64.b64decode(attribute["UserData"]["Value"]).decode()
        return out

    def _live_instances(self):
        """(instance, tags) of every EC2 instance moto has not terminated."""
        for reservation in self._ec2().describe_instances()["Reservations"]:
            for i in reservation["Instances"]:
                if i["State"]["Name"] not in ("terminated", "shutting-down"):
                    yield i, {t["Key"]: t["Value"] for t in i.get("Tags", [])}

    def key_pairs(self) -> list[str]:
        if self.name == "openstack":
            return self.api.state()["keypairs"]
        return [k["KeyName"] for k in self._ec2().describe_key_pairs()["KeyPairs"]]

    def security_groups(self) -> list[dict]:
        """Non-default groups with their ingress rules as [protocol, from port, to port, source]."""
        if self.name == "openstack":
            fake = self.api.state()
            return [g for g in fake["security_group_details"] if g["name"] != "default"]
        out = []
        for g in self._ec2().describe_security_groups()["SecurityGroups"]:
            if g["GroupName"] == "default":
                continue
            rules = []
            for p in g["IpPermissions"]:
                ports = [p["IpProtocol"], p.get("FromPort"), p.get("ToPort")]
                rules += [[*ports, pair["GroupId"]] for pair in p.get("UserIdGroupPairs", [])]
                rules += [[*ports, r["CidrIp"]] for r in p.get("IpRanges", [])]
            out.append({"id": g["GroupId"], "name": g["GroupName"], "rules": sorted(rules)})
        return out

    def _ec2(self):
        return boto3.client(
            "ec2",
            endpoint_url=self._moto_url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )


@pytest.fixture(params=["openstack", "aws"])
def target(request, tmp_path, layout, monkeypatch) -> Target:
    profiles = tmp_path / "profiles"
    if request.param == "openstack":
        server = request.getfixturevalue("openstack_server")
        server.reset()
        monkeypatch.setenv("GAIA_TEST_OS_USERNAME", OS_USER)
        monkeypatch.setenv("GAIA_TEST_OS_PASSWORD", OS_PASSWORD)
        profile = write_profile(profiles, "openstack", "openstack", openstack_cloud(server))
        return Target(
            "openstack",
            profiles,
            profile,
            "gaia-os",
            server,
            create_request="POST /compute/v2.1/{id}/servers",
            destroy_request="DELETE /compute/v2.1/{id}/servers/{id}",
            list_request="GET /compute/v2.1/{id}/servers/detail",
            secret=OS_PASSWORD,
            worker_size="general.v1.medium",
        )
    moto_server = request.getfixturevalue("moto")
    proxy = request.getfixturevalue("ec2_proxy")
    servers.moto_reset(moto_server)
    proxy.reset()
    monkeypatch.setenv("GAIA_TEST_AWS_KEY_ID", AWS_KEY_ID)
    monkeypatch.setenv("GAIA_TEST_AWS_SECRET", AWS_SECRET)
    profile = write_profile(profiles, "aws", "aws", aws_cloud(proxy))
    return Target(
        "aws",
        profiles,
        profile,
        "gaia-aws",
        proxy,
        create_request="Action=RunInstances",
        destroy_request="Action=TerminateInstances",
        list_request="Action=DescribeInstances",
        secret=AWS_SECRET,
        worker_size="m5.xlarge",
        _moto_url=moto_server.url,
    )
