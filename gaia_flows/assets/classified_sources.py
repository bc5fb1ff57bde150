"""The champion model applied to every sky region: ``classified_sources``.

Per region ``source_id, probability, label`` (label 1 = good solution, probability = P(good)),
scored inside Spark by :mod:`gaia_flows.ml.scoring` with
``models:/astrometric-quality-rf@champion`` (resolved once per run to a fixed version); a
release other than DR3 is scored with its own model, ``astrometric-quality-rf-<release>``.
"""

import time
from typing import Literal

import numpy as np
from dagster import (
    AssetExecutionContext,
    AutomationCondition,
    BackfillPolicy,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from gaia_flows.assets.classifier import astrometric_classifier
from gaia_flows.assets.training_set import GROUP
from gaia_flows.engine import classify
from gaia_flows.engine.metrics import run_figures, run_job_group, task_records
from gaia_flows.layout import CLASSIFIED_TABLE, SOURCE_TABLE
from gaia_flows.maps import preview_markdown, render_healpix
from gaia_flows.ml import scoring
from gaia_flows.ml.registry import NoChampionError, resolve_model
from gaia_flows.partitions import sky_regions
from gaia_flows.releases import release_of
from gaia_flows.resources.mlflow import MlflowResource
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource
from gaia_flows.science.astrometric import FeatureError
from gaia_flows.science.healpix import REGION_LEVEL


class ClassifyConfig(Config):
    population: Literal["candidates", "all_5p_6p"] = "candidates"
    """``candidates``: the |parallax| selection the training set was drawn from;
    ``all_5p_6p``: every source with a 5- or 6-parameter solution."""
    parallax_min_mas: float | None = None
    """``None``: the threshold the champion was trained with (a tag on its model version)."""
    threshold: float = 0.5
    model_uri: str | None = None
    """``None``: the champion of the release's model (``models:/astrometric-quality-rf@champion``
    for DR3)."""
    sky_map_level: int = Field(default=5, ge=REGION_LEVEL, le=10)


@asset(
    partitions_def=sky_regions,
    backfill_policy=BackfillPolicy.single_run(),
    deps=[SOURCE_TABLE, astrometric_classifier],
    group_name=GROUP,
    kinds={"spark", "parquet"},
    automation_condition=AutomationCondition.eager(),
)
def classified_sources(
    context: AssetExecutionContext,
    config: ClassifyConfig,
    spark: SparkResource,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> MaterializeResult:
    """The champion model applied inside Spark to each region's candidates (or all 5/6p sources).

    Output per region: ``source_id``, ``probability`` (of a good solution) and ``label`` (1 good,
    0 bad). The all-sky map of the bad fraction should trace crowded fields: the Galactic plane,
    the bulge and the Magellanic Clouds.
    """
    release = release_of(context)
    layout = release.layout(storage.layout)
    session = spark.session()
    job_group = run_job_group(CLASSIFIED_TABLE, context.run_id)
    session.sparkContext.setJobGroup(
        job_group, "classify sources with the champion model", interruptOnCancel=True
    )
    records = task_records(session)
    with mlflow.activate() as client:
        try:
            uri, version, population_min = resolve_model(client, config.model_uri, release.model_name)
        except NoChampionError as exc:
            raise Failure(str(exc)) from exc
        loaded = classify.load_model(uri, version)
    parallax_min = config.parallax_min_mas if config.parallax_min_mas is not None else population_min
    regions = list(context.partition_keys)
    started = time.perf_counter()
    parallax_cut = parallax_min if config.population == "candidates" else None
    manifest = {
        "model": uri,
        "model_version": version,
        "population": config.population,
        "parallax_min_mas": parallax_min,
        "threshold": config.threshold,
    }
    try:
        paths = scoring.classify_regions(
            session, layout, loaded, regions, config.threshold, parallax_cut, manifest, records
        )
    except FeatureError as exc:
        raise Failure(str(exc)) from exc
    seconds = time.perf_counter() - started

    n, bad = scoring.label_counts(session, layout, config.sky_map_level)
    counts = {region: scoring.region_sum((n, bad), region, config.sky_map_level) for region in regions}
    for region, path in paths.items():
        rows, flagged = counts[region]
        context.add_asset_metadata(
            {
                "rows": rows,
                "flagged_bad": flagged,
                "fraction_bad": MetadataValue.float(flagged / rows if rows else 0.0),
                "path": MetadataValue.path(str(path)),
            },
            partition_key=region,
        )
    rows_run = sum(rows for rows, _ in counts.values())
    bad_run = sum(flagged for _, flagged in counts.values())
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(n > 0, bad / n, np.nan)
    sky_png = render_healpix(
        fraction,
        layout.maps / f"{CLASSIFIED_TABLE}_bad_fraction.png",
        title=f"fraction flagged bad, {int(n.sum()):,} classified sources (level {config.sky_map_level}, Galactic)",
        lo=0.0,
        hi=1.0,
        coord=["C", "G"],
    )
    metadata = {
        "release": release.name,
        "model": uri,
        "model_version": version or "",
        "population": config.population,
        "parallax_min_mas": parallax_min,
        "regions": len(regions),
        "run_rows": rows_run,
        "run_flagged_bad": bad_run,
        "run_fraction_bad": MetadataValue.float(bad_run / rows_run if rows_run else 0.0),
        "fraction_bad_all_regions": MetadataValue.float(float(bad.sum() / n.sum()) if n.sum() else 0.0),
        "rows_per_second": round(rows_run / max(seconds, 1e-9)),
        "wall_seconds": round(seconds, 2),
        "bad_fraction_map": MetadataValue.md(
            preview_markdown(
                sky_png.read_bytes(),
                "Fraction flagged bad in every classified region; crowded fields (Galactic plane, bulge, Magellanic Clouds) should stand out",
            )
        ),
        "bad_fraction_map_png": MetadataValue.path(str(sky_png)),
        **run_figures(session, job_group, records.value),
    }
    return MaterializeResult(metadata=metadata)
