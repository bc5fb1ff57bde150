"""Security groups per driver family: the one part of provisioning libcloud does not unify.

``NodeDriver`` has a common API for nodes, sizes, images and key pairs, but firewalls are
``ex_`` extensions with different shapes on every cloud. Each adapter below maps the same
four operations - find, create (cluster-internal + orchestrator rules), delete, and the
``create_node`` keyword that attaches the group - onto one family, so the provisioner stays
cloud-neutral. The group admits all TCP/UDP from its own members and, from the orchestrator's
CIDR, TCP to exactly the ports it needs (``CloudSettings.orchestrator_ports``: SSH, the
master, the workers, their web UIs and the executors' block managers), nothing else. Executors
call the driver back on its fixed ports; that is the orchestrator's firewall, not this group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from libcloud.compute.base import NodeDriver


@dataclass
class Group:
    id: str
    name: str
    handle: Any  # the driver's own object, passed back to its ex_ calls


class Firewall:
    def __init__(self, driver: NodeDriver, call):
        self.driver = driver
        self.call = call  # gaia_flows.cloud.retry.Caller

    def find(self, name: str) -> Group | None:
        raise NotImplementedError

    def create(
        self,
        name: str,
        description: str,
        orchestrator_cidr: str | None,
        ports: list[tuple[int, int]],
        subnet: str | None = None,
    ) -> Group:
        """The group, open inside itself and on ``ports`` (inclusive ranges) from ``orchestrator_cidr``,
        in the network of ``subnet`` where the cloud scopes groups by network (EC2's VPCs)."""
        raise NotImplementedError

    def delete(self, group: Group) -> None:
        raise NotImplementedError

    def node_kwargs(self, group: Group, subnet: str | None = None) -> dict:
        raise NotImplementedError


class OpenStackFirewall(Firewall):
    """Neutron groups (libcloud's OpenStack 2.0 driver) and the local driver's look-alike."""

    def find(self, name):
        for g in self.call("ex_list_security_groups", self.driver.ex_list_security_groups):
            if g.name == name:
                return Group(str(g.id), g.name, g)
        return None

    def create(self, name, description, orchestrator_cidr, ports, subnet=None):
        g = self.call("ex_create_security_group", self.driver.ex_create_security_group, name, description)
        rule = self.driver.ex_create_security_group_rule
        self.call("ex_create_security_group_rule", rule, g, "tcp", 1, 65535, source_security_group=g)
        self.call("ex_create_security_group_rule", rule, g, "udp", 1, 65535, source_security_group=g)
        if orchestrator_cidr:
            for low, high in ports:
                self.call("ex_create_security_group_rule", rule, g, "tcp", low, high, cidr=orchestrator_cidr)
        return Group(str(g.id), g.name, g)

    def delete(self, group):
        self.call("ex_delete_security_group", self.driver.ex_delete_security_group, group.handle)

    def node_kwargs(self, group, subnet=None):
        return {"ex_security_groups": [group.handle]}


class EC2Firewall(Firewall):
    def find(self, name):
        groups = self.call(
            "ex_get_security_groups", self.driver.ex_get_security_groups, filters={"group-name": name}
        )
        for g in groups:
            if g.name == name:
                return Group(g.id, g.name, g)
        return None

    def create(self, name, description, orchestrator_cidr, ports, subnet=None):
        vpc_id = None
        if subnet:  # a group belongs to one VPC: the subnet's, or nodes there cannot use it
            (found,) = self.call("ex_list_subnets", self.driver.ex_list_subnets, subnet_ids=[subnet])
            vpc_id = found.extra["vpc_id"]
        created = self.call(
            "ex_create_security_group", self.driver.ex_create_security_group, name, description, vpc_id=vpc_id
        )
        gid = created["group_id"]
        ingress = self.driver.ex_authorize_security_group_ingress
        for protocol in ("tcp", "udp"):
            self.call(
                "ex_authorize_security_group_ingress",
                ingress,
                gid,
                0,
                65535,
                group_pairs=[{"group_id": gid}],
                protocol=protocol,
            )
        if orchestrator_cidr:
            for low, high in ports:
                self.call(
                    "ex_authorize_security_group_ingress",
                    ingress,
                    gid,
                    low,
                    high,
                    cidr_ips=[orchestrator_cidr],
                    protocol="tcp",
                )
        return Group(gid, name, created)

    def delete(self, group):
        self.call("ex_delete_security_group_by_id", self.driver.ex_delete_security_group_by_id, group.id)

    def node_kwargs(self, group, subnet=None):
        # libcloud accepts group ids only together with a subnet; the default VPC takes names.
        return {"ex_security_group_ids": [group.id]} if subnet else {"ex_security_groups": [group.name]}


class GCEFirewall(Firewall):
    """GCE firewalls select instances by network tag (the cluster name). Not exercised by tests:
    libcloud's GCE driver cannot be pointed at a loopback fake."""

    network = "default"

    def find(self, name):
        try:
            fw = self.call("ex_get_firewall", self.driver.ex_get_firewall, name)
        except Exception as exc:  # ResourceNotFoundError is permanent for the caller, absent for us
            if "notfound" in str(exc).lower().replace(" ", "") or "not found" in str(exc).lower():
                return None
            raise
        return Group(fw.name, fw.name, fw)

    def create(self, name, description, orchestrator_cidr, ports, subnet=None):
        tag = name.removesuffix("-sg")
        allowed = [{"IPProtocol": "tcp", "ports": ["1-65535"]}, {"IPProtocol": "udp", "ports": ["1-65535"]}]
        fw = self.call(
            "ex_create_firewall",
            self.driver.ex_create_firewall,
            name,
            allowed,
            network=self.network,
            source_tags=[tag],
            target_tags=[tag],
            description=description,
        )
        if orchestrator_cidr:
            self.call(
                "ex_create_firewall",
                self.driver.ex_create_firewall,
                f"{name}-orchestrator",
                [
                    {
                        "IPProtocol": "tcp",
                        "ports": [f"{low}-{high}" if high != low else str(low) for low, high in ports],
                    }
                ],
                network=self.network,
                source_ranges=[orchestrator_cidr],
                target_tags=[tag],
            )
        return Group(fw.name, fw.name, fw)

    def delete(self, group):
        for name in (f"{group.name}-orchestrator", group.name):
            found = self.find(name)
            if found is not None:
                self.call("ex_destroy_firewall", self.driver.ex_destroy_firewall, found.handle)

    def node_kwargs(self, group, subnet=None):
        return {"ex_tags": [group.name.removesuffix("-sg")]}


def firewall_for(provider: str, driver: NodeDriver, call) -> Firewall:
    if provider in ("openstack", "local-spark"):
        return OpenStackFirewall(driver, call)
    if provider == "ec2":
        return EC2Firewall(driver, call)
    if provider == "gce":
        return GCEFirewall(driver, call)
    raise NotImplementedError(
        f"no security-group adapter for provider {provider!r}: profile and planner work, provisioning does not"
    )
