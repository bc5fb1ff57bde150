"""The GCNS training set: selected once in Spark from every published region, stored contiguously.

Training then reads this one table front to back; no part of the selection is re-read at
random while a model is fitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gaia_flows.engine.metrics import TaskClock
from gaia_flows.engine.tables import read_regions, write_table
from gaia_flows.layout import SOURCE_TABLE, TRAINING_TABLE, StateLayout
from gaia_flows.science import astrometric as astro
from gaia_flows.science.astrometric import FEATURES, FeatureError, GcnsCuts
from gaia_flows.warehouse import published_regions

_DOUBLES = set(FEATURES) | {
    "ra",
    "dec",
    "l",
    "b",
    "parallax",
    "phot_g_mean_mag",
    "bp_rp",
    "phot_bp_rp_excess_factor",
}


@dataclass(frozen=True)
class TrainingSet:
    """What a selection published: class sizes, the cut flow and where the table is."""

    good: int
    bad: int
    bad_available: int
    cut_flow: dict[str, int]
    files: int
    path: Path

    @property
    def rows(self) -> int:
        return self.good + self.bad


def select_training_set(
    session,
    layout: StateLayout,
    cuts: GcnsCuts,
    holdout_fraction: float,
    split_seed: int,
    target_file_mb: int,
    records=None,
) -> TrainingSet:
    """Label every candidate of the published ``gaia_source`` regions and publish the training set.

    Good: parallax > min, \\|b\\| > min, outside the LMC/SMC, BP/RP excess consistent (Riello et
    al. 2021, n sigma). Bad: parallax < -min, the rows with the smallest ``random_index``,
    ``bad_per_good`` times as many as the good set (or all of them if fewer). A ``holdout``
    column (hash of source_id and ``split_seed``) fixes the evaluation rows. ``records``
    (``engine.metrics.task_records``), when given, receives one record per labelling task: rows,
    CPU against wall (Spark reads the files, so its ``inputBytes`` counts them).

    Raises
    ------
    FeatureError
        ``gaia_source`` lacks a column the selection needs.
    """
    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    source = read_regions(session, layout, SOURCE_TABLE)
    missing = [c for c in astro.TRAINING_COLUMNS if c not in source.columns]
    if missing:
        raise FeatureError(f"{SOURCE_TABLE} lacks column(s) the selection needs: {', '.join(missing)}")
    candidates = source.select(
        *[F.col(c).cast("double").alias(c) if c in _DOUBLES else F.col(c) for c in astro.TRAINING_COLUMNS]
    ).where(
        (F.abs(F.col("parallax")) > F.lit(cuts.parallax_min_mas))
        & F.col("astrometric_params_solved").isin(*astro.FIVE_OR_SIX_PARAMETER)
    )
    schema = T.StructType(
        [
            *candidates.schema.fields,
            T.StructField("selection", T.StringType()),
            T.StructField("label", T.ByteType()),
            T.StructField("holdout", T.BooleanType()),
        ]
    )

    def label_batches(batches):
        clock, rows = TaskClock(), 0
        for batch in batches:
            rows += len(batch)
            yield astro.label_batch(batch, cuts, holdout_fraction, split_seed)
        if records is not None:
            records.add([clock.record(rows=rows)])

    labelled = candidates.mapInPandas(label_batches, schema).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        cut_flow = {
            row["selection"]: int(row["count"]) for row in labelled.groupBy("selection").count().collect()
        }
        n_good = cut_flow.get("good", 0)
        n_bad_available = cut_flow.get("bad", 0)
        n_bad = min(n_bad_available, int(round(n_good * cuts.bad_per_good)))
        bad = labelled.where(F.col("label") == astro.BAD).orderBy("random_index", "source_id").limit(n_bad)
        selected = labelled.where(F.col("label") == astro.GOOD).unionByName(bad).drop("selection")
        rows = n_good + n_bad
        files = max(1, int(np.ceil(rows * 8 * len(schema.fields) / (target_file_mb << 20))))
        manifest = {
            "rows": rows,
            "good": n_good,
            "bad": n_bad,
            "bad_available": n_bad_available,
            "cuts": cuts.as_dict(),
            "holdout_fraction": holdout_fraction,
            "split_seed": split_seed,
            "cut_flow": cut_flow,
            "source_regions": published_regions(layout, SOURCE_TABLE),
        }
        path = write_table(selected, layout, TRAINING_TABLE, files=files, manifest=manifest)
    finally:
        labelled.unpersist()
    return TrainingSet(
        good=n_good, bad=n_bad, bad_available=n_bad_available, cut_flow=cut_flow, files=files, path=path
    )
