"""Where everything lives on disk: every folder, table and file name, defined once.

One state folder (``$GAIA_FLOWS_HOME``, default ``.gaia``) holds the Dagster instance, the
landing and quarantine areas, the Parquet warehouse and the MLflow store, so deleting it
resets the platform. Every module asks this one helper for paths instead of joining strings::

    <home>/                                  StateLayout.home
    ├── landing/                             .landing ($GAIA_FLOWS_LANDING overrides)
    │   ├── GaiaSource_<hpx8>-<hpx8>.csv.gz  landing_files(), named as healpix.FILE_GLOB
    │   └── truth/                           .truth: hidden labels of a synthetic catalogue
    ├── warehouse/                           .warehouse
    │   ├── gaia_source/<region>/            SOURCE_TABLE, .region_dir(table, region)
    │   │   ├── part-*.parquet               .region_files(table, region)
    │   │   └── _region.json                 REGION_MANIFEST: what a version holds
    │   ├── pm_stats/<region>/               STATS_TABLE
    │   ├── proper_motion_maps/              MAPS_TABLE (unpartitioned: .table(name))
    │   ├── astrometric_training_set/        TRAINING_TABLE
    │   ├── classified_sources/<region>/     CLASSIFIED_TABLE
    │   ├── <table>/.versions/               immutable versions the links point at (warehouse.publish)
    │   └── _staging/                        .staging_dir(table): writes before publish()
    ├── quarantine/<table>/<region>/         .quarantine_dir(table, region): rejected rows
    ├── dagster/                             .dagster_home
    ├── mlflow/                              .mlflow_dir (mlflow.db, artifacts/)
    ├── maps/                                .maps: PNGs
    ├── clusters/                            .clusters: provisioned clusters' manifests
    └── spark-tmp/                           .spark_local_dir

``<region>`` is a sky-region key such as ``hpx1-07``
(:func:`gaia_flows.science.healpix.region_key`).

The tree above is the default data release's (:data:`DEFAULT_RELEASE`, DR3). Every further
release (:mod:`gaia_flows.releases`) has the same data folders one level down, so adding it
never touches a DR3 file (:meth:`StateLayout.for_release`)::

    landing/<release>/        GaiaSource_*.csv.gz of that release, its truth/
    warehouse/<release>/      gaia_source/<region>/, pm_stats/<region>/, ... as above
    quarantine/<release>/     <table>/<region>/
    maps/<release>/           PNGs
    hats/<release>/           HATS collections

The Dagster instance, the MLflow store (one registered model per release), the clusters and
Spark's scratch space are shared by all releases.

On a cluster of separate hosts the data folders move to a shared file system that every node
mounts at the same path (the profile's ``storage`` section, see :meth:`StateLayout.with_storage`):
executors read the landing files and write the warehouse there, while the Dagster instance and
Spark's scratch space stay in the orchestrator's own state folder.
"""

from __future__ import annotations

import importlib.resources
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from gaia_flows.science.ecsv import GaiaFileError
from gaia_flows.science.healpix import is_gaia_file_name, parse_region_key

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HOME = ".gaia"

SOURCE_TABLE = "gaia_source"
STATS_TABLE = "pm_stats"
MAPS_TABLE = "proper_motion_maps"
TRAINING_TABLE = "astrometric_training_set"
CLASSIFIED_TABLE = "classified_sources"

CONTRACTS_PACKAGE_DIR = "data/contracts"
"""The table contracts (top-level ``data_contracts/``) as installed with the package."""
PROFILES_PACKAGE_DIR = "data/profiles"
"""The deployment profiles (top-level ``resources/``) as installed with the package."""

DEFAULT_RELEASE = "dr3"
"""The data release whose folders, asset keys and model name carry no release name."""


def contract_file_name(table: str, release: str) -> str:
    """A release's contract of ``table`` in ``data_contracts/``: ``gaia_source_dr3.yaml``."""
    return f"{table}_{release}.yaml"


REGION_MANIFEST = "_region.json"
"""Sidecar of every published table version: what it holds and where it came from."""


def parquet_files(directory: Path) -> list[Path]:
    """A table directory's data files as Spark reads them: sorted, without hidden (``.``, ``_``)
    files."""
    return sorted(p for p in directory.glob("*.parquet") if not p.name.startswith((".", "_")))


def package_data(folder: str) -> Path:
    """A data folder installed inside the package, found through :mod:`importlib.resources`, so
    a wheel or a container works without a source checkout (packages install unzipped)."""
    return Path(str(importlib.resources.files("gaia_flows").joinpath(folder)))


def landing_files(landing: Path) -> list[Path]:
    """Gaia bulk files in the landing folder (not its subfolders), sorted.

    The one listing the ingestion, the landing sensor, cluster sizing and the CLI share. A CSV
    that is not named like a bulk file is an error, because its rows could not be placed on
    the sky without guessing.
    """
    if not landing.exists():
        return []
    candidates = sorted(p for p in landing.iterdir() if p.is_file() and ".csv" in p.name)
    unknown = [p for p in candidates if not is_gaia_file_name(p)]
    if unknown:
        raise GaiaFileError(unknown[0], "unknown file name: expected GaiaSource_<hpx8start>-<hpx8end>.csv.gz")
    return candidates


STORAGE_DIRS = ("landing", "warehouse", "quarantine", "maps")


@dataclass(frozen=True)
class StateLayout:
    """``home`` and the four data folders: ``home/<name>`` from :meth:`from_env`, elsewhere after
    :meth:`with_storage`, one level down for a release other than the default after
    :meth:`for_release`."""

    home: Path
    landing: Path
    warehouse: Path
    quarantine: Path
    maps: Path
    release: str | None = None
    """``None`` for the default release, else the release whose folders these are."""

    @classmethod
    def from_env(
        cls, home: str | os.PathLike | None = None, landing: str | os.PathLike | None = None
    ) -> StateLayout:
        """Resolve the folders from arguments first, then ``GAIA_FLOWS_HOME``/``GAIA_FLOWS_LANDING``."""
        home_path = Path(home or os.environ.get("GAIA_FLOWS_HOME") or DEFAULT_HOME).expanduser().resolve()
        landing_path = landing or os.environ.get("GAIA_FLOWS_LANDING") or home_path / "landing"
        return cls(
            home=home_path,
            landing=Path(landing_path).expanduser().resolve(),
            warehouse=home_path / "warehouse",
            quarantine=home_path / "quarantine",
            maps=home_path / "maps",
        )

    def with_storage(self, storage: dict | None) -> StateLayout:
        """The data folders a profile's ``storage`` section names.

        ``mount`` is the shared file system's path on every host; a data folder left null lies
        under it (``<mount>/warehouse``...), one given explicitly must be an absolute path. With
        neither, the folder stays in the state folder. A landing area chosen already
        (``GAIA_FLOWS_LANDING`` or an argument) wins over the profile's.
        """
        storage = storage or {}
        mount = storage.get("mount")
        paths = {}
        for name in STORAGE_DIRS:
            value = storage.get(name)
            if value is not None and not str(value).startswith("/"):
                raise ValueError(
                    f"storage.{name} = {value!r}: give an absolute path on the shared file system (object stores are not supported)"
                )
            if value is None and mount:
                value = Path(mount) / name
            if name == "landing" and self.landing != self.home / "landing":
                value = None
            paths[name] = Path(value) if value is not None else getattr(self, name)
        return StateLayout(home=self.home, release=self.release, **paths)

    def for_release(self, release: str) -> StateLayout:
        """The data folders of ``release``: these folders for the default release, else the
        ``<release>/`` subfolder of each (landing, warehouse, quarantine, maps, hats)."""
        if release == DEFAULT_RELEASE or release == self.release:
            return self
        if self.release is not None:
            raise ValueError(f"{self.release!r}'s folders have no release {release!r} inside")
        return StateLayout(
            home=self.home,
            landing=self.landing / release,
            warehouse=self.warehouse / release,
            quarantine=self.quarantine / release,
            maps=self.maps / release,
            release=release,
        )

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
    def logs(self) -> Path:
        """Full Dagster logs of the command line's runs (``gaia-flows demo`` prints the path)."""
        return self.home / "logs"

    @property
    def hats(self) -> Path:
        """HATS collections for LSDB and other HATS readers, one per exported table::

        hats/<table>/                     symlink to one immutable version (see publish)
            collection.properties         primary catalogue and default margin
            <table>/                      the catalogue: properties, partition_info.csv,
                dataset/Norder=<k>/Dir=<d>/Npix=<n>.parquet, dataset/_metadata
            <table>_<margin>arcs/         the margin cache, same layout

        A release other than the default has its collections in ``hats/<release>/``.
        """
        return self.home / "hats" / self.release if self.release else self.home / "hats"

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

    def region_versions(self, table: str) -> dict[str, str]:
        """Published regions of a per-region table and the version each points at.

        A region directory is a symlink into ``<table>/.versions/`` that every publish
        replaces, so the link target identifies the exact content (see
        :func:`gaia_flows.warehouse.publish`).
        """
        root = self.table(table)
        if not root.exists():
            return {}
        out = {}
        for path in sorted(root.iterdir()):
            try:
                parse_region_key(path.name)
            except ValueError:
                continue
            if path.exists():
                out[path.name] = os.readlink(path) if path.is_symlink() else path.name
        return out

    def quarantine_dir(self, table: str, region: str) -> Path:
        return self.quarantine / table / region

    @property
    def staging_root(self) -> Path:
        """Scratch space on the same filesystem as the warehouse, so publishing is a rename."""
        return self.warehouse / "_staging"

    def staging_dir(self, table: str) -> Path:
        """A fresh staging path for one write of ``table`` (claimed through ``warehouse.claim_staging``)."""
        return self.staging_root / f"{table}-{uuid.uuid4().hex[:12]}"

    def ensure(self) -> StateLayout:
        for path in (
            self.landing,
            self.warehouse,
            self.quarantine,
            self.dagster_home,
            self.mlflow_dir,
            self.maps,
        ):
            path.mkdir(parents=True, exist_ok=True)
        return self
