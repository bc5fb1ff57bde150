"""The workload planner on size lists shaped like each cloud's: OpenStack flavours (no
prices), EC2 instance types, GCE machine types and Azure VM sizes (the last two stand in for
their APIs, which libcloud cannot reach on loopback)."""

import math

import pytest
import yaml

from gaia_flows.cloud.planner import (
    EXECUTOR_OVERHEAD_MIN_MB,
    MAX_EXECUTOR_CORES,
    NODE_RESERVED_MB,
    SPARK_MEMORY_FRACTION,
    WORKLOADS,
    GiB,
    Limits,
    PlanError,
    Size,
    Workload,
    plan_cluster,
)
from gaia_flows.profiles import PROFILES_DIR


def S(name, vcpus, gib, price=None, id=None):
    return Size(id=id or name, name=name, vcpus=vcpus, ram_mb=int(gib * 1024), price=price)


# On-demand Linux prices per hour (USD), as the providers list them.
EC2 = [
    S("t3.micro", 2, 1, 0.0104),
    S("c5.large", 2, 4, 0.085),
    S("c5.xlarge", 4, 8, 0.17),
    S("c5.2xlarge", 8, 16, 0.34),
    S("c5.4xlarge", 16, 32, 0.68),
    S("m5.large", 2, 8, 0.096),
    S("m5.xlarge", 4, 16, 0.192),
    S("m5.2xlarge", 8, 32, 0.384),
    S("m5.4xlarge", 16, 64, 0.768),
    S("r5.large", 2, 16, 0.126),
    S("r5.xlarge", 4, 32, 0.252),
    S("r5.2xlarge", 8, 64, 0.504),
    S("r5.4xlarge", 16, 128, 1.008),
]
# Nova flavours: ids are opaque strings, no price.
OPENSTACK = [
    S(name, vcpus, gib, None, id=str(i + 1))
    for i, (name, vcpus, gib) in enumerate(
        [
            ("general.v1.tiny", 1, 2),
            ("general.v1.small", 2, 4),
            ("general.v1.medium", 4, 8),
            ("general.v1.large", 8, 16),
            ("general.v1.xlarge", 16, 32),
            ("memory.v1.large", 8, 64),
            ("memory.v1.xlarge", 16, 128),
        ]
    )
]
GCE = [
    S("e2-standard-2", 2, 8, 0.067),
    S("e2-standard-4", 4, 16, 0.134),
    S("n2-standard-2", 2, 8, 0.097),
    S("n2-standard-4", 4, 16, 0.194),
    S("n2-standard-8", 8, 32, 0.389),
    S("n2-highmem-4", 4, 32, 0.262),
    S("n2-highmem-8", 8, 64, 0.524),
    S("n2-highmem-16", 16, 128, 1.048),
    S("e2-micro", 2, 1, 0.0084),
]
AZURE = [
    S("Standard_D2s_v5", 2, 8, 0.096),
    S("Standard_D4s_v5", 4, 16, 0.192),
    S("Standard_D8s_v5", 8, 32, 0.384),
    S("Standard_E4s_v5", 4, 32, 0.252),
    S("Standard_E8s_v5", 8, 64, 0.504),
    S("Standard_F4s_v2", 4, 8, 0.169),
    S("Standard_B1s", 1, 1, 0.0104),
]


def _profile_limits(name: str) -> Limits:
    cloud = yaml.safe_load((PROFILES_DIR / f"{name}.yaml").read_text())["cloud"]
    return Limits.from_mapping({**(cloud.get("limits") or {}), "allowed_sizes": cloud["sizes"]["allowed"]})


def _check_shape(plan):
    """Invariants every plan must keep, whatever the cloud."""
    size, rules = plan.size, WORKLOADS[plan.workload]
    assert 1 <= plan.executor_cores <= MAX_EXECUTOR_CORES
    assert plan.executor_cores * plan.executors_per_worker <= size.vcpus
    per_executor = plan.executor_memory_mb + max(EXECUTOR_OVERHEAD_MIN_MB, 0)
    assert plan.executors_per_worker * per_executor <= size.ram_mb - NODE_RESERVED_MB
    assert plan.executor_memory_mb / plan.executor_cores >= rules.min_ram_per_core_mb
    assert plan.shuffle_partitions >= 2 * plan.total_executor_cores
    conf = plan.spark_conf()
    assert conf["spark.executor.memory"] == f"{plan.executor_memory_mb}m"
    # The application may grow to the largest cluster the limits allow; it starts on the planned one.
    assert plan.worker_count <= plan.max_workers
    assert int(conf["spark.cores.max"]) == plan.max_workers * plan.executors_per_worker * plan.executor_cores
    assert (
        int(conf["spark.dynamicAllocation.initialExecutors"]) == plan.worker_count * plan.executors_per_worker
    )


@pytest.mark.parametrize("sizes", [EC2, OPENSTACK, GCE, AZURE], ids=["ec2", "openstack", "gce", "azure"])
def test_aggregation_takes_more_leaner_workers_than_training(sizes):
    # A scan of the whole catalogue vs training on a selection of a quarter of it.
    agg = plan_cluster(40 * GiB, "aggregate", sizes, Limits(max_workers=16))
    train = plan_cluster(10 * GiB, "training", sizes, Limits(max_workers=16))
    for plan in (agg, train):
        _check_shape(plan)
    assert agg.worker_count > train.worker_count
    assert agg.size.ram_mb / agg.size.vcpus < train.size.ram_mb / train.size.vcpus
    # The training set (expanded in memory) fits in what Spark may use of the executors' heap.
    need = 10 * GiB * WORKLOADS[Workload.TRAINING].memory_expansion
    assert train.total_executor_memory_mb * 2**20 * SPARK_MEMORY_FRACTION >= need
    # Aggregation buys the cores to scan the data at its target rate.
    assert agg.total_executor_cores >= math.ceil(
        40 * GiB / WORKLOADS[Workload.AGGREGATE].target_bytes_per_core
    )


def test_ec2_aggregate_is_the_cheapest_cluster_that_delivers_the_cores():
    sizes = [s for s in EC2 if s.name != "t3.micro"]
    plan = plan_cluster(40 * GiB, "aggregate", sizes, Limits(max_workers=16))
    want = math.ceil(40 * GiB / WORKLOADS[Workload.AGGREGATE].target_bytes_per_core)
    # Independent brute force over (size, count): cheapest worker cost per delivered core.
    best = None
    for s in sizes:
        per_core_mb = (s.ram_mb - max(NODE_RESERVED_MB, s.ram_mb // 10)) / s.vcpus
        if per_core_mb < 1024 + EXECUTOR_OVERHEAD_MIN_MB:
            continue
        n = max(1, math.ceil(want / s.vcpus))
        if n <= 16:
            cost = n * s.price / min(n * s.vcpus, want)
            best = min(best or (cost, s.name), (cost, s.name))
    chosen = plan.worker_count * plan.size.price / min(plan.total_executor_cores, want)
    assert chosen <= best[0] * 1.10 + 1e-9
    master = min((s for s in sizes if s.ram_mb >= 2048), key=lambda s: s.price)
    assert plan.master_size == master
    assert plan.cost_per_hour == pytest.approx(plan.worker_count * plan.size.price + master.price)


def test_openstack_flavours_without_prices_rank_by_footprint_and_report_no_cost():
    agg = plan_cluster(40 * GiB, "aggregate", OPENSTACK, Limits(max_workers=16))
    train = plan_cluster(40 * GiB, "training", OPENSTACK, Limits(max_workers=16))
    assert agg.cost_per_hour is None and train.cost_per_hour is None
    assert agg.size.name.startswith("general.") and train.size.name.startswith("memory.")
    assert agg.size.id == str(1 + [s.name for s in OPENSTACK].index(agg.size.name)), (
        "create_node needs the flavour id back"
    )
    assert agg.master_size.name == "general.v1.tiny"


def test_mixed_priced_and_unpriced_sizes_are_compared_in_one_unit():
    # A dollar price and a vCPU+RAM footprint are different units: with one unpriced size in
    # the list, the big cheap-looking priced size must not win by comparing 0.01 with 4.
    big = S("big", 8, 32, 0.01)
    small = S("small", 2, 8, None)
    plan = plan_cluster(1 * GiB, "aggregate", [big, small], Limits(max_workers=4))
    assert plan.size.name == "small"
    assert plan.cost_per_hour is None


@pytest.mark.parametrize(
    "profile, sizes, agg_family, train_family",
    [
        ("gce", GCE, ("e2-standard", "n2-standard"), ("n2-highmem",)),
        ("azure", AZURE, ("Standard_D", "Standard_F"), ("Standard_E",)),
    ],
)
def test_gce_and_azure_profiles_plan_from_their_allowed_sizes(profile, sizes, agg_family, train_family):
    limits = _profile_limits(profile)
    assert set(limits.allowed_sizes) <= {s.name for s in sizes}, "the profile allows sizes the cloud lists"
    agg = plan_cluster(100 * GiB, "aggregate", sizes, limits)
    train = plan_cluster(30 * GiB, "training", sizes, limits)
    assert agg.size.name in limits.allowed_sizes and train.size.name in limits.allowed_sizes
    assert agg.size.name.startswith(agg_family) and train.size.name.startswith(train_family)
    assert agg.master_size.name in limits.allowed_sizes, (
        "the micro sizes are not allowed, not even for the master"
    )
    for plan in (agg, train):
        _check_shape(plan)
        assert limits.min_workers <= plan.worker_count <= limits.max_workers
        assert plan.cost_per_hour == pytest.approx(
            plan.worker_count * plan.size.price + plan.master_size.price
        )


def test_limits_cap_total_vcpus_and_price():
    limits = Limits(max_workers=16, max_total_vcpus=40)
    plan = plan_cluster(400 * GiB, "aggregate", EC2, limits)
    assert plan.worker_count * plan.size.vcpus + plan.master_size.vcpus <= 40
    capped = plan_cluster(400 * GiB, "aggregate", EC2, Limits(max_workers=16, max_price_per_hour=2.0))
    assert capped.cost_per_hour <= 2.0
    assert any("capped" in r for r in capped.reasons)


def test_a_small_workload_may_grow_to_the_most_workers_the_limits_allow():
    limits = Limits(min_workers=1, max_workers=16, max_total_vcpus=20)
    plan = plan_cluster(1 * GiB, "aggregate", EC2, limits)
    assert plan.worker_count == 1
    # Totals cap the ceiling below max_workers: master + ceiling workers fit 20 vCPU, one more does not.
    fits = lambda n: n * plan.size.vcpus + plan.master_size.vcpus <= 20  # noqa: E731
    assert fits(plan.max_workers) and not fits(plan.max_workers + 1) and plan.max_workers < 16
    conf = plan.spark_conf()
    assert conf["spark.dynamicAllocation.maxExecutors"] == str(plan.max_workers * plan.executors_per_worker)


def test_a_profile_sets_how_much_one_core_scans():
    """Slow shared storage (the seed platform's CephFS) scans less per core in the same time:
    the same bytes then ask for more cores and workers; training sizes by memory, unchanged."""
    medium = Limits(max_workers=16, worker_sizes=("general.v1.medium",))
    default = plan_cluster(40 * GiB, "aggregate", OPENSTACK, medium)
    slow = plan_cluster(40 * GiB, "aggregate", OPENSTACK, medium, target_bytes_per_core=GiB)
    assert (default.worker_count, slow.worker_count) == (20 // 4, 40 // 4)
    assert "40 cores to scan 40.00 GiB" in " ".join(slow.reasons)
    train = lambda **kw: plan_cluster(40 * GiB, "training", OPENSTACK, Limits(max_workers=16), **kw)  # noqa: E731
    assert train(target_bytes_per_core=GiB // 2).worker_count == train().worker_count
    with pytest.raises(PlanError, match="target_bytes_per_core must be positive"):
        plan_cluster(GiB, "aggregate", OPENSTACK, medium, target_bytes_per_core=0)


def test_a_pinned_worker_size_leaves_the_master_choice_alone():
    free = plan_cluster(40 * GiB, "aggregate", EC2, Limits(max_workers=16))
    pinned = plan_cluster(40 * GiB, "aggregate", EC2, Limits(max_workers=16, worker_sizes=("m5.xlarge",)))
    assert pinned.size.name == "m5.xlarge" and pinned.size != free.size
    assert pinned.master_size == free.master_size
    with pytest.raises(PlanError, match=r"worker size \['x9.huge'\] is not among the allowed sizes"):
        plan_cluster(GiB, "aggregate", EC2, Limits(worker_sizes=("x9.huge",)))


def test_files_per_region_follow_the_bucket_size():
    regions = {"hpx1-00": 10 * GiB, "hpx1-01": 300 * 2**20, "hpx1-02": 0}
    plan = plan_cluster(sum(regions.values()), "aggregate", EC2, Limits(max_workers=8), regions=regions)
    bucket = plan.bucket_bytes
    assert plan.files_per_region == {
        "hpx1-00": math.ceil(10 * GiB / bucket),
        "hpx1-01": math.ceil(300 * 2**20 / bucket),
        "hpx1-02": 1,
    }
    even = plan_cluster(48 * 2 * GiB, "aggregate", EC2, Limits(max_workers=8), regions=48)
    assert even.files_per_region == {"*": math.ceil(2 * GiB / even.bucket_bytes)}


def test_nothing_fits_is_a_clear_error():
    with pytest.raises(
        PlanError,
        match=r"nothing fits a training workload over 2048\.00 GiB.*max_workers=4.*r5\.2xlarge: training set needs \d+ MiB executor memory = \d+ workers > 4 allowed",
    ):
        plan_cluster(2048 * GiB, "training", EC2, Limits(max_workers=4))
    with pytest.raises(
        PlanError,
        match=r"t3\.micro: 1024 MiB leaves no executor memory; c5\.large: \d+ MiB/core < 4096 needed for training",
    ):
        plan_cluster(GiB, "training", [S("t3.micro", 2, 1, 0.01), S("c5.large", 2, 4, 0.085)])
    with pytest.raises(
        PlanError, match=r"no size can host the Spark master: need >= 8192 MiB.*c5\.large with 4096 MiB"
    ):
        plan_cluster(GiB, "aggregate", [S("c5.large", 2, 4, 0.085)], Limits(master_min_ram_mb=8192))
    with pytest.raises(PlanError, match=r"allowed_sizes \['x9\.huge'\] is offered"):
        plan_cluster(GiB, "aggregate", EC2, Limits(allowed_sizes=("x9.huge",)))
    with pytest.raises(PlanError, match="listed no sizes"):
        plan_cluster(GiB, "aggregate", [])
    with pytest.raises(PlanError, match=r"even 20 worker\(s\) exceed limits \(.*max_total_vcpus 30"):
        plan_cluster(GiB, "aggregate", EC2[1:3], Limits(min_workers=20, max_workers=20, max_total_vcpus=30))


def test_workload_names():
    assert Workload.parse("sequential-aggregate") is Workload.AGGREGATE
    assert Workload.parse("ML_training") is Workload.TRAINING
    assert Workload.parse("classify") is Workload.CLASSIFICATION
    with pytest.raises(
        PlanError, match="unknown workload kind 'sorting' .*aggregate, training, classification"
    ):
        plan_cluster(GiB, "sorting", EC2)


def test_fingerprint_changes_with_machines_not_with_spark_settings():
    a = plan_cluster(40 * GiB, "aggregate", EC2, Limits(max_workers=16))
    b = plan_cluster(40 * GiB, "aggregate", EC2, Limits(max_workers=16), regions=12)
    c = plan_cluster(400 * GiB, "aggregate", EC2, Limits(max_workers=16))
    assert a.files_per_region != b.files_per_region
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != c.fingerprint()
