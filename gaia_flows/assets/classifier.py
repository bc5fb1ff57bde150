"""The astrometric-quality Random Forest, tracked in MLflow and registered as
``astrometric-quality-rf`` (``astrometric-quality-rf-<release>`` for a release other than DR3).

scikit-learn on the driver or Spark ML, by a size rule; the ``champion`` alias moves only when
the new version is not worse on the same hold-out (check ``not_worse_than_champion`` shows both
numbers). Training, logging and the gate are :mod:`gaia_flows.ml.train` and
:mod:`gaia_flows.ml.registry`.
"""

from typing import Literal

import pyarrow.parquet as pq
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from gaia_flows.assets.training_set import GROUP, astrometric_training_set
from gaia_flows.engine import classify
from gaia_flows.layout import TRAINING_TABLE
from gaia_flows.maps import preview_markdown
from gaia_flows.ml import figures
from gaia_flows.ml.train import GateSettings, train_and_register
from gaia_flows.releases import release_of
from gaia_flows.resources.mlflow import MlflowResource
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource
from gaia_flows.warehouse import version_manifest

_DEFAULT_FOREST = classify.ForestParams()


class ForestConfig(Config):
    """Random Forest hyper-parameters as run config: the fields of
    :class:`~gaia_flows.engine.classify.ForestParams` a run may set, with its defaults."""

    n_estimators: int = _DEFAULT_FOREST.n_estimators
    max_depth: int | None = _DEFAULT_FOREST.max_depth
    min_samples_leaf: int = _DEFAULT_FOREST.min_samples_leaf
    max_features: str = _DEFAULT_FOREST.max_features
    criterion: str = _DEFAULT_FOREST.criterion
    random_state: int = _DEFAULT_FOREST.random_state

    def to_params(self) -> classify.ForestParams:
        return classify.ForestParams(**{name: getattr(self, name) for name in ForestConfig.model_fields})


class ClassifierConfig(Config):
    """Random Forest hyper-parameters, engine choice and the champion gate."""

    forest: ForestConfig = ForestConfig()
    engine: Literal["auto", "sklearn", "spark"] = "auto"
    driver_memory_fraction: float = 0.25
    driver_memory_gb: float | None = None
    """Driver memory the size rule may assume; ``None`` = available RAM (cgroup-capped)."""
    threshold: float = 0.5
    promotion_metric: Literal["accuracy", "f1", "roc_auc", "precision", "recall"] = "accuracy"
    promotion_tolerance: float = 0.0


@asset(
    deps=[astrometric_training_set],
    group_name=GROUP,
    kinds={"scikitlearn", "mlflow"},
    check_specs=[
        AssetCheckSpec(
            "not_worse_than_champion",
            asset="astrometric_classifier",
            description="The new model version is not worse than the current champion on the same hold-out; only then does the `champion` alias move.",
        )
    ],
)
def astrometric_classifier(
    context: AssetExecutionContext,
    config: ClassifierConfig,
    spark: SparkResource,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> MaterializeResult:
    """Random Forest on the 16 GCNS features, tracked and registered in MLflow
    (:func:`gaia_flows.ml.train.train_and_register`)."""
    release = release_of(context)
    model_name = release.model_name
    table_path = release.layout(storage.layout).table(TRAINING_TABLE)
    if not table_path.exists():
        raise Failure(f"{TRAINING_TABLE} is not materialised ({table_path}); materialise it first")
    version_dir = table_path.resolve()
    manifest = version_manifest(version_dir)
    rows = int(manifest.get("rows") or pq.ParquetDataset(version_dir).read(columns=["source_id"]).num_rows)
    memory = (
        int(config.driver_memory_gb * 2**30) if config.driver_memory_gb else classify.driver_memory_bytes()
    )
    choice = classify.choose_engine(rows, memory, config.driver_memory_fraction, config.engine)
    context.log.info(f"engine {choice.engine}: {choice.reason}")

    with mlflow.activate() as client:
        experiment_id = mlflow.experiment_id(client)
        tags = {
            "dagster_run_id": context.run_id,
            "dagster_asset": context.asset_key.to_user_string(),
            "release": release.name,
            "engine": choice.engine,
            "training_table": str(version_dir),
        }
        gate = GateSettings(config.threshold, config.promotion_metric, config.promotion_tolerance)
        run = train_and_register(
            client,
            experiment_id,
            f"{model_name}-{context.run_id[:8]}",
            tags,
            config.forest.to_params(),
            choice,
            version_dir,
            manifest,
            gate,
            spark.session,
            model_name,
        )

    decision = run.gate
    metadata = {
        "mlflow_run": MetadataValue.url(mlflow.run_url(experiment_id, run.run_id)),
        "mlflow_run_id": run.run_id,
        "release": release.name,
        "model": f"models:/{model_name}/{run.version}",
        "model_version": MetadataValue.url(mlflow.model_version_url(model_name, run.version)),
        "champion_version": decision.champion_after,
        "promoted": decision.promoted,
        "engine": choice.engine,
        "engine_reason": choice.reason,
        "training_rows": int(rows - run.holdout_rows),
        "holdout_rows": run.holdout_rows,
        "training_table_digest": run.digest,
        **{
            f"holdout_{k}": MetadataValue.float(float(v))
            for k, v in run.metrics.items()
            if k != "holdout_rows"
        },
        **{k: round(v, 3) for k, v in run.timings.items()},
        "forest": MetadataValue.json(run.forest_shape),
        "feature_importances": MetadataValue.md(figures.importance_table(run.importances)),
        "roc_curve": MetadataValue.md(preview_markdown(run.roc_png, "ROC curve on the hold-out")),
        **{f"mlflow_{k}": v for k, v in mlflow.describe().items()},
    }
    check = AssetCheckResult(
        check_name="not_worse_than_champion",
        passed=decision.promoted,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "metric": config.promotion_metric,
            "tolerance": config.promotion_tolerance,
            "new_version": run.version,
            "new_value": MetadataValue.float(decision.new_value),
            "champion_version": decision.champion_before or "none",
            "champion_value": MetadataValue.float(decision.champion_value)
            if decision.champion_value is not None
            else MetadataValue.text("no champion yet"),
            "champion_after": decision.champion_after,
        },
    )
    return MaterializeResult(metadata=metadata, check_results=[check])
