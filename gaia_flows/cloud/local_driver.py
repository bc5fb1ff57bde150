"""A libcloud ``NodeDriver`` whose "VMs" are Spark daemons on 127.0.0.1.

It lets the provisioning code (reconcile, tags, security groups, key pairs, waiting,
teardown) run end to end on one machine against *real* Spark: ``create_node`` with role
``master`` starts a standalone master, with role ``worker`` starts a worker against the
master URL in the node's metadata, and ``destroy_node`` stops the JVM by PID. Cloud-init
user data is accepted and kept (hash only) but not executed: the metadata already says
what the template would have started.

State (nodes, PIDs, key pairs, groups) is a JSON file under ``state_dir``, guarded by a file
lock, so the teardown job in a later run - or another process - sees the same "cloud".
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from libcloud.compute.base import KeyPair, Node, NodeDriver, NodeImage, NodeLocation, NodeSize
from libcloud.compute.types import NodeState

from gaia_flows.cloud import local_spark
from gaia_flows.cloud.settings import TAG_MASTER_URL, TAG_ROLE

DEFAULT_SIZES = (
    {"name": "local.1x2g", "vcpus": 1, "ram_mb": 2048},
    {"name": "local.2x4g", "vcpus": 2, "ram_mb": 4096},
)
IMAGE_ID = "spark-standalone"


class LocalDriverError(RuntimeError):
    pass


@dataclass
class LocalSecurityGroup:
    """Shape-compatible with OpenStack's group (id, name, description, rules)."""

    id: str
    name: str
    description: str
    rules: list[dict] = field(default_factory=list)


class LocalSparkNodeDriver(NodeDriver):
    type = "gaia-local-spark"
    name = "gaia-flows local Spark (127.0.0.1)"
    website = "https://spark.apache.org/docs/latest/spark-standalone.html"
    features = {"create_node": []}

    def __init__(
        self,
        key: str = "local",
        secret=None,
        state_dir: str | os.PathLike | None = None,
        sizes=None,
        **kwargs,
    ):
        super().__init__(key=key, secret=None, **kwargs)
        self.state_dir = (
            Path(state_dir or Path.cwd() / ".gaia" / "clusters" / "local-spark").expanduser().resolve()
        )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._sizes = [dict(s) for s in (sizes or DEFAULT_SIZES)]

    # --- state ---------------------------------------------------------------------------
    @property
    def _state_file(self) -> Path:
        return self.state_dir / "state.json"

    @contextlib.contextmanager
    def _state(self, write: bool = False):
        lock = open(self.state_dir / ".lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = {"nodes": {}, "key_pairs": {}, "security_groups": {}}
            if self._state_file.exists():
                state.update(json.loads(self._state_file.read_text()))
            yield state
            if write:
                tmp = self._state_file.with_suffix(".tmp")
                tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
                os.replace(tmp, self._state_file)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()

    # --- catalogue -----------------------------------------------------------------------
    def list_sizes(self, location=None):
        return [
            NodeSize(
                id=s["name"],
                name=s["name"],
                ram=int(s["ram_mb"]),
                disk=0,
                bandwidth=None,
                price=float(s.get("price", 0.0)),
                driver=self,
                extra={"vcpus": int(s["vcpus"])},
            )
            for s in self._sizes
        ]

    def list_images(self, location=None):
        version = local_spark.spark_home().name
        return [
            NodeImage(
                id=IMAGE_ID,
                name=f"{IMAGE_ID} ({version})",
                driver=self,
                extra={"spark_home": str(local_spark.spark_home())},
            )
        ]

    def list_locations(self):
        return [NodeLocation(id="127.0.0.1", name="loopback", country="local", driver=self)]

    # --- nodes ---------------------------------------------------------------------------
    def create_node(
        self,
        name,
        size,
        image,
        location=None,
        ex_metadata=None,
        ex_userdata=None,
        ex_keyname=None,
        ex_security_groups=None,
        **kwargs,
    ):
        metadata = {str(k): str(v) for k, v in (ex_metadata or {}).items()}
        role = metadata.get(TAG_ROLE)
        if role not in ("master", "worker"):
            raise LocalDriverError(f"local-spark nodes need metadata {TAG_ROLE}=master|worker, got {role!r}")
        if image is not None and getattr(image, "id", IMAGE_ID) != IMAGE_ID:
            raise LocalDriverError(f"unknown image {image.id!r}: the local driver offers only {IMAGE_ID!r}")
        spec = next((s for s in self._sizes if s["name"] in (size.id, size.name)), None)
        if spec is None:
            raise LocalDriverError(f"unknown size {size.id!r}")
        with self._state() as state:
            if ex_keyname and ex_keyname not in state["key_pairs"]:
                raise LocalDriverError(f"key pair {ex_keyname!r} does not exist")
            for group in ex_security_groups or []:
                if getattr(group, "id", group) not in state["security_groups"]:
                    raise LocalDriverError(f"security group {getattr(group, 'name', group)!r} does not exist")
        node_id = f"local-{uuid.uuid4().hex[:12]}"
        log_dir = self.state_dir / "nodes" / node_id
        if role == "master":
            daemon = local_spark.start_master(log_dir, name="master")
        else:
            master_url = metadata.get(TAG_MASTER_URL)
            if not master_url:
                raise LocalDriverError(f"worker {name!r} needs metadata {TAG_MASTER_URL}")
            daemon = local_spark.spawn_worker(
                master_url, log_dir, cores=int(spec["vcpus"]), memory_mb=int(spec["ram_mb"]), name="worker"
            )
        record = {
            "id": node_id,
            "name": name,
            "size_id": spec["name"],
            "image_id": IMAGE_ID,
            "metadata": metadata,
            "key_name": ex_keyname,
            "security_groups": [getattr(g, "id", g) for g in ex_security_groups or []],
            "userdata_sha256": hashlib.sha256((ex_userdata or "").encode()).hexdigest(),
            "created": time.time(),
            "daemon": daemon.to_dict(),
        }
        with self._state(write=True) as state:
            state["nodes"][node_id] = record
        return self._to_node(record)

    def list_nodes(self):
        with self._state() as state:
            records = list(state["nodes"].values())
        return [self._to_node(r) for r in records]

    def destroy_node(self, node):
        with self._state() as state:
            record = state["nodes"].get(node.id)
        if record is None:
            return False
        daemon = local_spark.SparkDaemon.from_dict(record["daemon"])
        daemon.stop()
        with self._state(write=True) as state:
            state["nodes"].pop(node.id, None)
        return True

    def reboot_node(self, node):
        raise NotImplementedError("local-spark nodes are recreated, not rebooted")

    def _to_node(self, record: dict) -> Node:
        daemon = local_spark.refresh(local_spark.SparkDaemon.from_dict(record["daemon"]))
        if not daemon.alive():
            state = NodeState.ERROR
        elif daemon.role == "master" or local_spark.registered(daemon):
            state = NodeState.RUNNING
        else:
            state = NodeState.PENDING
        extra = {
            "metadata": dict(record["metadata"]),
            "pid": daemon.pid,
            "log_path": daemon.log_path,
            "role": daemon.role,
            "size_id": record["size_id"],
            "spark_port": daemon.port,
            "webui_port": daemon.webui_port,
            "key_name": record.get("key_name"),
            "security_groups": record.get("security_groups", []),
        }
        if daemon.role == "master":
            extra["spark_master_url"] = daemon.master_url
        size = next((s for s in self.list_sizes() if s.id == record["size_id"]), None)
        return Node(
            id=record["id"],
            name=record["name"],
            state=state,
            public_ips=[],
            private_ips=[local_spark.LOOPBACK],
            driver=self,
            size=size,
            image=None,
            extra=extra,
        )

    # --- key pairs (recorded only: there is no ssh to loopback daemons) ------------------
    def _to_key_pair(self, record: dict, private_key: str | None = None) -> KeyPair:
        return KeyPair(
            name=record["name"],
            public_key=record["public_key"],
            fingerprint=record["fingerprint"],
            driver=self,
            private_key=private_key,
        )

    def list_key_pairs(self):
        with self._state() as state:
            return [self._to_key_pair(r) for r in state["key_pairs"].values()]

    def get_key_pair(self, name):
        with self._state() as state:
            record = state["key_pairs"].get(name)
        if record is None:
            raise LocalDriverError(f"key pair {name!r} not found")
        return self._to_key_pair(record)

    def import_key_pair_from_string(self, name, key_material):
        record = {
            "name": name,
            "public_key": key_material.strip(),
            "fingerprint": hashlib.md5(key_material.encode()).hexdigest(),
        }
        with self._state(write=True) as state:
            if name in state["key_pairs"]:
                raise LocalDriverError(f"key pair {name!r} already exists")
            state["key_pairs"][name] = record
        return self._to_key_pair(record)

    def create_key_pair(self, name):
        # No private half: nothing on loopback accepts ssh, so there is nothing to protect.
        return self.import_key_pair_from_string(name, f"local-spark-no-ssh {name}")

    def delete_key_pair(self, key_pair):
        with self._state(write=True) as state:
            return state["key_pairs"].pop(key_pair.name, None) is not None

    # --- security groups (OpenStack-shaped ex_ API; recorded, loopback needs no filter) --
    def ex_list_security_groups(self):
        with self._state() as state:
            return [LocalSecurityGroup(**g) for g in state["security_groups"].values()]

    def ex_create_security_group(self, name, description):
        group = LocalSecurityGroup(id=f"sg-{uuid.uuid4().hex[:10]}", name=name, description=description)
        with self._state(write=True) as state:
            state["security_groups"][group.id] = group.__dict__
        return group

    def ex_create_security_group_rule(
        self, security_group, ip_protocol, from_port, to_port, cidr=None, source_security_group=None
    ):
        rule = {
            "protocol": ip_protocol,
            "from_port": from_port,
            "to_port": to_port,
            "cidr": cidr,
            "source_group": getattr(source_security_group, "id", None),
        }
        with self._state(write=True) as state:
            group = state["security_groups"].get(security_group.id)
            if group is None:
                raise LocalDriverError(f"security group {security_group.id!r} not found")
            group["rules"].append(rule)
        return rule

    def ex_delete_security_group(self, security_group):
        with self._state(write=True) as state:
            in_use = [
                n["name"]
                for n in state["nodes"].values()
                if security_group.id in n.get("security_groups", [])
            ]
            if in_use:
                raise LocalDriverError(f"409 security group {security_group.name} in use by {in_use}")
            return state["security_groups"].pop(security_group.id, None) is not None
