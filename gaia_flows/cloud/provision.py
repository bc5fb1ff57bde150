"""Desired-vs-actual reconciliation of a Spark cluster through the libcloud ``NodeDriver`` API.

The cluster is whatever nodes carry the tag ``gaia-flows-cluster=<name>``; nothing is kept
in a local database, so a lost state folder never orphans VMs and any process can tear a
cluster down. One reconcile:

1. list tagged nodes; ensure the key pair and the security group exist (create if missing);
2. keep a healthy master of the planned size, else create one and wait for its address;
3. keep up to N healthy workers of the planned size that point at *this* master; destroy
   the rest (surplus, wrong size, stale master, ERROR) and create what is missing;
4. wait until every node is RUNNING (bounded by ``wait_timeout_s``), write the manifest.

An unchanged plan therefore makes list calls only. Every call goes through
``retry.Caller``: transient errors are retried with backoff; a permanent one (quota,
credentials, timeout of the whole wait) ends the attempt and, by the profile's
``on_failure``, either destroys what this attempt created (``rollback``) or leaves it
tagged for ``teardown_cluster`` (``keep``). The error says which happened.
"""

from __future__ import annotations

import json
import logging
import os
import string
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path

from libcloud.compute.base import Node, NodeDriver, NodeImage, NodeSize
from libcloud.compute.types import NodeState

from gaia_flows.cloud import prometheus
from gaia_flows.cloud.cost import check_budget, cost_report, openstack_quota
from gaia_flows.cloud.drivers import planner_sizes
from gaia_flows.cloud.firewall import Group, firewall_for
from gaia_flows.cloud.lease import release_lease, renew_lease
from gaia_flows.cloud.planner import Plan, plan_cluster, worker_memory_mb
from gaia_flows.cloud.retry import Caller, CloudCallError, describe, is_timeout, redact
from gaia_flows.cloud.secret import ensure_secret
from gaia_flows.cloud.settings import (
    TAG_CLUSTER,
    TAG_INDEX,
    TAG_MASTER,
    TAG_MASTER_URL,
    TAG_ROLE,
    TAG_SIZE,
    CloudSettings,
)
from gaia_flows.layout import REPO_ROOT

log = logging.getLogger(__name__)

DEFAULT_USER_DATA = REPO_ROOT / "deployments" / "cloud-init" / "spark-node.yaml.tmpl"
HEALTHY = {
    NodeState.RUNNING,
    NodeState.PENDING,
    NodeState.STARTING,
    NodeState.REBOOTING,
    NodeState.RECONFIGURING,
}
GONE = {NodeState.TERMINATED}
DEFAULT_CLIENT_TIMEOUT_S = 60.0  # libcloud's default connection timeout


class ProvisionError(RuntimeError):
    """A step of provisioning failed permanently (e.g. a node went to ERROR, the wait timed out)."""


class ProvisioningFailed(RuntimeError):
    """Provisioning stopped; ``rolled_back`` and ``leftover`` say what exists afterwards."""

    def __init__(self, message: str, *, rolled_back: bool, leftover: list[dict], created: list[str]):
        super().__init__(message)
        self.rolled_back = rolled_back
        self.leftover = leftover
        self.created = created


def node_tags(node: Node) -> dict[str, str]:
    """Tags live in ``extra['tags']`` (EC2, Azure), ``['metadata']`` (OpenStack, local) or ``['labels']`` (GCE)."""
    extra = node.extra or {}
    for key in ("tags", "metadata", "labels"):
        value = extra.get(key)
        if isinstance(value, dict) and TAG_CLUSTER in value:
            return {str(k): str(v) for k, v in value.items()}
    return {}


def node_summary(node: Node) -> dict:
    tags = node_tags(node)
    return {
        "id": node.id,
        "name": node.name,
        "role": tags.get(TAG_ROLE),
        "state": str(node.state),
        "private_ips": list(node.private_ips or []),
        "public_ips": list(node.public_ips or []),
        "size": tags.get(TAG_SIZE),
        # The local driver's daemons pick free ports; cloud-init uses Spark's fixed ones.
        "ui_port": (node.extra or {}).get("webui_port")
        or (prometheus.MASTER_UI_PORT if tags.get(TAG_ROLE) == "master" else prometheus.WORKER_UI_PORT),
    }


def render_user_data(
    settings: CloudSettings,
    *,
    role: str,
    node_name: str,
    master_host: str,
    worker_cores: int,
    worker_memory_mb: int,
) -> str:
    """cloud-init for one node from the template in ``deployments/`` (no secrets go in)."""
    import pyspark

    path = (
        Path(settings.cluster.user_data_template)
        if settings.cluster.user_data_template
        else DEFAULT_USER_DATA
    )
    if not path.is_absolute():
        path = REPO_ROOT / path
    template = string.Template(path.read_text())
    daemon_conf = (
        "\n".join(f"      {key} {value}" for key, value in settings.security_conf().items())
        or "      # (no settings)"
    )
    return template.substitute(
        cluster=settings.name,
        role=role,
        node_name=node_name,
        master_host=master_host,
        master_port=settings.cluster.spark_port,
        worker_port=settings.cluster.worker_port,
        worker_cores=worker_cores,
        worker_memory_mb=worker_memory_mb,
        master_ui_port=prometheus.MASTER_UI_PORT,
        worker_ui_port=prometheus.WORKER_UI_PORT,
        node_exporter_port=prometheus.NODE_EXPORTER_PORT,
        master_metrics_options=prometheus.daemon_java_options("master"),
        worker_metrics_options=prometheus.daemon_java_options("worker"),
        spark_version=settings.cluster.spark_version or pyspark.__version__,
        python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
        python_major=sys.version_info.major,
        python_minor=sys.version_info.minor,
        daemon_conf=daemon_conf,
        mount_path=settings.storage.get("mount") or "(no shared file system)",
        mounts=json.dumps(share_mounts(settings.storage)),
        lease_path=settings.lease_path or "",
        orphan_seconds=int(settings.cluster.orphan_minutes * 60),
    )


def share_mounts(storage: dict) -> list[list[str]]:
    """cloud-init ``mounts`` entry for the profile's shared file system (none without one)."""
    share = storage.get("share")
    if not share or not storage.get("mount"):
        return []
    options = ",".join(filter(None, [share.get("options"), "_netdev"]))
    return [[share["source"], storage["mount"], share["type"], options, "0", "0"]]


@dataclass
class ReconcileResult:
    manifest: dict
    created: list[str] = field(default_factory=list)
    destroyed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    created_key_pair: bool = False
    created_security_group: bool = False
    seconds: float = 0.0


class Provisioner:
    def __init__(
        self,
        driver: NodeDriver,
        settings: CloudSettings,
        caller: Caller | None = None,
        logger: logging.Logger | None = None,
        sleep=time.sleep,
        clock=time.monotonic,
    ):
        self.driver = driver
        self.settings = settings
        self.log = logger or log
        self.sleep = sleep
        self.clock = clock
        self.call = caller or Caller(settings.retry, logger=self.log, sleep=sleep, clock=clock)
        self.firewall = firewall_for(settings.provider, driver, self.call)
        self._sizes: list[NodeSize] | None = None
        self._image: NodeImage | None = None
        self._network = None
        self._run_token = uuid.uuid4().hex[:16]

    # --- planning ------------------------------------------------------------------------
    def node_sizes(self) -> list[NodeSize]:
        if self._sizes is None:
            self._sizes = list(self.call("list_sizes", self.driver.list_sizes))
        return self._sizes

    def plan(
        self,
        data_bytes: int | None = None,
        workload: str | None = None,
        regions: int | dict | None = None,
        workers: int | None = None,
        size: str | None = None,
    ) -> Plan:
        """The planner over this driver's sizes and the profile's limits (``workers`` pins N, ``size`` the worker size)."""
        cluster = self.settings.cluster
        limits = self.settings.limits
        if workers is not None:
            limits = replace(limits, min_workers=workers, max_workers=workers)
        if size is not None:
            limits = replace(limits, worker_sizes=(size,))
        return plan_cluster(
            data_bytes=cluster.data_bytes if data_bytes is None else data_bytes,
            workload=workload or cluster.workload,
            sizes=planner_sizes(self.node_sizes(), self.settings.prices),
            limits=limits,
            regions=regions if regions is not None else cluster.regions,
            target_bytes_per_core=cluster.target_bytes_per_core,
        )

    def cost(self, plan: Plan) -> dict:
        """The plan's price, or its quota footprint where the sizes have none (``cloud.cost``)."""
        unpriced_openstack = self.settings.provider == "openstack" and plan.cost_per_hour is None
        return cost_report(plan, self.settings, openstack_quota(self.driver) if unpriced_openstack else None)

    # --- inventory -----------------------------------------------------------------------
    def tagged_nodes(self) -> list[Node]:
        nodes = self.call("list_nodes", self.driver.list_nodes)
        return [
            n for n in nodes if node_tags(n).get(TAG_CLUSTER) == self.settings.name and n.state not in GONE
        ]

    def inventory(self) -> dict:
        """What exists for this cluster right now (nodes, group, key), for tests and teardown checks."""
        group = self.firewall.find(self.settings.group_name)
        return {
            "nodes": [node_summary(n) for n in self.tagged_nodes()],
            "security_group": group.name if group else None,
            "key_pair": self._find_key(),
        }

    # --- building blocks -----------------------------------------------------------------
    def _find_key(self) -> str | None:
        """Name of this cluster's key pair if it exists; None also when the driver has no key API."""
        try:
            keys = self.call("list_key_pairs", self.driver.list_key_pairs)
        except CloudCallError as exc:
            if isinstance(exc.cause, NotImplementedError):
                return None
            raise
        return next((k.name for k in keys if k.name == self.settings.key_name), None)

    def _keys_supported(self) -> bool:
        # GCE puts ssh keys in instance metadata; its driver has no key-pair API.
        return type(self.driver).list_key_pairs is not NodeDriver.list_key_pairs

    def _ensure_key(self) -> tuple[str | None, bool]:
        name = self.settings.key_name
        if not self._keys_supported():
            return None, False
        if self._find_key():
            return name, False
        if self.settings.public_key_file:
            path = Path(self.settings.public_key_file).expanduser()
            if not path.exists():
                raise ProvisionError(f"key_pair.public_key_file {path} does not exist")
            self.call(
                "import_key_pair_from_string", self.driver.import_key_pair_from_string, name, path.read_text()
            )
            return name, True
        key = self.call("create_key_pair", self.driver.create_key_pair, name)
        if getattr(key, "private_key", None):
            # The cloud generated the pair: keep the private half where only this user can read it.
            target = self.settings.cluster_dir / f"{name}.pem"
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(key.private_key)
        return name, True

    def _ensure_group(self) -> tuple[Group, bool]:
        group = self.firewall.find(self.settings.group_name)
        if group is not None:
            return group, False
        cidr = self.settings.orchestrator()[0] if self.settings.provider != "local-spark" else None
        group = self.firewall.create(
            self.settings.group_name,
            self.settings.group_description,
            cidr,
            self.settings.orchestrator_ports(),
            self.settings.subnet,
        )
        return group, True

    def _resolve_image(self) -> NodeImage:
        if self._image is not None:
            return self._image
        spec = self.settings.image
        ref = spec.get("id") or spec.get("ref")
        if "id" in spec or (self.settings.provider == "ec2" and ref and ref.startswith("ami-")):
            self._image = NodeImage(id=ref, name=None, driver=self.driver)
            return self._image
        wanted = spec.get("name") or ref
        images = self.call("list_images", self.driver.list_images)
        found = next(
            (
                i
                for i in images
                if i.name == wanted or i.id == wanted or (i.name or "").startswith(f"{wanted} (")
            ),
            None,
        )
        if found is None:
            names = ", ".join(sorted({i.name for i in images if i.name})[:10])
            raise ProvisionError(f"image {wanted!r} not found (the driver lists e.g. {names})")
        self._image = found
        return found

    def _node_size(self, size_id: str) -> NodeSize:
        for s in self.node_sizes():
            if str(s.id) == size_id:
                return s
        raise ProvisionError(f"size {size_id!r} is no longer offered by the driver")

    def _provider_kwargs(
        self, metadata: dict, user_data: str, key: str | None, group: Group, spot: bool = False
    ) -> dict:
        provider = self.settings.provider
        kwargs: dict = {}
        if spot and provider == "ec2":
            kwargs["ex_spot"] = True
            if self.settings.cluster.spot_max_price is not None:
                kwargs["ex_spot_max_price"] = self.settings.cluster.spot_max_price
        if spot and provider == "gce":
            kwargs["ex_preemptible"] = True
        if provider == "gce":
            labels = {k: v for k, v in metadata.items() if k != TAG_MASTER_URL}
            kwargs.update(
                ex_labels=labels,
                ex_metadata={"user-data": user_data},
                ex_network=self.settings.network_name or "default",
            )
            if self.settings.zone:
                kwargs["location"] = self.settings.zone
        else:
            kwargs.update(ex_metadata=metadata, ex_userdata=user_data)
            if key:
                kwargs["ex_keyname"] = key
        kwargs.update(self.firewall.node_kwargs(group, self.settings.subnet))
        if provider == "openstack":
            if self.settings.zone:
                kwargs["ex_availability_zone"] = self.settings.zone
            network = self._openstack_network()
            if network is not None:
                kwargs["networks"] = [network]
        if provider == "ec2":
            # A node's dead-man switch powers it off; on EC2 that ends the instance and its bill.
            kwargs["ex_terminate_on_shutdown"] = True
        if provider == "ec2" and self.settings.subnet:
            subnets = self.call(
                "ex_list_subnets", self.driver.ex_list_subnets, subnet_ids=[self.settings.subnet]
            )
            if not subnets:
                raise ProvisionError(f"subnet {self.settings.subnet!r} not found")
            kwargs["ex_subnet"] = subnets[0]
            kwargs["ex_assign_public_ip"] = self.settings.use_public_ip
        return kwargs

    def _openstack_network(self):
        if not self.settings.network_name:
            return None
        if self._network is None:
            networks = self.call("ex_list_networks", self.driver.ex_list_networks)
            self._network = next((n for n in networks if n.name == self.settings.network_name), None)
            if self._network is None:
                raise ProvisionError(f"network {self.settings.network_name!r} not found")
        return self._network

    def _create(
        self,
        *,
        name: str,
        role: str,
        index: int,
        size: NodeSize,
        image: NodeImage,
        key,
        group,
        master_host: str,
        extra_tags: dict,
        attempted: list[str],
    ) -> Node:
        metadata = {
            **self.settings.tags,
            TAG_ROLE: role,
            TAG_INDEX: str(index),
            TAG_SIZE: str(size.id),
            **extra_tags,
        }
        vcpus = planner_sizes([size])[0].vcpus if planner_sizes([size]) else 1
        user_data = render_user_data(
            self.settings,
            role=role,
            node_name=name,
            master_host=master_host,
            worker_cores=vcpus,
            worker_memory_mb=worker_memory_mb(int(size.ram)),
        )
        # Workers may be interruptible (cheaper; a lost one is replaced by the next reconcile);
        # the master never is, since losing it loses the cluster.
        spot = role == "worker" and self.settings.cluster.spot_workers
        kwargs = self._provider_kwargs(metadata, user_data, key, group, spot)
        attempted.append(name)

        def find_landed() -> Node | None:
            for node in self.call("list_nodes", self.driver.list_nodes):
                if (
                    node.name == name
                    and node_tags(node).get(TAG_CLUSTER) == self.settings.name
                    and node.state not in GONE
                ):
                    return node
            return None

        def adopt(exc: BaseException):
            # A create that timed out on our side may still land on the cloud's: never make a
            # twin. The cloud may be as late again as it already was, so look for one more
            # client timeout before sending the create a second time.
            grace = self.clock() + (self._client_timeout() if is_timeout(exc) else 0.0)
            while True:
                node = find_landed()
                if node is not None:
                    self.log.warning(
                        "create_node %s: adopting %s created by the attempt that failed on our side",
                        name,
                        node.id,
                    )
                    return node
                if self.clock() >= grace:
                    return None
                self.sleep(self.settings.cluster.poll_interval_s)

        if self.settings.provider == "ec2":
            # EC2's own idempotency: a retried RunInstances with the same token is one instance.
            kwargs["ex_clienttoken"] = f"{name}-{self._run_token}"[:64]
        self.log.info("creating %s (%s, size %s)", name, role, size.id)
        return self.call(
            "create_node",
            self.driver.create_node,
            name=name,
            size=size,
            image=image,
            before_retry=adopt,
            **kwargs,
        )

    def _client_timeout(self) -> float:
        return float(self.settings.driver_options.get("timeout") or DEFAULT_CLIENT_TIMEOUT_S)

    def _destroy(self, node: Node, why: str) -> None:
        self.log.info("destroying %s (%s): %s", node.name, node.id, why)
        self.call("destroy_node", self.driver.destroy_node, node)

    def _wait_running(self, ids: list[str], deadline: float) -> dict[str, Node]:
        """Poll until every id is RUNNING with an address; ERROR or the deadline is permanent."""
        while True:
            nodes = {n.id: n for n in self.call("list_nodes", self.driver.list_nodes)}
            failed = [
                nodes[i] for i in ids if i in nodes and nodes[i].state in (NodeState.ERROR, NodeState.STOPPED)
            ]
            if failed:
                names = ", ".join(f"{n.name} ({n.state})" for n in failed)
                raise ProvisionError(f"node(s) failed to start: {names}")
            ready = [
                i
                for i in ids
                if i in nodes
                and nodes[i].state == NodeState.RUNNING
                and (nodes[i].private_ips or nodes[i].public_ips)
            ]
            if len(ready) == len(ids):
                return {i: nodes[i] for i in ids}
            if self.clock() > deadline:
                waiting = [nodes[i].name if i in nodes else i for i in ids if i not in ready]
                raise ProvisionError(
                    f"timed out after {self.settings.cluster.wait_timeout_s:.0f}s waiting for {waiting} to run"
                )
            self.sleep(self.settings.cluster.poll_interval_s)

    def master_url(self, master: Node, public: bool | None = None) -> str:
        local = (master.extra or {}).get("spark_master_url")
        if local:
            return local
        public = self.settings.use_public_ip if public is None else public
        ips = (master.public_ips if public else []) or master.private_ips or master.public_ips
        if not ips:
            raise ProvisionError(f"master {master.name} has no address yet")
        return f"spark://{ips[0]}:{self.settings.cluster.spark_port}"

    # --- reconcile -----------------------------------------------------------------------
    def reconcile(self, plan: Plan) -> ReconcileResult:
        started = self.clock()
        deadline = started + self.settings.cluster.wait_timeout_s
        cluster = self.settings.name
        check_budget(plan, self.settings.cluster.max_hourly_cost)  # before any cloud call
        driver_conf = (
            self.settings.driver_conf()
        )  # a placeholder orchestrator fails here, before any cloud call
        if self.settings.security_conf():
            ensure_secret(self.settings.secret_path)
        renew_lease(self.settings)  # nodes about to boot find a fresh lease
        result = ReconcileResult(manifest={})
        attempted: list[str] = []
        master_replaced = False
        try:
            nodes = self.tagged_nodes()
            key, result.created_key_pair = self._ensure_key()
            group, result.created_security_group = self._ensure_group()
            image = self._resolve_image()
            master_size = self._node_size(plan.master_size.id)
            worker_size = self._node_size(plan.size.id)

            masters = sorted(
                (n for n in nodes if node_tags(n).get(TAG_ROLE) == "master"), key=lambda n: n.name
            )
            workers = [n for n in nodes if node_tags(n).get(TAG_ROLE) == "worker"]
            master = next(
                (
                    m
                    for m in masters
                    if m.state in HEALTHY and node_tags(m).get(TAG_SIZE) == str(master_size.id)
                ),
                None,
            )
            for m in masters:
                if m is not master:
                    self._destroy(m, "stale master (unhealthy, wrong size or duplicate)")
                    result.destroyed.append(m.name)
                    master_replaced = True
            if master is None:
                master = self._create(
                    name=f"{cluster}-master",
                    role="master",
                    index=0,
                    size=master_size,
                    image=image,
                    key=key,
                    group=group,
                    master_host="0.0.0.0",
                    extra_tags={},
                    attempted=attempted,
                )
                result.created.append(master.name)
            else:
                result.kept.append(master.name)
            master = self._wait_running([master.id], deadline)[master.id]
            internal_url = self.master_url(master, public=False)
            master_host = internal_url.split("://", 1)[1].rsplit(":", 1)[0]

            def fits(w: Node) -> bool:
                tags = node_tags(w)
                return (
                    w.state in HEALTHY
                    and tags.get(TAG_SIZE) == str(worker_size.id)
                    and tags.get(TAG_MASTER) == master.id
                )

            good = sorted(
                (w for w in workers if fits(w)), key=lambda w: int(node_tags(w).get(TAG_INDEX, "0"))
            )
            keep = good[: plan.worker_count]
            for w in workers:
                if w in keep:
                    continue
                why = "surplus" if w in good else "stale (unhealthy, wrong size or old master)"
                self._destroy(w, why)
                result.destroyed.append(w.name)
            result.kept.extend(w.name for w in keep)
            used = {int(node_tags(w).get(TAG_INDEX, "0")) for w in keep}
            free = (i for i in range(10**6) if i not in used)
            new_ids = []
            for _ in range(plan.worker_count - len(keep)):
                index = next(free)
                node = self._create(
                    name=f"{cluster}-worker-{index}",
                    role="worker",
                    index=index,
                    size=worker_size,
                    image=image,
                    key=key,
                    group=group,
                    master_host=master_host,
                    extra_tags={TAG_MASTER: master.id, TAG_MASTER_URL: internal_url},
                    attempted=attempted,
                )
                result.created.append(node.name)
                new_ids.append(node.id)
            running = self._wait_running([master.id, *[w.id for w in keep], *new_ids], deadline)
        except Exception as exc:
            self._fail(exc, attempted, result, master_replaced)
            raise  # _fail always raises; this keeps type checkers honest

        worker_nodes = [running[i] for i in running if i != master.id]
        result.seconds = round(self.clock() - started, 3)
        result.manifest = self._manifest(plan, running[master.id], worker_nodes, result, driver_conf)
        self.write_manifest(result.manifest)
        return result

    def _manifest(
        self,
        plan: Plan,
        master: Node,
        workers: list[Node],
        result: ReconcileResult,
        driver_conf: dict[str, str],
    ) -> dict:
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        size = plan.size
        path = self.settings.manifest_path
        previous = json.loads(path.read_text()) if path.exists() else {}
        # The cluster is as old as its master: a resize keeps it, so idleness counts from real use.
        same_master = previous.get("master", {}).get("id") == master.id
        created_at = previous.get("created_at", previous.get("updated_at")) if same_master else now
        return {
            "cluster": self.settings.name,
            "profile": self.settings.profile,
            "provider": self.settings.provider,
            "master_url": self.master_url(master),
            "master": node_summary(master),
            "workers": sorted((node_summary(w) for w in workers), key=lambda w: w["name"]),
            "worker_count": len(workers),
            "size": {
                "id": size.id,
                "name": size.name,
                "vcpus": size.vcpus,
                "ram_mb": size.ram_mb,
                "price": size.price,
            },
            "master_size": {
                "id": plan.master_size.id,
                "name": plan.master_size.name,
                "price": plan.master_size.price,
            },
            "cost_per_hour": plan.cost_per_hour,
            "spark_conf": {**plan.spark_conf(), **driver_conf, **self.settings.security_conf()},
            "plan": plan.to_dict(),
            "security_group": self.settings.group_name,
            "key_pair": self.settings.key_name,
            "spot_workers": self.settings.cluster.spot_workers,
            "created_at": created_at,
            "updated_at": now,
        }

    def write_manifest(self, manifest: dict) -> Path:
        path = self.settings.manifest_path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(redact(json.dumps(manifest, indent=2, sort_keys=True)))
        os.replace(tmp, path)
        prometheus.write_targets(path, manifest, node_exporters=self.settings.boots_with_cloud_init)
        return path

    def remove_manifest(self) -> None:
        """The manifest and the Prometheus targets derived from it go together."""
        self.settings.manifest_path.unlink(missing_ok=True)
        prometheus.targets_path(self.settings.manifest_path).unlink(missing_ok=True)

    def _fail(
        self, exc: BaseException, attempted: list[str], result: ReconcileResult, master_replaced: bool
    ) -> None:
        cause = redact(str(exc) if isinstance(exc, (CloudCallError, ProvisionError)) else describe(exc))
        where = (
            f"after creating {len(result.created)} of the node(s) this run needed"
            if result.created
            else "before any node was created"
        )
        head = f"provisioning cluster {self.settings.name!r} failed {where}: {cause}"
        if master_replaced:
            self.remove_manifest()
        if self.settings.cluster.on_failure == "rollback":
            leftover = self._rollback(attempted, result)
            if leftover:
                names = ", ".join(n["name"] for n in leftover)
                message = (
                    f"{head}. Rollback incomplete: {names} still exist, tagged {TAG_CLUSTER}={self.settings.name}; "
                    f"run the teardown_cluster job."
                )
            else:
                undone = ", ".join(result.created) or "nothing"
                message = f"{head}. Rolled back: destroyed what this run created ({undone}); nothing from this attempt is left."
            self.log.error(message)
            raise ProvisioningFailed(
                message, rolled_back=not leftover, leftover=leftover, created=list(result.created)
            ) from exc
        try:
            leftover = [node_summary(n) for n in self.tagged_nodes() if n.name in attempted]
        except Exception:  # listing failed too: report what we know we created
            leftover = [{"name": n} for n in result.created]
        names = ", ".join(n["name"] for n in leftover) or "none"
        message = (
            f"{head}. Left in place (on_failure=keep): {names}, tagged {TAG_CLUSTER}={self.settings.name}; "
            f"re-materialise spark_cluster to finish, or run the teardown_cluster job to remove them."
        )
        self.log.error(message)
        raise ProvisioningFailed(
            message, rolled_back=False, leftover=leftover, created=list(result.created)
        ) from exc

    def _rollback(self, attempted: list[str], result: ReconcileResult) -> list[dict]:
        """Destroy every node this run tried to create - looked up by name, so a create that
        failed on our side but landed on the cloud's is found too - then the group and key
        if this run made them and nothing else uses them. Returns what could not be removed."""
        if not attempted and not (result.created_security_group or result.created_key_pair):
            return []
        try:
            mine = [n for n in self.tagged_nodes() if n.name in attempted]
            for node in mine:
                self._destroy(node, "rollback")
            remaining = self._wait_gone(set(attempted))
            if remaining:
                return [node_summary(n) for n in remaining]
            others = self.tagged_nodes()
            if not others:
                if result.created_security_group:
                    group = self.firewall.find(self.settings.group_name)
                    if group is not None:
                        self.firewall.delete(group)
                if result.created_key_pair:
                    self._delete_key()
        except Exception as exc:
            self.log.error("rollback failed: %s", redact(describe(exc)))
            try:
                return [node_summary(n) for n in self.tagged_nodes() if n.name in attempted]
            except Exception:
                return [{"name": n} for n in attempted]
        return []

    def _wait_gone(self, names: set[str] | None = None, timeout: float | None = None) -> list[Node]:
        """Wait until tagged nodes (optionally only ``names``) are gone; EC2 lingers in shutting-down."""
        deadline = self.clock() + (timeout if timeout is not None else self.settings.cluster.wait_timeout_s)
        while True:
            left = [n for n in self.tagged_nodes() if names is None or n.name in names]
            if not left or self.clock() > deadline:
                return left
            for n in left:
                if n.state in HEALTHY or n.state == NodeState.ERROR:
                    self._destroy(n, "still running after destroy")
            self.sleep(self.settings.cluster.poll_interval_s)

    def _delete_key(self) -> bool:
        if not self._keys_supported():
            return False
        for key in self.call("list_key_pairs", self.driver.list_key_pairs):
            if key.name == self.settings.key_name:
                self.call("delete_key_pair", self.driver.delete_key_pair, key)
                (self.settings.cluster_dir / f"{key.name}.pem").unlink(missing_ok=True)
                return True
        return False

    # --- teardown ------------------------------------------------------------------------
    def teardown(self) -> dict:
        """Remove every node tagged with the cluster name, then its security group and key pair."""
        started = self.clock()
        nodes = self.tagged_nodes()
        for node in nodes:
            self._destroy(node, "teardown")
        remaining = self._wait_gone()
        if remaining:
            names = ", ".join(n.name for n in remaining)
            raise ProvisionError(
                f"teardown of {self.settings.name!r}: {names} still exist after {self.settings.cluster.wait_timeout_s:.0f}s"
            )
        group = self.firewall.find(self.settings.group_name)
        if group is not None:
            self.firewall.delete(group)
        key_deleted = self._delete_key()
        self.remove_manifest()
        self.settings.secret_path.unlink(missing_ok=True)
        release_lease(self.settings)
        return {
            "cluster": self.settings.name,
            "destroyed_nodes": sorted(n.name for n in nodes),
            "deleted_security_group": group.name if group else None,
            "deleted_key_pair": self.settings.key_name if key_deleted else None,
            "seconds": round(self.clock() - started, 3),
        }
