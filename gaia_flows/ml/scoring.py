"""Applying a registered model to sky regions inside Spark, and the per-pixel label counts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from gaia_flows.engine import classify
from gaia_flows.engine.tables import read_regions, write_regions
from gaia_flows.layout import CLASSIFIED_TABLE, SOURCE_TABLE, StateLayout
from gaia_flows.science import astrometric as astro
from gaia_flows.science.astrometric import FeatureError
from gaia_flows.science.healpix import REGION_LEVEL, npix, parse_region_key, source_id_shift
from gaia_flows.warehouse import footer_rows


def classify_regions(
    session,
    layout: StateLayout,
    loaded: classify.LoadedModel,
    regions: list[str],
    threshold: float,
    parallax_cut: float | None,
    manifest: dict,
    records=None,
) -> dict[str, Path]:
    """Score each region's sources (``parallax_cut``: only \\|parallax\\| above it) and publish
    ``classified_sources`` per region: ``source_id``, ``probability`` (of a good solution) and
    ``label`` (1 good, 0 bad). ``records``: see :func:`~gaia_flows.engine.classify.score_files`.

    Raises
    ------
    FeatureError
        A feature column is missing or entirely null, whether found on the driver or in a task.
    """
    from pyspark import StorageLevel
    from pyspark.errors import PythonException

    inputs = [path for region in regions for path in layout.region_files(SOURCE_TABLE, region)]
    files = classify.files_for_rows(footer_rows(inputs))
    if loaded.flavor == "sklearn":  # Python tasks read the region files (classify.score_files says why)
        scored = classify.score_files(session, inputs, loaded, threshold, parallax_cut, records)
    else:
        selected = classify.population_filter(parallax_cut).spark
        scored = classify.score(
            read_regions(session, layout, SOURCE_TABLE, regions).where(selected), loaded, threshold
        )
    # Cached so the range partitioner's sampling pass and the write share one scoring pass.
    scored = scored.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        return write_regions(scored, layout, CLASSIFIED_TABLE, regions, files=files, manifest=manifest)
    except PythonException as exc:  # a FeatureError raised in a Spark task arrives wrapped
        inner = classify.unwrap_feature_error(exc)
        if inner is not None:
            raise FeatureError(str(inner)) from exc
        raise
    finally:
        scored.unpersist()


def label_counts(session, layout: StateLayout, level: int) -> tuple[np.ndarray, np.ndarray]:
    """(sources, flagged bad) per nested pixel at ``level`` over every classified region."""
    from pyspark.sql import functions as F

    table = read_regions(session, layout, CLASSIFIED_TABLE)
    pixel = F.shiftright(F.col("source_id"), source_id_shift(level)).alias("pixel")
    stats = (
        table.groupBy(pixel)
        .agg(F.count(F.lit(1)).alias("n"), F.sum((F.col("label") == astro.BAD).cast("long")).alias("bad"))
        .toPandas()
    )
    n, bad = np.zeros(npix(level)), np.zeros(npix(level))
    n[stats["pixel"].to_numpy()] = stats["n"].to_numpy()
    bad[stats["pixel"].to_numpy()] = stats["bad"].to_numpy()
    return n, bad


def region_sum(maps: tuple[np.ndarray, ...], region: str, level: int) -> tuple[int, ...]:
    """Sums of nested-pixel maps at ``level`` over one sky region (a contiguous pixel range)."""
    pixel = parse_region_key(region)[1]
    shift = 2 * (level - REGION_LEVEL)
    return tuple(int(m[pixel << shift : (pixel + 1) << shift].sum()) for m in maps)
