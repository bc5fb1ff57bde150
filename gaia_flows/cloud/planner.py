"""Workload planner: from data volume and workload kind to a Spark cluster shape.

On a cloud the *workload* picks the worker shape, not the hardware at hand. This module turns that into arithmetic a reviewer can check: it takes the
sizes a libcloud driver lists (vCPU, RAM, price) and returns how many workers of which size,
how Spark should carve them into executors, how many shuffle partitions to use and how many
files each sky region should be written as. It imports no libcloud, Spark or Dagster, so every
rule is a millisecond unit test, and the same planner serves every cloud.

Workload rules
--------------
* ``aggregate`` (sequential GROUP BY over HEALPix-sorted files): throughput comes from many
  disks/NICs reading at once, so pick the cheapest vCPU and buy enough of them to scan the
  data in a target time. Little memory is needed per core.
* ``training`` (ML on a selected training set): the training set must stay in executor
  memory (re-reading it with random access is what makes later training runs slow), so pick the
  cluster that fits it with the *fewest* workers, memory-rich sizes first, then cost.
* ``classification`` (apply a broadcast model per region): embarrassingly parallel like
  aggregation, but every executor holds a copy of the model, so it needs more memory per
  core than a scan.

Sizes without a price (OpenStack flavours usually have none) are compared by a resource
proxy (vCPU + RAM/4 GiB), so "cheapest" still means "smallest quota footprint". Dollars and
footprints cannot be compared, so if even one allowed size lacks a price every size is
ranked by footprint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import Enum

from gaia_flows.engine.sizing import files_per_region

MiB = 1024**2
GiB = 1024**3

# Memory a node keeps for the OS, the Spark worker daemon and page cache before executors.
NODE_RESERVED_MB = 1024
NODE_RESERVED_FRACTION = 0.10
# Spark's executor memory overhead (off-heap, Python workers): max(384 MiB, 10 %).
EXECUTOR_OVERHEAD_MIN_MB = 384
EXECUTOR_OVERHEAD_FRACTION = 0.10
# Beyond ~5 cores one executor JVM spends more time in GC/HDFS client contention than it gains.
MAX_EXECUTOR_CORES = 5
# Spark's default fraction of heap usable for execution + storage.
SPARK_MEMORY_FRACTION = 0.6
BUCKET_MIN_BYTES = 32 * MiB
BUCKET_MAX_BYTES = 1 * GiB
SHUFFLE_PARTITION_TARGET_BYTES = 128 * MiB
DEFAULT_REGIONS = 48  # HEALPix level 1
COST_TOLERANCE = 0.10


class Workload(str, Enum):
    AGGREGATE = "aggregate"
    TRAINING = "training"
    CLASSIFICATION = "classification"

    @classmethod
    def parse(cls, value: str | Workload) -> Workload:
        if isinstance(value, Workload):
            return value
        aliases = {
            "sequential": cls.AGGREGATE,
            "sequential_aggregate": cls.AGGREGATE,
            "aggregation": cls.AGGREGATE,
            "ml_training": cls.TRAINING,
            "train": cls.TRAINING,
            "classify": cls.CLASSIFICATION,
            "inference": cls.CLASSIFICATION,
        }
        key = str(value).strip().lower().replace("-", "_")
        if key in aliases:
            return aliases[key]
        try:
            return cls(key)
        except ValueError:
            known = ", ".join(w.value for w in cls)
            raise PlanError(f"unknown workload kind {value!r} (known: {known})") from None


@dataclass(frozen=True)
class Size:
    """A machine shape as a driver lists it; ``id`` is what ``create_node`` needs back."""

    id: str
    name: str
    vcpus: int
    ram_mb: int
    price: float | None = None  # per hour, in the cloud's currency; None = unknown

    @property
    def footprint(self) -> float:
        """Quota-footprint proxy for clouds that list no prices: one vCPU ~ 4 GiB of RAM."""
        return self.vcpus + self.ram_mb / 4096

    def cost_key(self, by_price: bool) -> float:
        return float(self.price) if by_price else self.footprint

    @property
    def priced(self) -> bool:
        return self.price is not None and self.price > 0


@dataclass(frozen=True)
class Limits:
    """What the profile allows; everything optional so a laptop profile can say nothing."""

    min_workers: int = 1
    max_workers: int = 16
    max_total_vcpus: int | None = None
    max_total_ram_mb: int | None = None
    max_price_per_hour: float | None = None
    allowed_sizes: tuple[str, ...] | None = None  # names or ids
    worker_sizes: tuple[str, ...] | None = (
        None  # an operator's pin, for workers only (master still cheapest allowed)
    )
    min_worker_vcpus: int = 1
    master_min_ram_mb: int = 2048

    @classmethod
    def from_mapping(cls, spec: Mapping | None) -> Limits:
        spec = dict(spec or {})
        if spec.get("allowed_sizes") is not None:
            spec["allowed_sizes"] = tuple(str(s) for s in spec["allowed_sizes"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in spec.items() if k in known})


@dataclass(frozen=True)
class WorkloadProfile:
    """Per-workload constants. A profile may set ``cloud.cluster.target_bytes_per_core`` for
    the throughput workloads: storage slower or faster than local disk changes how much one core
    scans in the target time."""

    min_ram_per_core_mb: int
    target_bytes_per_core: int  # how much one core should scan in the target time
    memory_expansion: float  # in-memory bytes per on-disk byte of the working set
    shuffle_ratio: float  # shuffle bytes per input byte
    strategy: str  # "throughput" or "fit_memory"


WORKLOADS: dict[Workload, WorkloadProfile] = {
    Workload.AGGREGATE: WorkloadProfile(1024, 2 * GiB, 0.0, 0.001, "throughput"),
    Workload.CLASSIFICATION: WorkloadProfile(2048, 1 * GiB, 0.0, 0.05, "throughput"),
    # Parquet (zstd) decompresses ~3x and Spark's cached rows + RF histograms roughly double it.
    Workload.TRAINING: WorkloadProfile(4096, 1 * GiB, 6.0, 1.0, "fit_memory"),
}


class PlanError(ValueError):
    """No cluster within the limits fits the workload; the message says what was tried."""


@dataclass(frozen=True)
class Plan:
    workload: Workload
    data_bytes: int
    worker_count: int
    size: Size
    master_size: Size
    executor_cores: int
    executors_per_worker: int
    executor_memory_mb: int
    shuffle_partitions: int
    bucket_bytes: int
    files_per_region: dict[str, int]
    cost_per_hour: float | None
    max_workers: int  # the most workers of ``size`` the limits allow: how far the cluster may grow
    reasons: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total_executor_cores(self) -> int:
        return self.worker_count * self.executors_per_worker * self.executor_cores

    @property
    def total_executor_memory_mb(self) -> int:
        return self.worker_count * self.executors_per_worker * self.executor_memory_mb

    def spark_conf(self) -> dict[str, str]:
        """Spark settings that realise the plan on a standalone cluster.

        An application may use the cores of the largest cluster the limits allow, and starts
        (with dynamic allocation on) with one executor slot per planned one: workers that join
        while it runs, when the cluster grows, take executors it asks for.
        """
        return {
            "spark.executor.cores": str(self.executor_cores),
            "spark.executor.memory": f"{self.executor_memory_mb}m",
            "spark.cores.max": str(self.max_workers * self.executors_per_worker * self.executor_cores),
            "spark.dynamicAllocation.initialExecutors": str(self.worker_count * self.executors_per_worker),
            "spark.dynamicAllocation.maxExecutors": str(self.max_workers * self.executors_per_worker),
            "spark.sql.shuffle.partitions": str(self.shuffle_partitions),
            "spark.sql.files.maxPartitionBytes": str(min(self.bucket_bytes, BUCKET_MAX_BYTES)),
        }

    def fingerprint(self) -> dict:
        """What the provisioner compares: a plan that only changes Spark settings changes no VMs."""
        return {
            "worker_count": self.worker_count,
            "size_id": self.size.id,
            "master_size_id": self.master_size.id,
        }

    def to_dict(self) -> dict:
        out = asdict(self)
        out["workload"] = self.workload.value
        out["reasons"] = list(self.reasons)
        out["spark_conf"] = self.spark_conf()
        return out


@dataclass(frozen=True)
class _Carve:
    executor_cores: int
    executors_per_worker: int
    executor_memory_mb: int

    @property
    def cores(self) -> int:
        return self.executor_cores * self.executors_per_worker

    @property
    def memory_mb(self) -> int:
        return self.executor_memory_mb * self.executors_per_worker


@dataclass(frozen=True)
class _Candidate:
    """One worker size that fits the workload, with what ranking the candidates needs."""

    cost: float  # the workload's cost metric (total, or per useful core for scans)
    preference: int  # lower wins within COST_TOLERANCE of the cheapest
    delivered_cores: int
    size: Size
    shape: _Carve
    workers: int
    ceiling: int  # most workers of this size within the limits
    notes: list[str]


def worker_memory_mb(ram_mb: int) -> int:
    """What a node's Spark worker may hand to executors: its RAM less what the OS, the worker
    daemon and the page cache keep. Advertising all of it lets executors push the node into
    swap or the OOM killer; it is also the memory :func:`carve` splits."""
    return ram_mb - max(NODE_RESERVED_MB, int(ram_mb * NODE_RESERVED_FRACTION))


def carve(size: Size) -> _Carve | None:
    """Split one worker into executors: cores per executor ≤ 5, memory after OS and overhead."""
    usable = worker_memory_mb(size.ram_mb)
    if usable <= EXECUTOR_OVERHEAD_MIN_MB or size.vcpus < 1:
        return None
    # Largest executor (<= MAX_EXECUTOR_CORES cores) that leaves the fewest vCPUs idle.
    cores = min(range(1, min(MAX_EXECUTOR_CORES, size.vcpus) + 1), key=lambda c: (size.vcpus % c, -c))
    executors = size.vcpus // cores
    per_executor = usable / executors
    overhead = max(
        EXECUTOR_OVERHEAD_MIN_MB, per_executor * EXECUTOR_OVERHEAD_FRACTION / (1 + EXECUTOR_OVERHEAD_FRACTION)
    )
    memory = int(per_executor - overhead)
    if memory < 512:
        return None
    return _Carve(cores, executors, memory)


def _allowed(size: Size, limits: Limits) -> bool:
    if limits.allowed_sizes is None:
        return True
    return size.name in limits.allowed_sizes or size.id in limits.allowed_sizes


def _within_totals(size: Size, workers: int, master: Size, limits: Limits) -> str | None:
    vcpus = workers * size.vcpus + master.vcpus
    ram = workers * size.ram_mb + master.ram_mb
    if limits.max_total_vcpus is not None and vcpus > limits.max_total_vcpus:
        return f"{vcpus} vCPU > max_total_vcpus {limits.max_total_vcpus}"
    if limits.max_total_ram_mb is not None and ram > limits.max_total_ram_mb:
        return f"{ram} MiB > max_total_ram_mb {limits.max_total_ram_mb}"
    if limits.max_price_per_hour is not None and size.priced:
        cost = workers * size.price + (master.price or 0.0)
        if cost > limits.max_price_per_hour:
            return f"{cost:.3f}/h > max_price_per_hour {limits.max_price_per_hour}"
    return None


def _max_workers_within(size: Size, master: Size, limits: Limits) -> int:
    n = limits.max_workers
    while n >= limits.min_workers and _within_totals(size, n, master, limits) is not None:
        n -= 1
    return n


def choose_master(sizes: Sequence[Size], limits: Limits, by_price: bool | None = None) -> Size:
    """The master only schedules (the driver runs in the Dagster run), so the cheapest that boots."""
    if by_price is None:
        by_price = all(s.priced for s in sizes)
    candidates = [s for s in sizes if s.ram_mb >= limits.master_min_ram_mb and s.vcpus >= 1]
    if not candidates:
        biggest = max(sizes, key=lambda s: s.ram_mb, default=None)
        raise PlanError(
            f"no size can host the Spark master: need >= {limits.master_min_ram_mb} MiB RAM"
            + (
                f", largest listed is {biggest.name} with {biggest.ram_mb} MiB"
                if biggest
                else ", the driver listed no sizes"
            )
        )
    return min(candidates, key=lambda s: (s.cost_key(by_price), s.vcpus, s.ram_mb, s.name))


def plan_cluster(
    data_bytes: int,
    workload: str | Workload,
    sizes: Iterable[Size],
    limits: Limits | None = None,
    regions: int | Mapping[str, int] = DEFAULT_REGIONS,
    target_bytes_per_core: int | None = None,
) -> Plan:
    """Cheapest cluster (within ``limits``) that suits ``workload`` over ``data_bytes``.

    Parameters
    ----------
    data_bytes
        Input size the cluster is planned for (e.g. the landing area's Gaia files).
    workload
        ``"aggregate"``, ``"training"`` or ``"classification"`` (see the module docstring).
    sizes
        Node sizes the cloud's driver lists (``Size``: vCPU, RAM, price if known).
    limits
        Allowed sizes, worker counts and quotas; default ``Limits()``.
    regions
        A count (data assumed spread evenly over that many sky regions) or a mapping
        ``region -> bytes`` when the landing area already tells the real spread; it decides
        ``Plan.files_per_region``.
    target_bytes_per_core
        For ``aggregate`` and ``classification``: the bytes one core scans in the target time
        (default the workload's own, ``WORKLOADS``).

    Returns
    -------
    Plan
        Worker count and size, master size, executor shape, Spark settings
        (``Plan.spark_conf()``), files per region, hourly cost and the reasons for each choice.

    Raises
    ------
    PlanError
        Nothing within ``limits`` fits; the message lists what was tried and why it failed.
    """
    if data_bytes < 0:
        raise PlanError(f"data_bytes must not be negative, got {data_bytes}")
    kind = Workload.parse(workload)
    rules = WORKLOADS[kind]
    if target_bytes_per_core is not None:
        if target_bytes_per_core < 1:
            raise PlanError(f"target_bytes_per_core must be positive, got {target_bytes_per_core}")
        rules = replace(rules, target_bytes_per_core=target_bytes_per_core)
    limits = limits or Limits()
    if limits.min_workers < 1 or limits.max_workers < limits.min_workers:
        raise PlanError(
            f"limits: need 1 <= min_workers <= max_workers, got {limits.min_workers}..{limits.max_workers}"
        )
    listed = list(sizes)
    if not listed:
        raise PlanError("the driver listed no sizes; check the profile's region/zone and credentials")
    allowed = [s for s in listed if _allowed(s, limits)]
    if not allowed:
        raise PlanError(
            f"none of the allowed_sizes {list(limits.allowed_sizes or [])} is offered by the driver "
            f"(it lists e.g. {', '.join(s.name for s in listed[:6])})"
        )
    by_price = all(s.priced for s in allowed)
    master = choose_master(allowed, limits, by_price)

    rejected: list[str] = []
    candidates: list[_Candidate] = []
    for size in allowed:
        if limits.worker_sizes is not None and not (
            size.name in limits.worker_sizes or size.id in limits.worker_sizes
        ):
            continue
        if size.vcpus < limits.min_worker_vcpus:
            rejected.append(f"{size.name}: {size.vcpus} vCPU < min_worker_vcpus {limits.min_worker_vcpus}")
            continue
        shape = carve(size)
        if shape is None:
            rejected.append(f"{size.name}: {size.ram_mb} MiB leaves no executor memory")
            continue
        per_core = shape.memory_mb / shape.cores
        if per_core < rules.min_ram_per_core_mb:
            rejected.append(
                f"{size.name}: {per_core:.0f} MiB/core < {rules.min_ram_per_core_mb} needed for {kind.value}"
            )
            continue
        ceiling = _max_workers_within(size, master, limits)
        if ceiling < limits.min_workers:
            why = _within_totals(size, limits.min_workers, master, limits)
            rejected.append(f"{size.name}: even {limits.min_workers} worker(s) exceed limits ({why})")
            continue
        notes: list[str] = []
        if rules.strategy == "fit_memory":
            need_mb = math.ceil(data_bytes * rules.memory_expansion / MiB / SPARK_MEMORY_FRACTION)
            workers = max(limits.min_workers, math.ceil(need_mb / shape.memory_mb) if need_mb else 1)
            if workers > ceiling:
                rejected.append(
                    f"{size.name}: training set needs {need_mb} MiB executor memory = {workers} workers > {ceiling} allowed"
                )
                continue
            notes.append(f"training set needs ~{need_mb} MiB executor memory -> {workers} x {size.name}")
            cost_metric = workers * size.cost_key(by_price)
            preference = workers  # fewer workers: less shuffle, less contention on shared storage
            delivered = workers * shape.cores
        else:
            want_cores = max(1, math.ceil(data_bytes / rules.target_bytes_per_core))
            workers = max(limits.min_workers, math.ceil(want_cores / shape.cores))
            if workers > ceiling:
                notes.append(
                    f"wanted {workers} x {size.name} for {want_cores} cores, capped at {ceiling} by limits"
                )
                workers = ceiling
            else:
                notes.append(
                    f"{want_cores} cores to scan {data_bytes / GiB:.2f} GiB -> {workers} x {size.name}"
                )
            delivered = min(workers * shape.cores, want_cores) or 1
            cost_metric = workers * size.cost_key(by_price) / delivered  # cost per useful core
            preference = -workers  # more, smaller workers: more disks and NICs reading at once
        candidates.append(
            _Candidate(cost_metric, preference, delivered, size, shape, workers, ceiling, notes)
        )

    if not candidates:
        if limits.worker_sizes is not None and not any(
            s.name in limits.worker_sizes or s.id in limits.worker_sizes for s in allowed
        ):
            raise PlanError(
                f"worker size {list(limits.worker_sizes)} is not among the allowed sizes {[s.name for s in allowed]}"
            )
        detail = "; ".join(rejected[:12]) + (f"; ... {len(rejected) - 12} more" if len(rejected) > 12 else "")
        raise PlanError(
            f"nothing fits a {kind.value} workload over {data_bytes / GiB:.2f} GiB within limits "
            f"(max_workers={limits.max_workers}): {detail}"
        )

    if rules.strategy == "throughput":
        # When limits cap the worker count, a size that still delivers the cores wins over a
        # cheaper one that cannot: a scan's cost is also its wall time.
        most = max(c.delivered_cores for c in candidates)
        candidates = [c for c in candidates if c.delivered_cores >= most * (1 - COST_TOLERANCE)]
    # Within COST_TOLERANCE of the cheapest, the workload's preference decides (fewer big
    # workers for training, more small ones for scans); beyond it, money wins.
    cheapest = min(c.cost for c in candidates)
    near = [c for c in candidates if c.cost <= cheapest * (1 + COST_TOLERANCE) + 1e-12]
    best = min(near, key=lambda c: (c.preference, c.cost, c.size.vcpus, c.size.name))
    size, shape, workers, notes = best.size, best.shape, best.workers, best.notes
    total_cores = workers * shape.cores
    shuffle_bytes = data_bytes * rules.shuffle_ratio
    shuffle_partitions = max(total_cores * 2, math.ceil(shuffle_bytes / SHUFFLE_PARTITION_TARGET_BYTES))
    # A task slot holds one bucket: the memory Spark gives one core for execution + storage.
    task_memory = int(shape.executor_memory_mb * MiB * SPARK_MEMORY_FRACTION / shape.executor_cores)
    bucket = min(BUCKET_MAX_BYTES, max(BUCKET_MIN_BYTES, task_memory))
    if isinstance(regions, Mapping):
        region_files = {str(k): files_per_region(int(v), bucket) for k, v in regions.items()}
    else:
        if regions < 1:
            raise PlanError(f"regions must be >= 1, got {regions}")
        per_region = math.ceil(data_bytes / regions)
        region_files = {"*": files_per_region(per_region, bucket)}
    cost = round(workers * size.price + master.price, 6) if size.priced and master.priced else None
    reasons = (
        f"workload {kind.value}: strategy {rules.strategy}",
        *notes,
        f"master {master.name} (cheapest with >= {limits.master_min_ram_mb} MiB)",
        f"executor {shape.executor_cores} cores / {shape.executor_memory_mb} MiB x {shape.executors_per_worker} per worker",
        f"bucket {bucket // MiB} MiB = task memory share, clamped to [{BUCKET_MIN_BYTES // MiB}, {BUCKET_MAX_BYTES // MiB}] MiB",
    )
    return Plan(
        workload=kind,
        data_bytes=int(data_bytes),
        worker_count=workers,
        size=size,
        master_size=master,
        executor_cores=shape.executor_cores,
        executors_per_worker=shape.executors_per_worker,
        executor_memory_mb=shape.executor_memory_mb,
        shuffle_partitions=int(shuffle_partitions),
        bucket_bytes=int(bucket),
        files_per_region=region_files,
        cost_per_hour=cost,
        max_workers=best.ceiling,
        reasons=reasons,
    )
