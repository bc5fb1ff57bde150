"""The per-cluster Spark secret: ``spark.authenticate`` and wire encryption for every cluster
whose nodes are separate hosts.

Provisioning generates it once per cluster and keeps it 0600 in the state folder next to the
manifest (``clusters/<name>/spark-secret``); the driver reads it when it opens its session and
the nodes get it through the cloud's secret store (``deployments/README.md``), never through
user data, metadata, the manifest or a log line. Teardown removes it with the cluster.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

SECRET_FILE = "spark-secret"


def secret_path(clusters_dir: Path | str, cluster_name: str) -> Path:
    return Path(clusters_dir) / cluster_name / SECRET_FILE


def ensure_secret(path: Path) -> Path:
    """Create the secret (256 random bits, hex) unless it exists; only its owner can read it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & 0o077:
            raise PermissionError(
                f"{path} is readable by others: chmod 600 it or remove it (the cluster then gets a new secret)"
            ) from None
        return path
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    return path


def read_secret(path: Path) -> str:
    try:
        value = Path(path).read_text().strip()
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"the cluster's Spark secret {path} is missing: re-materialise spark_cluster to recreate it"
        ) from exc
    if not value:
        raise ValueError(f"the cluster's Spark secret {path} is empty")
    return value
