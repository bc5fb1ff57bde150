"""Profiles that aim the shipped ``openstack`` / ``aws`` profiles at the loopback emulators;
shared by the cloud tests and ``benchmarks/cluster.py``."""

from __future__ import annotations

from pathlib import Path

import yaml

from gaia_flows.profiles import PROFILES_DIR

# A private test range: its addresses exist only inside the network namespaces the multi-host
# tests create (tests/cloud/multihost), and the loopback tests never contact them.
TEST_NETWORK = "10.214.14.0/24"
ORCHESTRATOR_ADDRESS = "10.214.14.2"
ORCHESTRATOR_CIDR = f"{ORCHESTRATOR_ADDRESS}/32"

FAST = {
    "retry": {"attempts": 3, "base_delay_s": 0.02, "max_delay_s": 0.1},
    "poll_interval_s": 0.05,
    "wait_timeout_s": 30,
    "client_timeout_s": 5,
}


def write_profile(directory: Path, base: str, name: str, cloud: dict) -> str:
    """A copy of a shipped profile with its ``cloud`` section updated (nested one level)."""
    spec = yaml.safe_load((PROFILES_DIR / f"{base}.yaml").read_text())
    spec["name"] = name
    for key, value in cloud.items():
        if isinstance(value, dict) and isinstance(spec["cloud"].get(key), dict):
            spec["cloud"][key] = {**spec["cloud"][key], **value}
        else:
            spec["cloud"][key] = value
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return name


# verify_stack is off: the emulators' servers run no Spark unless a test hypervisor boots them.
def openstack_cloud(server, timeout: float = FAST["client_timeout_s"], **cluster) -> dict:
    return {
        "credentials": {"key_env": "GAIA_TEST_OS_USERNAME", "secret_env": "GAIA_TEST_OS_PASSWORD"},
        "driver_options": {"ex_force_auth_url": f"{server.url}/identity", "timeout": timeout},
        "network": {"orchestrator_cidr": ORCHESTRATOR_CIDR},
        "cluster": {
            "name": "gaia-os",
            "poll_interval_s": FAST["poll_interval_s"],
            "wait_timeout_s": FAST["wait_timeout_s"],
            "verify_stack": False,
            **cluster,
        },
        "retry": FAST["retry"],
    }


def aws_cloud(proxy, timeout: float = FAST["client_timeout_s"], **cluster) -> dict:
    return {
        "emulator": "moto",
        "credentials": {"key_env": "GAIA_TEST_AWS_KEY_ID", "secret_env": "GAIA_TEST_AWS_SECRET"},
        "driver_options": {"host": "127.0.0.1", "port": proxy.port, "secure": False, "timeout": timeout},
        "region": "us-east-1",
        "zone": "us-east-1a",
        "image": {"id": "ami-12c6146b"},  # one of moto's built-in AMIs
        "network": {"orchestrator_cidr": ORCHESTRATOR_CIDR},
        "cluster": {
            "name": "gaia-aws",
            "poll_interval_s": FAST["poll_interval_s"],
            "wait_timeout_s": FAST["wait_timeout_s"],
            "verify_stack": False,
            **cluster,
        },
        "retry": FAST["retry"],
    }
