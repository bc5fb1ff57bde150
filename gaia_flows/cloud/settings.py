"""The ``cloud:`` section of a profile as typed settings with defaults.

The profile file is validated by JSON schema (``gaia_flows.profiles``); this module only
fills defaults and derives names, so the provisioner reads attributes instead of chasing
optional keys through nested dicts.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from gaia_flows.cloud.planner import DEFAULT_REGIONS, Limits
from gaia_flows.cloud.prometheus import MASTER_UI_PORT, NODE_EXPORTER_PORT, WORKER_UI_PORT
from gaia_flows.cloud.retry import RetryPolicy
from gaia_flows.cloud.secret import secret_path
from gaia_flows.layout import StateLayout
from gaia_flows.profiles import Profile

TAG_CLUSTER = "gaia-flows-cluster"
TAG_ROLE = "gaia-flows-role"
TAG_INDEX = "gaia-flows-index"
TAG_SIZE = "gaia-flows-size"
TAG_MASTER = "gaia-flows-master"
TAG_MASTER_URL = "gaia-flows-master-url"
# Run tags on a teardown the orchestrator decided on its own: what decided it and why.
RUN_TAG_TEARDOWN_DECISION = "gaia-flows/teardown-decision"
RUN_TAG_TEARDOWN_REASON = "gaia-flows/teardown-reason"
# Run tags on a resize the orchestrator decided on its own (grow for a backfill, shrink when idle).
RUN_TAG_RESIZE_DECISION = "gaia-flows/resize-decision"
RUN_TAG_RESIZE_REASON = "gaia-flows/resize-reason"


# The orchestrator's lease on a cluster, under the shared file system every node mounts: the
# nodes' dead-man switch powers them off when it has not been renewed for orphan_minutes.
LEASE_DIR = ".gaia-flows/leases"

# Where the node image keeps the pinned Python stack (deployments/node-image); executors run it.
NODE_PYTHON = "/opt/gaia-flows/venv/bin/python"

# Clouds whose libcloud driver creates interruptible VMs: EC2 Spot (ex_spot), GCE preemptible.
SPOT_PROVIDERS = ("ec2", "gce")

# RFC 5737's documentation range: the shipped profiles' orchestrator_cidr until a user fills it in.
PLACEHOLDER_NETWORK = ipaddress.ip_network("192.0.2.0/24")


class CloudConfigError(ValueError):
    """The profile and the environment together cannot build a driver (names the variable)."""


@dataclass(frozen=True)
class ClusterSettings:
    name: str
    workload: str = "aggregate"
    data_bytes: int = 0
    regions: int = DEFAULT_REGIONS
    target_bytes_per_core: int | None = None  # the planner's scan per core; None: the workload's own
    on_failure: str = "rollback"
    wait_timeout_s: float = 900.0
    poll_interval_s: float = 5.0
    spark_port: int = 7077
    worker_port: int = 7078
    driver_port: int = 7079
    block_manager_port: int = 7080
    port_retries: int = 8
    verify_stack: bool = True
    spark_version: str | None = None
    user_data_template: str | None = None
    max_hourly_cost: float | None = None
    idle_minutes: float = 30.0
    orphan_minutes: float = 60.0
    # Workers beyond limits.min_workers go after this long without a run (limits.min_workers
    # and limits.max_workers are the elastic range; they live in the limits the planner reads).
    worker_idle_minutes: float = 10.0
    spot_workers: bool = False  # workers as EC2 Spot / GCE preemptible VMs; the master stays on demand
    spot_max_price: float | None = None  # EC2 only: the most a Spot worker may cost per hour

    @property
    def block_manager_ports(self) -> tuple[int, int]:
        """Block managers (driver's and every executor's) bind the first free port of this range."""
        return self.block_manager_port, self.block_manager_port + self.port_retries


@dataclass(frozen=True)
class CloudSettings:
    profile: str
    provider: str
    cluster: ClusterSettings
    image: dict
    credentials: dict[str, str] = field(default_factory=dict)
    driver_options: dict = field(default_factory=dict)
    emulator: str | None = None
    region: str | None = None
    zone: str | None = None
    allowed_sizes: tuple[str, ...] | None = None
    prices: dict[str, float] = field(default_factory=dict)
    price_source: str | None = None
    local_sizes: tuple[dict, ...] = ()
    limits: Limits = field(default_factory=Limits)
    network_name: str | None = None
    subnet: str | None = None
    orchestrator_cidr: str | None = None
    driver_host: str | None = None
    use_public_ip: bool = False
    key_pair_name: str | None = None
    public_key_file: str | None = None
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    state_dir: Path | None = None
    clusters_dir: Path | None = None
    storage: dict = field(default_factory=dict)

    @classmethod
    def from_profile(cls, profile: Profile, layout: StateLayout | None = None) -> CloudSettings:
        if profile.cloud is None:
            raise CloudConfigError(
                f"profile {profile.name!r} has no cloud section (it runs Spark at {profile.spark_master})"
            )
        spec = profile.cloud
        layout = layout or StateLayout.from_env()
        cluster = ClusterSettings(**{k: v for k, v in (spec.get("cluster") or {}).items() if v is not None})
        sizes = spec.get("sizes") or {}
        limits_spec = dict(spec.get("limits") or {})
        if sizes.get("allowed"):
            limits_spec["allowed_sizes"] = sizes["allowed"]
        network = spec.get("network") or {}
        key_pair = spec.get("key_pair") or {}
        image = spec["image"]
        if isinstance(image, str):
            image = {"ref": image}
        state_dir = spec.get("state_dir")
        if cluster.spot_workers and spec["provider"] not in SPOT_PROVIDERS:
            raise CloudConfigError(
                f"profile {profile.name!r}: cloud.cluster.spot_workers is for {' and '.join(SPOT_PROVIDERS)}; "
                f"{spec['provider']} has no spot or preemptible VMs through libcloud"
            )
        return cls(
            profile=profile.name,
            provider=spec["provider"],
            cluster=cluster,
            image=dict(image),
            credentials=dict(spec.get("credentials") or {}),
            driver_options=dict(spec.get("driver_options") or {}),
            emulator=spec.get("emulator"),
            region=spec.get("region"),
            zone=spec.get("zone"),
            allowed_sizes=tuple(sizes["allowed"]) if sizes.get("allowed") else None,
            prices={str(k): float(v) for k, v in (sizes.get("prices") or {}).items()},
            price_source=sizes.get("price_source"),
            local_sizes=tuple(sizes.get("local") or ()),
            limits=Limits.from_mapping(limits_spec),
            network_name=network.get("name"),
            subnet=network.get("subnet"),
            orchestrator_cidr=network.get("orchestrator_cidr"),
            driver_host=network.get("driver_host"),
            use_public_ip=bool(network.get("use_public_ip", False)),
            key_pair_name=key_pair.get("name"),
            public_key_file=key_pair.get("public_key_file"),
            retry=RetryPolicy.from_mapping(spec.get("retry")),
            state_dir=Path(state_dir).expanduser() if state_dir else layout.clusters / "local-spark",
            clusters_dir=layout.clusters,
            storage=dict(profile.storage),
        )

    @property
    def name(self) -> str:
        return self.cluster.name

    @property
    def tags(self) -> dict[str, str]:
        return {TAG_CLUSTER: self.cluster.name}

    @property
    def key_name(self) -> str:
        return self.key_pair_name or f"{self.cluster.name}-key"

    @property
    def group_name(self) -> str:
        return f"{self.cluster.name}-sg"

    @property
    def group_description(self) -> str:
        return f"gaia-flows cluster {self.cluster.name}: intra-cluster + orchestrator only"

    @property
    def manifest_path(self) -> Path:
        return manifest_path(self.clusters_dir, self.cluster.name)

    @property
    def cluster_dir(self) -> Path:
        return Path(self.clusters_dir) / self.cluster.name

    @property
    def lease_path(self) -> Path | None:
        """``<storage.mount>/.gaia-flows/leases/<cluster>``; None without a shared file system."""
        mount = self.storage.get("mount")
        return Path(mount) / LEASE_DIR / self.cluster.name if mount else None

    @property
    def secret_path(self) -> Path:
        return secret_path(self.clusters_dir, self.cluster.name)

    def orchestrator(self) -> tuple[str, str]:
        """(CIDR the security group admits, address the Spark driver advertises), both checked.

        The shipped profiles carry a documentation address; provisioning with it would open
        the cluster to nobody and give executors an address to call back that is not the driver.
        """
        cidr, key = self.orchestrator_cidr, f"profile {self.profile!r}: cloud.network.orchestrator_cidr"
        if not cidr:
            raise CloudConfigError(
                f"{key} is required: the private address of the host that runs Dagster (the Spark driver), as a /32"
            )
        network = ipaddress.ip_network(cidr, strict=False)
        if network.overlaps(PLACEHOLDER_NETWORK):
            raise CloudConfigError(
                f"{key} is {cidr}, the documentation placeholder: put the private address of the host that runs Dagster "
                f"(the Spark driver) as a /32, e.g. the output of `hostname -I` on it followed by /32"
            )
        host = self.driver_host or (str(network.network_address) if network.prefixlen == 32 else None)
        if host is None:
            raise CloudConfigError(
                f"{key} is the range {cidr}: set cloud.network.driver_host to the orchestrator's own address in it"
            )
        if ipaddress.ip_address(host) not in network:
            raise CloudConfigError(
                f"profile {self.profile!r}: cloud.network.driver_host {host} is outside orchestrator_cidr {cidr}"
            )
        return str(network), host

    def driver_conf(self) -> dict[str, str]:
        """How a driver on the orchestrator reaches this cluster and is reached by its executors.

        The driver advertises the orchestrator's address (never loopback) and listens on fixed
        ports, so the security group can open exactly them. The local driver's daemons run on
        loopback, where Spark's own defaults apply.
        """
        if self.provider == "local-spark":
            return {}
        _, host = self.orchestrator()
        return {
            "spark.driver.host": host,
            "spark.driver.bindAddress": host,
            "spark.driver.port": str(self.cluster.driver_port),
            "spark.blockManager.port": str(self.cluster.block_manager_port),
            "spark.port.maxRetries": str(self.cluster.port_retries),
            "spark.pyspark.python": NODE_PYTHON,
        }

    @property
    def boots_with_cloud_init(self) -> bool:
        """Nodes are machines started from the cloud-init user data; the local driver's are
        Spark processes on loopback."""
        return self.provider != "local-spark"

    def orchestrator_ports(self) -> list[tuple[int, int]]:
        """TCP ranges the orchestrator opens on nodes: SSH, master, workers, their web UIs
        (people and Prometheus), the node exporter (Prometheus) and the executors' block
        managers (the driver fetches results)."""
        c = self.cluster
        single = sorted({22, c.spark_port, c.worker_port, MASTER_UI_PORT, WORKER_UI_PORT, NODE_EXPORTER_PORT})
        return [(p, p) for p in single] + [c.block_manager_ports]

    def security_conf(self) -> dict[str, str]:
        """Spark authentication and wire encryption, on for every cluster of separate hosts.

        Daemons and driver share one secret per cluster (:mod:`gaia_flows.cloud.secret`); the
        local driver's loopback daemons run without, as ``local[*]`` does.
        """
        if self.provider == "local-spark":
            return {}
        return {"spark.authenticate": "true", "spark.network.crypto.enabled": "true"}

    def secret_env_names(self) -> list[str]:
        return [v for k, v in self.credentials.items() if k.endswith("_env")]


def manifest_path(clusters_dir: Path | str, cluster_name: str) -> Path:
    """Where the spark_cluster asset writes its manifest and SparkResource reads the master URL."""
    return Path(clusters_dir) / f"{cluster_name}.json"


def cluster_name_of(profile: Profile) -> str | None:
    if profile.cloud is None:
        return None
    return (profile.cloud.get("cluster") or {}).get("name")
