"""The orchestrator's lease on a cluster: a file on the shared file system whose age every node's
dead-man switch (``gaia-deadman`` in the cloud-init template) compares with ``orphan_minutes``.

``spark_cluster`` writes it before creating nodes and the ``cluster_sensor`` renews it at
every tick that keeps the cluster; teardown removes it. An orchestrator that stops (crash, lost
network, a closed laptop) stops renewing, and the nodes power themselves off.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from gaia_flows.cloud.settings import CloudSettings


def renew_lease(settings: CloudSettings) -> Path | None:
    """Write the lease now; None when the profile has no share or it is not mounted here."""
    path = settings.lease_path
    if path is None:
        return None
    if not Path(settings.storage["mount"]).is_dir():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{socket.gethostname()} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
    os.replace(tmp, path)
    return path


def lease_age(settings: CloudSettings, now: float | None = None) -> float | None:
    """Seconds since the lease was last written; None without a share or a lease file here."""
    path = settings.lease_path
    if path is None or not path.exists():
        return None
    return (time.time() if now is None else now) - path.stat().st_mtime


def release_lease(settings: CloudSettings) -> None:
    if settings.lease_path is not None:
        settings.lease_path.unlink(missing_ok=True)
