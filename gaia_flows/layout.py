"""Where everything lives on disk.

One state folder (``$GAIA_FLOWS_HOME``, default ``.gaia``) holds the Dagster instance, the
landing and quarantine areas, the Parquet warehouse and the MLflow store, so deleting it
resets the platform. Every module asks this one helper for paths instead of joining strings.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HOME = ".gaia"


def parquet_files(directory: Path) -> list[Path]:
    """A table directory's data files as Spark reads them: sorted, without hidden (``.``, ``_``)
    files."""
    return sorted(p for p in directory.glob("*.parquet") if not p.name.startswith((".", "_")))


@dataclass(frozen=True)
class StateLayout:
    home: Path
    landing: Path

    @classmethod
    def from_env(cls, home: str | os.PathLike | None = None, landing: str | os.PathLike | None = None) -> "StateLayout":
        """Resolve the folders from arguments first, then ``GAIA_FLOWS_HOME``/``GAIA_FLOWS_LANDING``."""
        home_path = Path(home or os.environ.get("GAIA_FLOWS_HOME") or DEFAULT_HOME).expanduser().resolve()
        landing_path = landing or os.environ.get("GAIA_FLOWS_LANDING") or home_path / "landing"
        return cls(home=home_path, landing=Path(landing_path).expanduser().resolve())

    @property
    def warehouse(self) -> Path:
        return self.home / "warehouse"

    @property
    def quarantine(self) -> Path:
        return self.home / "quarantine"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def mlflow_dir(self) -> Path:
        return self.home / "mlflow"

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_dir / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow_dir / "artifacts"

    @property
    def maps(self) -> Path:
        return self.home / "maps"

    @property
    def hats(self) -> Path:
        """HATS collections for LSDB and other HATS readers, one per exported table::

            hats/<table>/                     symlink to one immutable version (see publish)
                collection.properties         primary catalogue and default margin
                <table>/                      the catalogue: properties, partition_info.csv,
                    dataset/Norder=<k>/Dir=<d>/Npix=<n>.parquet, dataset/_metadata
                <table>_<margin>arcs/         the margin cache, same layout
        """
        return self.home / "hats"

    def hats_collection(self, table: str) -> Path:
        return self.hats / table

    @property
    def clusters(self) -> Path:
        return self.home / "clusters"

    @property
    def spark_local_dir(self) -> Path:
        return self.home / "spark-tmp"

    @property
    def truth(self) -> Path:
        """Hidden ground truth of a synthetic catalogue, kept apart from the Gaia columns."""
        return self.landing / "truth"

    def table(self, name: str) -> Path:
        return self.warehouse / name

    def region_dir(self, table: str, region: str) -> Path:
        return self.warehouse / table / region

    def region_files(self, table: str, region: str) -> list[Path]:
        return parquet_files(self.region_dir(table, region))

    def quarantine_dir(self, table: str, region: str) -> Path:
        return self.quarantine / table / region

    def staging_dir(self, table: str) -> Path:
        """Scratch space on the same filesystem as the warehouse, so publishing is a rename."""
        return self.warehouse / "_staging" / f"{table}-{uuid.uuid4().hex[:12]}"

    def ensure(self) -> "StateLayout":
        for path in (self.landing, self.warehouse, self.quarantine, self.dagster_home, self.mlflow_dir, self.maps):
            path.mkdir(parents=True, exist_ok=True)
        return self


def publish(staged: Path, final: Path) -> Path:
    """Make ``staged`` the content of ``final`` in one atomic step.

    ``final`` is a symlink into ``<table>/.versions/``; swapping the link is a single
    ``rename``, so a reader sees the old version or the new one, never a half-written mix,
    and a failure before the swap leaves the previous version untouched. Spark and DuckDB
    skip dot-directories, so old versions never leak into a table scan.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    versions = final.parent / ".versions"
    versions.mkdir(exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    target = versions / f"{final.name}-{tag}"
    os.replace(staged, target)
    link = final.parent / f".{final.name}.link-{tag}"
    os.symlink(os.path.relpath(target, final.parent), link)
    previous = final.resolve() if final.is_symlink() else None
    if final.exists() and not final.is_symlink():
        shutil.rmtree(final)
    os.replace(link, final)
    if previous is not None and previous != target:
        shutil.rmtree(previous, ignore_errors=True)
    return target


def link_or_copy(source: Path, target: Path) -> None:
    """Put an immutable published file into a new version without copying its bytes: a hard
    link, or a copy on a filesystem without hard links."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
            raise
        shutil.copy2(source, target)
