"""Cluster provisioning: plan + provision + re-provision + teardown of 1 master / 8 workers.

For each emulator, in one process, through libcloud's own drivers over loopback HTTP:
  moto       ``moto_server`` (EC2) behind the fault proxy (no faults; it counts requests)
  openstack  the Keystone v3 / Nova / Glance / Neutron fake (servers take 0.2 s to build)
  local      the local NodeDriver: real Spark master + 8 worker JVMs on 127.0.0.1 (``--local``)

Phases: ``plan`` (list sizes, run the planner), ``provision`` (``Provisioner.reconcile``, the
code the ``spark_cluster`` asset runs: key pair, security group, 9 nodes, wait for RUNNING),
``again`` (the same plan re-applied: must make 0 create and 0 destroy calls), ``teardown``.
The baseline, measured in the same run against the same emulator, is the bare minimum a
script would do with libcloud: 9 ``create_node`` then 9 ``destroy_node``, no tags checked, no
group, no waiting. It prints wall seconds, libcloud calls (attempts, by our retry wrapper),
HTTP requests the emulator received, the ratio provision/baseline, and peak RSS.

``--multihost`` (root: network namespaces) instead runs the asset graph on clusters whose
nodes are separate network hosts (``tests/cloud/deployment.py``, what the multi-host test
uses): for 1 master + 2 and 1 master + 4 workers on the OpenStack fake, the wall times of
``spark_cluster`` (provision until every worker runs the driver's stack), the first run
(``gaia_source`` + ``pm_stats`` over all 48 regions), ``pm_stats`` again on the warm driver,
and teardown. The baseline, measured just before each cluster on the same catalogue, is
``pm_stats`` on ``local[2]`` in this process, warm the same way: the ratio is the cost of the
real network path (driver -> master -> executors on other hosts, authenticated and encrypted).

    .venv/bin/python benchmarks/cluster.py            # moto + openstack
    .venv/bin/python benchmarks/cluster.py --local    # and 9 real Spark JVMs
    .venv/bin/python benchmarks/cluster.py --multihost [--stars 200000]
"""

import argparse
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from cloud import servers  # noqa: E402
from cloud.emulators import aws_cloud, openstack_cloud, write_profile  # noqa: E402
from measure import timed, work_folder  # noqa: E402

from gaia_flows.cloud.drivers import build_driver  # noqa: E402
from gaia_flows.cloud.provision import Provisioner  # noqa: E402
from gaia_flows.cloud.settings import CloudSettings  # noqa: E402
from gaia_flows.layout import StateLayout  # noqa: E402
from gaia_flows.partitions import sky_regions  # noqa: E402
from gaia_flows.profiles import load_profile  # noqa: E402

WORKERS = 8
CREATE_OPS = ("create_node", "create_key_pair", "ex_create_security_group")
DESTROY_OPS = (
    "destroy_node",
    "delete_key_pair",
    "ex_delete_security_group",
    "ex_delete_security_group_by_id",
)


def _http(api) -> int:
    return api.stats()["total"] if api is not None else 0


def _phase(name, fn, provisioner, api):
    provisioner.call.calls.clear()
    provisioner.call.seconds.clear()
    before = _http(api)
    started = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - started
    calls = dict(provisioner.call.calls)
    slowest = sorted(provisioner.call.seconds.items(), key=lambda kv: -kv[1])[:3]
    return {
        "slowest": ", ".join(f"{op} {t:.2f}s" for op, t in slowest),
        "phase": name,
        "seconds": seconds,
        "calls": sum(calls.values()),
        "creates": sum(calls.get(op, 0) for op in CREATE_OPS),
        "destroys": sum(calls.get(op, 0) for op in DESTROY_OPS),
        "http": _http(api) - before if api is not None else None,
        "out": out,
    }


def _baseline(settings: CloudSettings, plan, api) -> dict:
    """9 create_node + 9 destroy_node with the same driver, sizes and image, nothing else."""
    driver = build_driver(settings)
    sizes = {str(s.id): s for s in driver.list_sizes()}
    image = Provisioner(driver, settings)._resolve_image()
    before = _http(api)
    started = time.perf_counter()
    nodes = []
    for i in range(WORKERS + 1):
        size = sizes[plan.master_size.id if i == 0 else plan.size.id]
        meta = {
            "gaia-flows-role": "master" if i == 0 else "worker",
            "gaia-flows-master-url": "spark://127.0.0.1:7077",
        }
        if settings.provider == "local-spark" and i > 0:
            meta["gaia-flows-master-url"] = nodes[0].extra["spark_master_url"]
        nodes.append(driver.create_node(name=f"baseline-{i}", size=size, image=image, ex_metadata=meta))
    for node in reversed(nodes):
        driver.destroy_node(node)
    seconds = time.perf_counter() - started
    return {
        "phase": "baseline",
        "seconds": seconds,
        "calls": 2 * len(nodes),
        "creates": len(nodes),
        "destroys": len(nodes),
        "http": _http(api) - before if api is not None else None,
    }


def run(name: str, settings: CloudSettings, api) -> list[dict]:
    provisioner = Provisioner(build_driver(settings), settings)
    plan_row = _phase(
        "plan", lambda: provisioner.plan(workers=WORKERS, size=_worker_size(settings)), provisioner, api
    )
    plan = plan_row["out"]
    rows = [plan_row]
    rows.append(_phase("provision", lambda: provisioner.reconcile(plan), provisioner, api))
    rows.append(_phase("again", lambda: provisioner.reconcile(plan), provisioner, api))
    rows.append(_phase("teardown", provisioner.teardown, provisioner, api))
    leftover = provisioner.inventory()
    assert not leftover["nodes"] and not leftover["security_group"] and not leftover["key_pair"], leftover
    assert len(rows[1]["out"].created) == WORKERS + 1, rows[1]["out"].created
    rows.append(_baseline(settings, plan, api))
    print(f"\n== {name}: 1 master ({plan.master_size.name}) + {plan.worker_count} x {plan.size.name}")
    print(
        f"{'phase':<10} {'wall s':>8} {'calls':>6} {'creates':>8} {'destroys':>9} {'HTTP':>6}  slowest calls"
    )
    for r in rows:
        http = "-" if r["http"] is None else str(r["http"])
        print(
            f"{r['phase']:<10} {r['seconds']:>8.3f} {r['calls']:>6} {r['creates']:>8} {r['destroys']:>9} {http:>6}  {r.get('slowest', '')}"
        )
    base = rows[-1]["seconds"]
    print(
        f"provision/baseline {rows[1]['seconds'] / base:.2f}x   (provision+teardown)/baseline "
        f"{(rows[1]['seconds'] + rows[3]['seconds']) / base:.2f}x   again/provision {rows[2]['seconds'] / rows[1]['seconds']:.3f}"
    )
    assert rows[2]["creates"] == 0 and rows[2]["destroys"] == 0, (
        "re-provisioning an unchanged plan must not create or destroy"
    )
    return rows


def _worker_size(settings: CloudSettings) -> str:
    return {"openstack": "general.v1.medium", "ec2": "m5.xlarge", "local-spark": "local.1x1g"}[
        settings.provider
    ]


def local_pm_stats(landing: Path, home: Path) -> tuple[float, float]:
    """Seconds of ``gaia_source`` + ``pm_stats`` over all regions on ``local[2]`` in this process
    (Spark's start excluded), then of ``pm_stats`` alone again on the warm session."""
    from dagster import materialize
    from support.spark import TEST_SPARK_CONF

    from gaia_flows import spark as spark_factory
    from gaia_flows.assets.catalogue import gaia_landing, gaia_source
    from gaia_flows.assets.proper_motion import pm_stats
    from gaia_flows.resources.spark import SparkResource
    from gaia_flows.resources.storage import StorageResource

    regions = sky_regions.get_partition_keys()
    tags = {
        "dagster/asset_partition_range_start": regions[0],
        "dagster/asset_partition_range_end": regions[-1],
    }
    spark = SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF)
    resources = {"storage": StorageResource(home=str(home), landing=str(landing)), "spark": spark}
    spark.session()
    try:
        first, result = timed(
            lambda: materialize(
                [gaia_landing, gaia_source, pm_stats],
                selection=[gaia_source.key, pm_stats.key],
                resources=resources,
                tags=tags,
            )
        )
        assert result.success
        again, result = timed(
            lambda: materialize(
                [gaia_source, pm_stats], selection=[pm_stats.key], resources=resources, tags=tags
            )
        )
        assert result.success
    finally:
        spark_factory.stop_active()
    return first, again


def multihost(stars: int, shapes: list[int]) -> None:
    """Provision, first run, ``pm_stats`` and teardown on namespace-host clusters (see the module)."""
    from cloud import multihost as lab
    from cloud.deployment import REGIONS, deployment, openstack

    rows = []
    for workers in shapes:
        root = work_folder(None, f"gaia-bench-multihost-{workers}-")
        with deployment(root, openstack, REGIONS, stars=stars, workers=workers) as cluster:
            local_first, local_again = local_pm_stats(cluster.shared / "landing", root / "local-home")
            provision = cluster.run("cluster")["cluster"]["seconds"]
            run = cluster.run("catalogue,pm_stats")
            started = time.perf_counter()
            cluster.run("teardown")
            while set(cluster.lab.hosts) != {"orchestrator"}:
                time.sleep(0.1)
            teardown = time.perf_counter() - started
            assert cluster.cloud.inventory() == {"servers": {}, "key_pairs": [], "security_groups": []}
            assert cluster.hypervisor.errors == [], cluster.hypervisor.errors
        assert not [ns for ns in lab.lab_namespaces() if ns.startswith(lab.PREFIX)], "namespaces left"
        rows.append(
            (
                workers,
                provision,
                run["catalogue"]["seconds"],
                run["pm_stats"]["seconds"],
                teardown,
                local_first,
                local_again,
            )
        )
    print(f"\n== multi-host clusters on the OpenStack fake, {stars:,} stars, 48 regions")
    print(
        f"{'shape':<7} {'provision s':>11} {'first run s':>11} {'pm_stats s':>10} {'teardown s':>10} "
        f"{'local[2] first s':>16} {'local[2] pm_stats s':>19} {'pm_stats ratio':>14}"
    )
    for workers, provision, first, pm, teardown, local_first, local_pm in rows:
        print(
            f"1 + {workers:<3} {provision:>11.1f} {first:>11.1f} {pm:>10.1f} {teardown:>10.1f} "
            f"{local_first:>16.1f} {local_pm:>19.1f} {pm / local_pm:>13.2f}x"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--local", action="store_true", help="also provision 9 real Spark JVMs with the local driver"
    )
    parser.add_argument(
        "--multihost",
        action="store_true",
        help="run the graph on 1+2 and 1+4 node clusters of network-namespace hosts (needs root)",
    )
    parser.add_argument("--stars", type=int, default=200_000, help="catalogue size for --multihost")
    args = parser.parse_args(argv)
    if args.multihost:
        multihost(args.stars, [2, 4])
        return
    work = work_folder(None, "gaia-bench-cluster-")
    layout = StateLayout.from_env(str(work / "state"))
    os.environ.update(
        GAIA_TEST_OS_USERNAME="bench",
        GAIA_TEST_OS_PASSWORD="bench-pw",
        GAIA_TEST_AWS_KEY_ID="AKIABENCH",
        GAIA_TEST_AWS_SECRET="bench",
    )
    profiles = work / "profiles"
    started: list = []
    try:
        moto = servers.start_moto(work / "moto")
        started.append(moto)
        proxy = servers.start_fault_proxy(moto.url, work / "proxy")
        started.append(proxy)
        write_profile(profiles, "aws", "aws", aws_cloud(proxy))
        run("moto (EC2)", CloudSettings.from_profile(load_profile("aws", profiles), layout), proxy)

        fake = servers.start_openstack_fake(work / "openstack", "bench", "bench-pw", build_seconds=0.2)
        started.append(fake)
        write_profile(profiles, "openstack", "openstack", openstack_cloud(fake))
        run("OpenStack fake", CloudSettings.from_profile(load_profile("openstack", profiles), layout), fake)

        if args.local:
            write_profile(
                profiles,
                "local-cluster",
                "local-bench",
                {
                    "sizes": {"local": [{"name": "local.1x1g", "vcpus": 1, "ram_mb": 4096}]},
                    "limits": {"min_workers": 1, "max_workers": WORKERS, "master_min_ram_mb": 1024},
                },
            )
            run(
                "local driver (real Spark JVMs)",
                CloudSettings.from_profile(load_profile("local-bench", profiles), layout),
                None,
            )
    finally:
        for server in reversed(started):
            server.stop()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this process: {peak_mib:.0f} MiB")


if __name__ == "__main__":
    main()
