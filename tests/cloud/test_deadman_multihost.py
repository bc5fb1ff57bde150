"""The dead-man switch on separate hosts: nodes that stop hearing from the orchestrator power
themselves off, and the next reconcile cleans up.

The multi-host simulation (``tests/cloud/deployment.py``) with the OpenStack fake: every server
runs the ``gaia-deadman`` script from its rendered user data, its timer shortened from a
minute to a second (``deadman_every``), against the lease on the share. ``orphan_minutes`` is
half a minute. Nothing renews the lease after ``spark_cluster``'s reconcile (no daemon runs), so
every node powers itself off; the hypervisor reports that to the fake (``os-stop``: SHUTOFF, as
Nova does) and removes the host. The next ``spark_cluster`` replaces the SHUTOFF servers, and
``teardown_cluster`` leaves nothing.
"""

from __future__ import annotations

import time

from cloud.deployment import MOUNT, NAMESPACE_HOSTS, REGIONS, openstack, wait_until
from cloud.deployment import deployment as cluster_deployment
from gaia_flows.cloud.settings import LEASE_DIR

pytestmark = NAMESPACE_HOSTS

ORPHAN_MINUTES = 0.5
PROFILE = "openstack-mh-orphan"


def test_nodes_power_off_when_the_lease_goes_stale_and_the_next_reconcile_cleans_up(tmp_path):
    with cluster_deployment(tmp_path, openstack, REGIONS[:1], stars=1_000, deadman_every=1.0) as deployment:
        # No stack check: no Spark job runs.
        deployment.derive_profile(PROFILE, {"orphan_minutes": ORPHAN_MINUTES, "verify_stack": False})
        lease = deployment.shared / LEASE_DIR / deployment.cloud.cluster
        names = deployment.node_names()

        def hosts() -> list[str]:
            return sorted(n for n in deployment.lab.hosts if n != "orchestrator")

        def states() -> dict[str, bool]:
            return {s.name: s.running for s in deployment.cloud.servers()}

        first = deployment.run("cluster", profile=PROFILE)["cluster"]["metadata"]
        assert sorted(first["created"]) == names
        renewed = lease.stat().st_mtime  # the reconcile's, on the share at MOUNT on every host
        wait_until(lambda: hosts() == names, 60, "every server is booted as a host")
        assert time.time() - renewed < ORPHAN_MINUTES * 60 and all(states().values())

        # Nobody renews the lease: every node's switch fires once it is orphan_minutes old.
        off = wait_until(lambda: not any(states().values()) and hosts() == [], 120, "every node powered off")
        assert off - renewed >= ORPHAN_MINUTES * 60
        assert sorted(states()) == names, "a powered-off server stays (SHUTOFF), holding quota"
        for name in names:
            log = deployment.hypervisor.log(name)
            assert (
                f"gaia-deadman: lease {MOUNT}/{LEASE_DIR}/{deployment.cloud.cluster} not renewed for" in log
            )
        assert deployment.hypervisor.errors == []

        again = deployment.run("cluster", profile=PROFILE)["cluster"]["metadata"]
        assert sorted(again["destroyed"]) == names and sorted(again["created"]) == names
        assert set(again["node_ids"]).isdisjoint(first["node_ids"])
        wait_until(lambda: hosts() == names, 60, "the replacements are booted")

        deployment.run("teardown", profile=PROFILE)
        wait_until(lambda: hosts() == [], 60, "every host is powered off")
        inventory = deployment.cloud.inventory()
        assert inventory["servers"] == {} and inventory["security_groups"] == []
        assert not lease.exists()
        assert deployment.hypervisor.errors == []
