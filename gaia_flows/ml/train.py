"""Training the Random Forest on the stored training set, tracked and registered in MLflow.

scikit-learn (``n_jobs=-1``) when the training set fits the driver comfortably, Spark ML
``RandomForestClassifier`` otherwise (:func:`gaia_flows.engine.classify.choose_engine`).
Either way the training table is read once, front to back.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from gaia_flows.engine import classify
from gaia_flows.layout import TRAINING_TABLE
from gaia_flows.ml import figures, registry
from gaia_flows.science import astrometric as astro
from gaia_flows.science.astrometric import FEATURES, GcnsCuts


@dataclass
class Fitted:
    """A fitted model with its hold-out rows, their probabilities, the MLflow datasets and timings."""

    model: classify.LoadedModel
    holdout: pd.DataFrame
    probability: np.ndarray
    train_dataset: object
    holdout_dataset: object
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class GateSettings:
    """How a new version is judged: the probability threshold and the promotion rule."""

    threshold: float = 0.5
    metric: str = "accuracy"
    tolerance: float = 0.0


@dataclass
class TrainingRun:
    """What one training run logged, registered and decided."""

    run_id: str
    experiment_id: str
    version: str
    gate: registry.GateDecision
    metrics: dict[str, float]
    timings: dict[str, float]
    forest_shape: dict
    importances: dict[str, float]
    holdout_rows: int
    roc_png: bytes
    digest: str


def table_digest(version_dir: Path) -> str:
    """Content digest of the training table's Parquet files (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(version_dir.glob("*.parquet")):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def run_params(
    params: classify.ForestParams, choice: classify.EngineChoice, threshold: float, manifest: dict
) -> dict:
    """Only the hyper-parameters and selection thresholds: an explicit list, never config dumps."""
    out = {f"rf_{k}": v for k, v in params.as_dict().items()}
    out.update(
        {
            "engine": choice.engine,
            "engine_estimated_mib": round(choice.estimated_bytes / 2**20, 1),
            "engine_budget_mib": round(choice.budget_bytes / 2**20, 1),
            "features": ",".join(FEATURES),
            "abs_features": ",".join(astro.ABS_FEATURES),
            "threshold": threshold,
            "holdout_fraction": manifest.get("holdout_fraction"),
            "split_seed": manifest.get("split_seed"),
        }
    )
    out.update({f"cut_{k}": v for k, v in (manifest.get("cuts") or {}).items()})
    return out


def read_training_frame(version_dir: Path) -> pd.DataFrame:
    """The whole training table, front to back, in source_id order (sequential IO)."""
    columns = ["source_id", "label", "holdout", *FEATURES]
    frame = pq.ParquetDataset(version_dir).read(columns=columns).to_pandas()
    return frame.sort_values("source_id", kind="stable").reset_index(drop=True)


def fit_sklearn(params: classify.ForestParams, version_dir: Path, digest: str) -> Fitted:
    """scikit-learn forest on the driver, from the training table read whole."""
    import mlflow as mlflow_lib

    timings = {}
    started = time.perf_counter()
    frame = read_training_frame(version_dir)
    timings["read_seconds"] = time.perf_counter() - started
    train, holdout = frame[~frame["holdout"]], frame[frame["holdout"]].reset_index(drop=True)
    train_ds = mlflow_lib.data.from_pandas(
        train, source=str(version_dir), name=TRAINING_TABLE, targets="label", digest=digest
    )
    holdout_ds = mlflow_lib.data.from_pandas(
        holdout, source=str(version_dir), name=f"{TRAINING_TABLE}-holdout", targets="label", digest=digest
    )
    started = time.perf_counter()
    model = classify.train_sklearn(train, params, n_jobs=-1)
    timings["fit_seconds"] = time.perf_counter() - started
    trained = classify.LoadedModel("sklearn", model)
    started = time.perf_counter()
    probability = trained.good_probability(holdout)
    timings["evaluate_seconds"] = time.perf_counter() - started
    return Fitted(trained, holdout, probability, train_ds, holdout_ds, timings)


def fit_spark(session, params: classify.ForestParams, version_dir: Path, digest: str) -> Fitted:
    """Spark ML forest over the training table, for sets larger than the driver holds."""
    import mlflow as mlflow_lib
    from pyspark.sql import functions as F

    timings = {}
    table = session.read.parquet(str(version_dir))
    train = table.where(~F.col("holdout"))
    holdout_sdf = table.where(F.col("holdout"))
    train_ds = mlflow_lib.data.from_spark(
        train, path=str(version_dir), name=TRAINING_TABLE, targets="label", digest=digest
    )
    holdout_ds = mlflow_lib.data.from_spark(
        holdout_sdf, path=str(version_dir), name=f"{TRAINING_TABLE}-holdout", targets="label", digest=digest
    )
    started = time.perf_counter()
    model = classify.train_spark(train, params)
    timings["fit_seconds"] = time.perf_counter() - started
    trained = classify.LoadedModel("spark", model)
    started = time.perf_counter()
    holdout = (
        holdout_sdf.select("source_id", "label", *FEATURES)
        .toPandas()
        .sort_values("source_id")
        .reset_index(drop=True)
    )
    probability = trained.good_probability(holdout, spark=session)
    timings["evaluate_seconds"] = time.perf_counter() - started
    return Fitted(trained, holdout, probability, train_ds, holdout_ds, timings)


def train_and_register(
    client,
    experiment_id: str,
    run_name: str,
    tags: dict[str, str],
    params: classify.ForestParams,
    choice: classify.EngineChoice,
    version_dir: Path,
    manifest: dict,
    gate: GateSettings,
    spark: Callable,
    model_name: str = registry.MODEL_NAME,
) -> TrainingRun:
    """One MLflow run: fit, log inputs, metrics, figures and the model, register a version,
    tag it, and move the ``champion`` alias if the gate promotes it.

    Parameters
    ----------
    client
        ``MlflowClient`` of the active tracking server (see ``MlflowResource.activate``).
    experiment_id, run_name, tags
        Where the run is logged and what it is called and tagged with.
    params
        The forest's hyper-parameters.
    choice
        Which engine fits (``"sklearn"`` or ``"spark"``) and why.
    version_dir
        The published training-table version, read once front to back.
    manifest
        That version's manifest (cuts, hold-out fraction, split seed).
    gate
        Threshold and promotion rule.
    spark
        Returns the Spark session; called only when an engine or the champion needs Spark.
    model_name
        The registered model the version joins (one per data release).

    Returns
    -------
    TrainingRun
        Run id, registered version, the gate's decision, metrics, timings and the ROC PNG.
    """
    import mlflow as mlflow_lib

    digest = table_digest(version_dir)
    session = spark() if choice.engine == "spark" else None
    with mlflow_lib.start_run(experiment_id=experiment_id, run_name=run_name, tags=tags) as run:
        mlflow_lib.log_params(run_params(params, choice, gate.threshold, manifest))
        fitted = (
            fit_sklearn(params, version_dir, digest)
            if choice.engine == "sklearn"
            else fit_spark(session, params, version_dir, digest)
        )
        mlflow_lib.log_input(fitted.train_dataset, context="training")
        mlflow_lib.log_input(fitted.holdout_dataset, context="evaluation")
        holdout, probability = fitted.holdout, fitted.probability
        metrics = astro.classification_metrics(holdout["label"], probability, gate.threshold)
        importances = fitted.model.feature_importances()

        roc = figures.roc_figure(holdout["label"], probability, metrics["roc_auc"])
        plots = {
            "plots/confusion_matrix.png": figures.confusion_figure(
                astro.confusion(holdout["label"], probability, gate.threshold)
            ),
            "plots/feature_importances.png": figures.importance_figure(importances),
            "plots/roc_curve.png": roc,
        }
        for name, figure in plots.items():
            mlflow_lib.log_figure(figure, name)
        mlflow_lib.log_dict(importances, "feature_importances.json")

        timings = dict(fitted.timings)
        started = time.perf_counter()
        info = registry.log_model(fitted.model, holdout, probability, model_name)
        timings["log_model_seconds"] = time.perf_counter() - started
        mlflow_lib.log_metrics(metrics, model_id=info.model_id, dataset=fitted.holdout_dataset)
        mlflow_lib.log_metrics({k: round(v, 3) for k, v in timings.items()})
        shape = fitted.model.describe()
        mlflow_lib.log_metrics({"forest_nodes": shape["nodes"], "forest_max_depth": shape["max_depth"]})
        version = str(info.registered_model_version)

        decision = registry.champion_gate(
            client, version, metrics, holdout, spark, gate.threshold, gate.metric, gate.tolerance, model_name
        )
        population_min = manifest.get("cuts", {}).get("parallax_min_mas", GcnsCuts().parallax_min_mas)
        version_tags = {
            "population_parallax_min_mas": str(population_min),
            "engine": choice.engine,
            "training_table_digest": digest,
            "holdout_" + gate.metric: f"{metrics[gate.metric]:.6f}",
            "champion_gate": "promoted" if decision.promoted else "kept_previous_champion",
        }
        for key, value in version_tags.items():
            client.set_model_version_tag(model_name, version, key, value)
        if decision.promoted:
            client.set_registered_model_alias(model_name, registry.CHAMPION, version)
        mlflow_lib.set_tags({"champion_gate": version_tags["champion_gate"]})
        run_id = run.info.run_id
    return TrainingRun(
        run_id=run_id,
        experiment_id=experiment_id,
        version=version,
        gate=decision,
        metrics=metrics,
        timings=timings,
        forest_shape=shape,
        importances=importances,
        holdout_rows=len(holdout),
        roc_png=figures.figure_png(roc),
        digest=digest,
    )
