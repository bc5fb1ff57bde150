"""The GCNS training set (Smart et al. 2021): selected once from every published region and
stored as its own contiguous table, so training reads it front to back and nothing else.

Every threshold is run config; the selection is :mod:`gaia_flows.ml.training_set`.
"""

import time
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
from dagster import (
    AssetCheckResult,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from gaia_flows.engine.metrics import run_figures, run_job_group, task_records
from gaia_flows.layout import SOURCE_TABLE, TRAINING_TABLE
from gaia_flows.maps import preview_markdown
from gaia_flows.ml import figures
from gaia_flows.ml.training_set import select_training_set
from gaia_flows.releases import release_of
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource
from gaia_flows.science.astrometric import FeatureError, GcnsCuts
from gaia_flows.science.healpix import REGION_LEVEL

GROUP = "astrometric_quality"
_DEFAULT_CUTS = GcnsCuts()


class GcnsCutsConfig(Config):
    """The GCNS selection thresholds (Smart et al. 2021) as run config: the fields of
    :class:`~gaia_flows.science.astrometric.GcnsCuts`, with its defaults."""

    parallax_min_mas: float = _DEFAULT_CUTS.parallax_min_mas
    abs_b_min_deg: float = _DEFAULT_CUTS.abs_b_min_deg
    exclude_magellanic_clouds: bool = _DEFAULT_CUTS.exclude_magellanic_clouds
    magellanic_regions: Literal["seed_boxes", "circles"] = _DEFAULT_CUTS.magellanic_regions
    """``seed_boxes``: fixed ra/dec boxes around the Clouds; ``circles``: cones of
    lmc/smc_radius_deg (see :data:`gaia_flows.science.astrometric.MAGELLANIC_REGIONS`)."""
    lmc_ra_deg: float = _DEFAULT_CUTS.lmc_ra_deg
    lmc_dec_deg: float = _DEFAULT_CUTS.lmc_dec_deg
    lmc_radius_deg: float = _DEFAULT_CUTS.lmc_radius_deg
    smc_ra_deg: float = _DEFAULT_CUTS.smc_ra_deg
    smc_dec_deg: float = _DEFAULT_CUTS.smc_dec_deg
    smc_radius_deg: float = _DEFAULT_CUTS.smc_radius_deg
    excess_n_sigma: float = _DEFAULT_CUTS.excess_n_sigma
    bad_per_good: float = _DEFAULT_CUTS.bad_per_good

    def to_cuts(self) -> GcnsCuts:
        return GcnsCuts(**{name: getattr(self, name) for name in GcnsCuts.__dataclass_fields__})


class TrainingSetConfig(Config):
    """GCNS selection thresholds and how the set is split and stored."""

    cuts: GcnsCutsConfig = GcnsCutsConfig()
    holdout_fraction: float = 0.33
    split_seed: int = 42
    target_file_mb: int = 128
    sky_map_level: int = Field(default=5, ge=REGION_LEVEL, le=10)


@asset(
    deps=[SOURCE_TABLE],
    group_name=GROUP,
    kinds={"spark", "parquet"},
    check_specs=[
        AssetCheckSpec(
            "both_classes_balanced",
            asset=TRAINING_TABLE,
            description="Good and bad sets are non-empty and bad = good x bad_per_good (or all bad rows if fewer).",
        )
    ],
)
def astrometric_training_set(
    context: AssetExecutionContext, config: TrainingSetConfig, spark: SparkResource, storage: StorageResource
) -> MaterializeResult:
    """GCNS training set, selected once from every published region and stored contiguously
    (:func:`gaia_flows.ml.training_set.select_training_set` gives the rules)."""
    release = release_of(context)
    layout = release.layout(storage.layout)
    session = spark.session()
    job_group = run_job_group(TRAINING_TABLE, context.run_id)
    session.sparkContext.setJobGroup(job_group, "GCNS training-set selection", interruptOnCancel=True)
    records = task_records(session)
    cuts = config.cuts.to_cuts()
    started = time.perf_counter()
    try:
        selected = select_training_set(
            session, layout, cuts, config.holdout_fraction, config.split_seed, config.target_file_mb, records
        )
    except FeatureError as exc:
        raise Failure(str(exc)) from exc
    seconds = time.perf_counter() - started

    table = pq.read_table(layout.table(TRAINING_TABLE), columns=["source_id", "label", "holdout"])
    labels = table["label"].to_numpy()
    holdout_rows = int(np.asarray(table["holdout"]).sum())
    sky_maps = figures.training_sky_pngs(layout, table["source_id"].to_numpy(), labels, config.sky_map_level)

    n_good, n_bad, n_bad_available = selected.good, selected.bad, selected.bad_available
    balanced = (
        n_good > 0 and n_bad > 0 and n_bad == min(n_bad_available, int(round(n_good * cuts.bad_per_good)))
    )
    metadata = {
        "release": release.name,
        "rows": selected.rows,
        "good": n_good,
        "bad": n_bad,
        "bad_available": n_bad_available,
        "holdout_rows": holdout_rows,
        "cuts": MetadataValue.json(cuts.as_dict()),
        "cut_flow": MetadataValue.json(dict(sorted(selected.cut_flow.items()))),
        **{
            f"sky_{name}": MetadataValue.md(
                preview_markdown(
                    png,
                    f"Training set, {name} solutions per HEALPix level-{config.sky_map_level} pixel (Galactic Mollweide)",
                )
            )
            for name, png in sky_maps.items()
        },
        "path": MetadataValue.path(str(selected.path)),
        "parquet_files": selected.files,
        "wall_seconds": round(seconds, 2),
        **run_figures(session, job_group, records.value),
    }
    check = AssetCheckResult(
        check_name="both_classes_balanced",
        passed=bool(balanced),
        metadata={
            "good": n_good,
            "bad": n_bad,
            "bad_available": n_bad_available,
            "bad_per_good": cuts.bad_per_good,
        },
    )
    return MaterializeResult(metadata=metadata, check_results=[check])
