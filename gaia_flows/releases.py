"""Gaia data releases: which ones the platform holds, and what each one's assets are called.

A release is a first-class dimension of the asset graph, beside the sky region:

- the **default release** (:data:`~gaia_flows.layout.DEFAULT_RELEASE`, DR3) owns the plain
  asset keys (``gaia_source``, ``pm_stats``...), the plain data folders (``landing/``,
  ``warehouse/``...) and the model ``astrometric-quality-rf``;
- **every further release** gets the same asset graph under a key prefix (``dr4/gaia_source``,
  ``dr4/pm_stats``, ... checks included), partitioned by the same sky regions (``hpx1-07``),
  in its own groups (``dr4_catalogue``...), reading ``landing/dr4/`` and writing
  ``warehouse/dr4/``, ``quarantine/dr4/``, ``maps/dr4/`` and ``hats/dr4/``
  (:meth:`gaia_flows.layout.StateLayout.for_release`), with its own registered model
  ``astrometric-quality-rf-dr4``.

So "partitions keyed by release and sky region" are release-prefixed assets with sky-region
partitions: a release's schema may differ (its own contract, so its own Parquet columns), its
runs and backfills never select another release's partitions, and adding one never rewrites a
DR3 file.

Adding a release (DR4 when it is published):

1. write its contract, ``data_contracts/gaia_source_dr4.yaml`` (copy the DR3 one and edit the
   columns), which ingestion enforces;
2. add ``Release("dr4")`` to :data:`RELEASES`;
3. put its bulk files in ``<home>/landing/dr4/``: ``landing_files_sensor`` starts the runs, or
   ``dagster asset materialize -m gaia_flows.definitions --select 'dr4/gaia_source' --partition hpx1-07``.

Every asset finds its release from its own key (:func:`release_of`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dagster import AssetCheckExecutionContext, AssetExecutionContext, AssetKey

from gaia_flows.contracts import load_contract, load_contract_file
from gaia_flows.layout import (
    CLASSIFIED_TABLE,
    DEFAULT_RELEASE,
    MAPS_TABLE,
    SOURCE_TABLE,
    STATS_TABLE,
    TRAINING_TABLE,
    StateLayout,
)
from gaia_flows.ml.registry import MODEL_NAME
from gaia_flows.science.contract import TableContract

_RESERVED = {SOURCE_TABLE, STATS_TABLE, MAPS_TABLE, TRAINING_TABLE, CLASSIFIED_TABLE, "truth"}
"""Names already used inside the data folders a release's subfolder would sit beside."""


@dataclass(frozen=True)
class Release:
    """One Gaia data release: its name, its ``gaia_source`` contract and the names derived
    from them."""

    name: str
    contract_path: Path | None = None
    """The ``gaia_source`` contract; ``None``: ``data_contracts/gaia_source_<name>.yaml``."""

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9]*", self.name) or self.name in _RESERVED:
            raise ValueError(
                f"release name {self.name!r}: use lower-case letters and digits (e.g. 'dr4'), "
                f"none of {sorted(_RESERVED)}"
            )

    @property
    def is_default(self) -> bool:
        return self.name == DEFAULT_RELEASE

    @property
    def key_prefix(self) -> list[str]:
        """What precedes every asset key of this release: nothing for the default release."""
        return [] if self.is_default else [self.name]

    def key(self, name: str) -> AssetKey:
        return AssetKey([*self.key_prefix, name])

    def group(self, group: str) -> str:
        return group if self.is_default else f"{self.name}_{group}"

    @property
    def model_name(self) -> str:
        """The registered MLflow model trained on this release's rows."""
        return MODEL_NAME if self.is_default else f"{MODEL_NAME}-{self.name}"

    def layout(self, base: StateLayout) -> StateLayout:
        """This release's data folders inside the state folder ``base``."""
        return base.for_release(self.name)

    def contract(self) -> TableContract:
        """This release's ``gaia_source`` contract."""
        if self.contract_path is not None:
            return load_contract_file(Path(self.contract_path), SOURCE_TABLE)
        return load_contract(SOURCE_TABLE, release=self.name)


RELEASES: dict[str, Release] = {release.name: release for release in (Release(DEFAULT_RELEASE),)}
"""Every release the platform holds, the default one first."""


def release_named(name: str) -> Release:
    try:
        return RELEASES[name]
    except KeyError:
        raise KeyError(f"unknown data release {name!r} (known: {', '.join(RELEASES)})") from None


def release_of_key(key: AssetKey) -> Release:
    """The release an asset key belongs to: its prefix, or the default release for a plain key."""
    return release_named(key.path[0]) if len(key.path) > 1 else RELEASES[DEFAULT_RELEASE]


def release_of(context: AssetExecutionContext | AssetCheckExecutionContext) -> Release:
    """The release of the asset being materialized, or checked, read from its key."""
    if isinstance(context, AssetCheckExecutionContext):
        return release_of_key(context.check_specs[0].asset_key)
    return release_of_key(context.asset_key)
