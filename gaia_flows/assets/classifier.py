"""Good vs spurious astrometric solutions: training set, Random Forest in MLflow, classification.

The seed's second flagship workload (GCNS, Smart et al. 2021). Its lesson shapes the graph:
its later training runs were 4.4x slower than the first because partially cached selections
turned training IO into random access. Here the selection is materialised *once* as its own
contiguous table (``astrometric_training_set``), training reads that table sequentially and
nothing else, and classification maps the registered model over each sky region inside Spark.

- ``astrometric_training_set``: the GCNS selection (every threshold is run config).
- ``astrometric_classifier``: Random Forest (scikit-learn on the driver or Spark ML, by a size
  rule), tracked in MLflow, registered as ``astrometric-quality-rf``; the ``champion`` alias
  moves only when the new version is not worse on the same hold-out (check
  ``not_worse_than_champion`` shows both numbers).
- ``classified_sources`` (per sky region): ``models:/astrometric-quality-rf@champion`` applied
  to the region's candidates, ``source_id, probability, label`` (label 1 = good solution,
  probability = P(good)).
"""

import hashlib
import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from pydantic import Field
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    BackfillPolicy,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from gaia_flows.engine import classify
from gaia_flows.engine.metrics import stage_io
from gaia_flows.partitions import sky_regions
from gaia_flows.resources.mlflow import MlflowResource
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource
from gaia_flows.science import astrometric as astro
from gaia_flows.science.astrometric import FEATURES, FeatureError, GcnsCuts
from gaia_flows.maps import preview_markdown, render_healpix
from gaia_flows.science.healpix import REGION_LEVEL, npix, parse_region_key, source_id_shift
from gaia_flows.tables import footer_rows, published_regions, read_regions, write_regions, write_table

SOURCE_TABLE = "gaia_source"
TRAINING_TABLE = "astrometric_training_set"
CLASSIFIED_TABLE = "classified_sources"
MODEL_NAME = "astrometric-quality-rf"
CHAMPION = "champion"
GROUP = "astrometric_quality"
_DEFAULT_CUTS = GcnsCuts()
_DEFAULT_FOREST = classify.ForestParams()


# --- configuration ---------------------------------------------------------------------------------


class TrainingSetConfig(Config):
    """GCNS selection thresholds (Smart et al. 2021; defaults as the seed used them)."""

    parallax_min_mas: float = _DEFAULT_CUTS.parallax_min_mas
    abs_b_min_deg: float = _DEFAULT_CUTS.abs_b_min_deg
    exclude_magellanic_clouds: bool = _DEFAULT_CUTS.exclude_magellanic_clouds
    lmc_ra_deg: float = _DEFAULT_CUTS.lmc_ra_deg
    lmc_dec_deg: float = _DEFAULT_CUTS.lmc_dec_deg
    lmc_radius_deg: float = _DEFAULT_CUTS.lmc_radius_deg
    smc_ra_deg: float = _DEFAULT_CUTS.smc_ra_deg
    smc_dec_deg: float = _DEFAULT_CUTS.smc_dec_deg
    smc_radius_deg: float = _DEFAULT_CUTS.smc_radius_deg
    excess_n_sigma: float = _DEFAULT_CUTS.excess_n_sigma
    bad_per_good: float = _DEFAULT_CUTS.bad_per_good
    holdout_fraction: float = 0.33
    split_seed: int = 42
    target_file_mb: int = 128
    sky_map_level: int = Field(default=5, ge=REGION_LEVEL, le=10)

    def cuts(self) -> GcnsCuts:
        return GcnsCuts(**{name: getattr(self, name) for name in GcnsCuts.__dataclass_fields__})


class ClassifierConfig(Config):
    """Random Forest hyper-parameters, engine choice and the champion gate."""

    n_estimators: int = _DEFAULT_FOREST.n_estimators
    max_depth: int | None = _DEFAULT_FOREST.max_depth
    min_samples_leaf: int = _DEFAULT_FOREST.min_samples_leaf
    max_features: str = _DEFAULT_FOREST.max_features
    criterion: str = _DEFAULT_FOREST.criterion
    random_state: int = _DEFAULT_FOREST.random_state
    engine: Literal["auto", "sklearn", "spark"] = "auto"
    driver_memory_fraction: float = 0.25
    driver_memory_gb: float | None = None
    """Driver memory the size rule may assume; ``None`` = available RAM (cgroup-capped)."""
    threshold: float = 0.5
    promotion_metric: Literal["accuracy", "f1", "roc_auc", "precision", "recall"] = "accuracy"
    promotion_tolerance: float = 0.0

    def forest(self) -> classify.ForestParams:
        return classify.ForestParams(
            n_estimators=self.n_estimators,
            max_depth=self.max_depth,
            min_samples_leaf=self.min_samples_leaf,
            max_features=self.max_features,
            criterion=self.criterion,
            random_state=self.random_state,
        )


class ClassifyConfig(Config):
    population: Literal["candidates", "all_5p_6p"] = "candidates"
    """``candidates``: the |parallax| selection the training set was drawn from (as the seed);
    ``all_5p_6p``: every source with a 5- or 6-parameter solution."""
    parallax_min_mas: float | None = None
    """``None``: the threshold the champion was trained with (a tag on its model version)."""
    threshold: float = 0.5
    model_uri: str | None = None
    """``None``: ``models:/astrometric-quality-rf@champion``."""
    sky_map_level: int = Field(default=5, ge=REGION_LEVEL, le=10)


# --- astrometric_training_set ----------------------------------------------------------------------


@asset(
    deps=[SOURCE_TABLE],
    group_name=GROUP,
    kinds={"spark", "parquet"},
    check_specs=[AssetCheckSpec("both_classes_balanced", asset=TRAINING_TABLE, description="Good and bad sets are non-empty and bad = good x bad_per_good (or all bad rows if fewer).")],
)
def astrometric_training_set(context: AssetExecutionContext, config: TrainingSetConfig, spark: SparkResource, storage: StorageResource) -> MaterializeResult:
    """GCNS training set, selected once from every published region and stored contiguously.

    Good: parallax > min, |b| > min, outside the LMC/SMC, BP/RP excess consistent (Riello et
    al. 2021, n sigma). Bad: parallax < -min, the rows with the smallest ``random_index``, as many
    as the good set. A ``holdout`` column (hash of source_id, seed) fixes the evaluation rows.
    """
    layout = storage.layout
    session = spark.session()
    session.sparkContext.setJobGroup(TRAINING_TABLE, "GCNS training-set selection", interruptOnCancel=True)
    cuts = config.cuts()
    started = time.perf_counter()

    from pyspark import StorageLevel
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    source = read_regions(session, layout, SOURCE_TABLE)
    missing = [c for c in astro.TRAINING_COLUMNS if c not in source.columns]
    if missing:
        raise Failure(f"{SOURCE_TABLE} lacks column(s) the selection needs: {', '.join(missing)}")
    doubles = set(FEATURES) | {"ra", "dec", "l", "b", "parallax", "phot_g_mean_mag", "bp_rp", "phot_bp_rp_excess_factor"}
    candidates = source.select(
        *[F.col(c).cast("double").alias(c) if c in doubles else F.col(c) for c in astro.TRAINING_COLUMNS]
    ).where((F.abs(F.col("parallax")) > F.lit(cuts.parallax_min_mas)) & F.col("astrometric_params_solved").isin(*astro.FIVE_OR_SIX_PARAMETER))
    schema = T.StructType(
        [*candidates.schema.fields, T.StructField("selection", T.StringType()), T.StructField("label", T.ByteType()), T.StructField("holdout", T.BooleanType())]
    )
    fraction, seed = config.holdout_fraction, config.split_seed

    def label_batches(batches):
        for batch in batches:
            yield astro.label_batch(batch, cuts, fraction, seed)

    labelled = candidates.mapInPandas(label_batches, schema).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        cut_flow = {row["selection"]: int(row["count"]) for row in labelled.groupBy("selection").count().collect()}
        n_good = cut_flow.get("good", 0)
        n_bad_available = cut_flow.get("bad", 0)
        n_bad = min(n_bad_available, int(round(n_good * cuts.bad_per_good)))
        bad = labelled.where(F.col("label") == astro.BAD).orderBy("random_index", "source_id").limit(n_bad)
        selected = labelled.where(F.col("label") == astro.GOOD).unionByName(bad).drop("selection")
        rows = n_good + n_bad
        files = max(1, int(np.ceil(rows * 8 * len(schema.fields) / (config.target_file_mb << 20))))
        manifest = {
            "rows": rows,
            "good": n_good,
            "bad": n_bad,
            "bad_available": n_bad_available,
            "cuts": cuts.as_dict(),
            "holdout_fraction": fraction,
            "split_seed": seed,
            "cut_flow": cut_flow,
            "source_regions": published_regions(layout, SOURCE_TABLE),
        }
        path = write_table(selected, layout, TRAINING_TABLE, files=files, manifest=manifest)
    finally:
        labelled.unpersist()
    seconds = time.perf_counter() - started

    table = pq.read_table(layout.table(TRAINING_TABLE), columns=["source_id", "label", "holdout"])
    labels = table["label"].to_numpy()
    holdout_rows = int(np.asarray(table["holdout"]).sum())
    sky_maps = _training_sky_pngs(layout, table["source_id"].to_numpy(), labels, config.sky_map_level)

    balanced = n_good > 0 and n_bad > 0 and n_bad == min(n_bad_available, int(round(n_good * cuts.bad_per_good)))
    metadata = {
        "rows": rows,
        "good": n_good,
        "bad": n_bad,
        "bad_available": n_bad_available,
        "holdout_rows": holdout_rows,
        "cuts": MetadataValue.json(cuts.as_dict()),
        "cut_flow": MetadataValue.json(dict(sorted(cut_flow.items()))),
        **{f"sky_{name}": _png_md(png, f"Training set, {name} solutions per HEALPix level-{config.sky_map_level} pixel (Galactic Mollweide)") for name, png in sky_maps.items()},
        "path": MetadataValue.path(str(path)),
        "parquet_files": files,
        "wall_seconds": round(seconds, 2),
        **{f"spark_{k}": v for k, v in stage_io(session, TRAINING_TABLE).items()},
    }
    check = AssetCheckResult(
        check_name="both_classes_balanced",
        passed=bool(balanced),
        metadata={"good": n_good, "bad": n_bad, "bad_available": n_bad_available, "bad_per_good": cuts.bad_per_good},
    )
    return MaterializeResult(metadata=metadata, check_results=[check])


# --- astrometric_classifier ------------------------------------------------------------------------


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
    context: AssetExecutionContext, config: ClassifierConfig, spark: SparkResource, storage: StorageResource, mlflow: MlflowResource
) -> MaterializeResult:
    """Random Forest on the 16 GCNS features, tracked and registered in MLflow.

    scikit-learn (``n_jobs=-1``) when the training set fits the driver comfortably, Spark ML
    ``RandomForestClassifier`` otherwise (``engine`` forces one). Either way the training table
    is read once, front to back.
    """
    import mlflow as mlflow_lib

    layout = storage.layout
    table_path = layout.table(TRAINING_TABLE)
    if not table_path.exists():
        raise Failure(f"{TRAINING_TABLE} is not materialised ({table_path}); materialise it first")
    version_dir = table_path.resolve()
    manifest = json.loads((version_dir / "_region.json").read_text()) if (version_dir / "_region.json").exists() else {}
    rows = int(manifest.get("rows") or pq.ParquetDataset(version_dir).read(columns=["source_id"]).num_rows)
    memory = int(config.driver_memory_gb * 2**30) if config.driver_memory_gb else classify.driver_memory_bytes()
    choice = classify.choose_engine(rows, memory, config.driver_memory_fraction, config.engine)
    context.log.info(f"engine {choice.engine}: {choice.reason}")
    params = config.forest()
    digest = _table_digest(version_dir)
    session = spark.session() if choice.engine == "spark" else None

    with mlflow.activate() as client:
        experiment_id = mlflow.experiment_id(client)
        tags = {"dagster_run_id": context.run_id, "dagster_asset": "astrometric_classifier", "engine": choice.engine, "training_table": str(version_dir)}
        with mlflow_lib.start_run(experiment_id=experiment_id, run_name=f"{MODEL_NAME}-{context.run_id[:8]}", tags=tags) as run:
            mlflow_lib.log_params(_run_params(params, choice, config, manifest))
            timings: dict[str, float] = {}
            if choice.engine == "sklearn":
                trained, holdout, train_ds, holdout_ds, timings = _train_sklearn(params, version_dir, digest)
            else:
                trained, holdout, train_ds, holdout_ds, timings = _train_spark(session, params, version_dir, digest)
            mlflow_lib.log_input(train_ds, context="training")
            mlflow_lib.log_input(holdout_ds, context="evaluation")
            holdout_frame, probability = holdout
            metrics = astro.classification_metrics(holdout_frame["label"], probability, config.threshold)

            figures = {
                "plots/confusion_matrix.png": _confusion_figure(astro.confusion(holdout_frame["label"], probability, config.threshold)),
                "plots/feature_importances.png": _importance_figure(trained.feature_importances()),
                "plots/roc_curve.png": _roc_figure(holdout_frame["label"], probability, metrics["roc_auc"]),
            }
            for name, figure in figures.items():
                mlflow_lib.log_figure(figure, name)
            mlflow_lib.log_dict(trained.feature_importances(), "feature_importances.json")

            started = time.perf_counter()
            info = _log_model(trained, holdout_frame, probability, session)
            timings["log_model_seconds"] = time.perf_counter() - started
            mlflow_lib.log_metrics(metrics, model_id=info.model_id, dataset=holdout_ds)
            mlflow_lib.log_metrics({k: round(v, 3) for k, v in timings.items()})
            shape = trained.describe()
            mlflow_lib.log_metrics({"forest_nodes": shape["nodes"], "forest_max_depth": shape["max_depth"]})
            version = str(info.registered_model_version)

            gate = _champion_gate(client, config, version, metrics, holdout_frame, spark.session)
            population_min = manifest.get("cuts", {}).get("parallax_min_mas", _DEFAULT_CUTS.parallax_min_mas)
            version_tags = {
                "population_parallax_min_mas": str(population_min),
                "engine": choice.engine,
                "training_table_digest": digest,
                "holdout_" + config.promotion_metric: f"{metrics[config.promotion_metric]:.6f}",
                "champion_gate": "promoted" if gate["promoted"] else "kept_previous_champion",
            }
            for key, value in version_tags.items():
                client.set_model_version_tag(MODEL_NAME, version, key, value)
            if gate["promoted"]:
                client.set_registered_model_alias(MODEL_NAME, CHAMPION, version)
            mlflow_lib.set_tags({"champion_gate": version_tags["champion_gate"]})
            run_id = run.info.run_id

    run_url = mlflow.run_url(experiment_id, run_id)
    metadata = {
        "mlflow_run": MetadataValue.url(run_url),
        "mlflow_run_id": run_id,
        "model": f"models:/{MODEL_NAME}/{version}",
        "model_version": MetadataValue.url(mlflow.model_version_url(MODEL_NAME, version)),
        "champion_version": gate["champion_after"],
        "promoted": gate["promoted"],
        "engine": choice.engine,
        "engine_reason": choice.reason,
        "training_rows": int(rows - len(holdout_frame)),
        "holdout_rows": len(holdout_frame),
        "training_table_digest": digest,
        **{f"holdout_{k}": MetadataValue.float(float(v)) for k, v in metrics.items() if k != "holdout_rows"},
        **{k: round(v, 3) for k, v in timings.items()},
        "forest": MetadataValue.json(shape),
        "feature_importances": MetadataValue.md(_importance_table(trained.feature_importances())),
        "roc_curve": _png_md(_figure_png(figures["plots/roc_curve.png"]), "ROC curve on the hold-out"),
        **{f"mlflow_{k}": v for k, v in mlflow.describe().items()},
    }
    for figure in figures.values():
        _close(figure)
    check = AssetCheckResult(
        check_name="not_worse_than_champion",
        passed=gate["promoted"],
        severity=AssetCheckSeverity.WARN,
        metadata={
            "metric": config.promotion_metric,
            "tolerance": config.promotion_tolerance,
            "new_version": version,
            "new_value": MetadataValue.float(gate["new_value"]),
            "champion_version": gate["champion_before"] or "none",
            "champion_value": MetadataValue.float(gate["champion_value"]) if gate["champion_value"] is not None else MetadataValue.text("no champion yet"),
            "champion_after": gate["champion_after"],
        },
    )
    return MaterializeResult(metadata=metadata, check_results=[check])


def _run_params(params: classify.ForestParams, choice: classify.EngineChoice, config: ClassifierConfig, manifest: dict) -> dict:
    """Only the hyper-parameters and selection thresholds: an explicit list, never config dumps."""
    out = {f"rf_{k}": v for k, v in params.as_dict().items()}
    out.update(
        {
            "engine": choice.engine,
            "engine_estimated_mib": round(choice.estimated_bytes / 2**20, 1),
            "engine_budget_mib": round(choice.budget_bytes / 2**20, 1),
            "features": ",".join(FEATURES),
            "abs_features": ",".join(astro.ABS_FEATURES),
            "threshold": config.threshold,
            "holdout_fraction": manifest.get("holdout_fraction"),
            "split_seed": manifest.get("split_seed"),
        }
    )
    out.update({f"cut_{k}": v for k, v in (manifest.get("cuts") or {}).items()})
    return out


def _read_training_frame(version_dir: Path) -> pd.DataFrame:
    """The whole training table, front to back, in source_id order (sequential IO)."""
    columns = ["source_id", "label", "holdout", *FEATURES]
    frame = pq.ParquetDataset(version_dir).read(columns=columns).to_pandas()
    return frame.sort_values("source_id", kind="stable").reset_index(drop=True)


def _train_sklearn(params, version_dir: Path, digest: str):
    import mlflow as mlflow_lib

    timings = {}
    started = time.perf_counter()
    frame = _read_training_frame(version_dir)
    timings["read_seconds"] = time.perf_counter() - started
    train, holdout = frame[~frame["holdout"]], frame[frame["holdout"]].reset_index(drop=True)
    train_ds = mlflow_lib.data.from_pandas(train, source=str(version_dir), name=TRAINING_TABLE, targets="label", digest=digest)
    holdout_ds = mlflow_lib.data.from_pandas(holdout, source=str(version_dir), name=f"{TRAINING_TABLE}-holdout", targets="label", digest=digest)
    started = time.perf_counter()
    model = classify.train_sklearn(train, params, n_jobs=-1)
    timings["fit_seconds"] = time.perf_counter() - started
    trained = classify.LoadedModel("sklearn", model)
    started = time.perf_counter()
    probability = trained.good_probability(holdout)
    timings["evaluate_seconds"] = time.perf_counter() - started
    return trained, (holdout, probability), train_ds, holdout_ds, timings


def _train_spark(session, params, version_dir: Path, digest: str):
    import mlflow as mlflow_lib
    from pyspark.sql import functions as F

    timings = {}
    table = session.read.parquet(str(version_dir))
    train = table.where(~F.col("holdout"))
    holdout_sdf = table.where(F.col("holdout"))
    train_ds = mlflow_lib.data.from_spark(train, path=str(version_dir), name=TRAINING_TABLE, targets="label", digest=digest)
    holdout_ds = mlflow_lib.data.from_spark(holdout_sdf, path=str(version_dir), name=f"{TRAINING_TABLE}-holdout", targets="label", digest=digest)
    started = time.perf_counter()
    model = classify.train_spark(train, params)
    timings["fit_seconds"] = time.perf_counter() - started
    trained = classify.LoadedModel("spark", model)
    started = time.perf_counter()
    holdout = holdout_sdf.select("source_id", "label", *FEATURES).toPandas().sort_values("source_id").reset_index(drop=True)
    probability = trained.good_probability(holdout, spark=session)
    timings["evaluate_seconds"] = time.perf_counter() - started
    return trained, (holdout, probability), train_ds, holdout_ds, timings


def _log_model(trained: classify.LoadedModel, holdout: pd.DataFrame, probability: np.ndarray, session):
    """Log (and register) the model with signature and a five-row input example."""
    import mlflow as mlflow_lib

    example = holdout[list(FEATURES)].head(5).astype("float64")
    if trained.flavor == "sklearn":
        import sklearn

        output = np.column_stack([1 - probability[:5], probability[:5]])
        signature = classify.model_signature(example, output)
        return mlflow_lib.sklearn.log_model(
            trained.model,
            name="model",
            signature=signature,
            input_example=example,
            registered_model_name=MODEL_NAME,
            pyfunc_predict_fn="predict_proba",
            serialization_format=mlflow_lib.sklearn.SERIALIZATION_FORMAT_SKOPS,
            skops_trusted_types=classify.SKOPS_TRUSTED_TYPES,
            pip_requirements=[f"mlflow=={mlflow_lib.__version__}", f"scikit-learn=={sklearn.__version__}", f"numpy=={np.__version__}", f"pandas=={pd.__version__}"],
        )
    import mlflow.spark
    import pyspark

    signature = classify.model_signature(example, pd.DataFrame({"probability": probability[:5]}))
    return mlflow.spark.log_model(
        trained.model,
        "model",
        signature=signature,
        input_example=example,
        registered_model_name=MODEL_NAME,
        pip_requirements=[f"mlflow=={mlflow_lib.__version__}", f"pyspark=={pyspark.__version__}"],
    )


def current_champion(client):
    """The model version the ``champion`` alias points at, or ``None``."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(MODEL_NAME, CHAMPION)
    except MlflowException:
        return None


def _champion_gate(client, config: ClassifierConfig, version: str, metrics: dict, holdout: pd.DataFrame, session: Callable) -> dict:
    """Score the current champion on the same hold-out; promote the new version if not worse."""
    metric = config.promotion_metric
    champion = current_champion(client)
    new_value = float(metrics[metric])
    if champion is None:
        return {"promoted": True, "new_value": new_value, "champion_value": None, "champion_before": None, "champion_after": version}
    loaded = classify.load_model(f"models:/{MODEL_NAME}/{champion.version}", champion.version)
    champion_probability = loaded.good_probability(holdout, spark=session() if loaded.flavor == "spark" else None)
    champion_value = float(astro.classification_metrics(holdout["label"], champion_probability, config.threshold)[metric])
    promoted = bool(new_value >= champion_value - config.promotion_tolerance)
    return {
        "promoted": promoted,
        "new_value": new_value,
        "champion_value": champion_value,
        "champion_before": str(champion.version),
        "champion_after": version if promoted else str(champion.version),
    }


def _table_digest(version_dir: Path) -> str:
    """Content digest of the training table's Parquet files (names and bytes)."""
    digest = hashlib.sha256()
    for path in sorted(version_dir.glob("*.parquet")):
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


# --- classified_sources ----------------------------------------------------------------------------


@asset(
    partitions_def=sky_regions,
    backfill_policy=BackfillPolicy.single_run(),
    deps=[SOURCE_TABLE, astrometric_classifier],
    group_name=GROUP,
    kinds={"spark", "parquet"},
)
def classified_sources(
    context: AssetExecutionContext, config: ClassifyConfig, spark: SparkResource, storage: StorageResource, mlflow: MlflowResource
) -> MaterializeResult:
    """The champion model applied inside Spark to each region's candidates (or all 5/6p sources).

    Output per region: ``source_id``, ``probability`` (of a good solution) and ``label`` (1 good,
    0 bad). The all-sky map of the bad fraction should trace crowded fields: the Galactic plane,
    the bulge and the Magellanic Clouds.
    """
    from pyspark import StorageLevel
    from pyspark.errors import PythonException

    layout = storage.layout
    session = spark.session()
    session.sparkContext.setJobGroup(CLASSIFIED_TABLE, "classify sources with the champion model", interruptOnCancel=True)
    with mlflow.activate() as client:
        uri, version, population_min = _resolve_model(client, config)
        loaded = classify.load_model(uri, version)
    parallax_min = config.parallax_min_mas if config.parallax_min_mas is not None else population_min
    regions = list(context.partition_keys)
    started = time.perf_counter()

    parallax_cut = parallax_min if config.population == "candidates" else None
    inputs = [path for region in regions for path in layout.region_files(SOURCE_TABLE, region)]
    files = classify.files_for_rows(footer_rows(inputs))
    manifest = {"model": uri, "model_version": version, "population": config.population, "parallax_min_mas": parallax_min, "threshold": config.threshold}
    try:
        if loaded.flavor == "sklearn":  # Python tasks read the region files (classify.score_files says why)
            scored = classify.score_files(session, inputs, loaded, config.threshold, parallax_cut)
        else:
            selected = classify.population_filter(parallax_cut).spark
            scored = classify.score(read_regions(session, layout, SOURCE_TABLE, regions).where(selected), loaded, config.threshold)
    except FeatureError as exc:  # a missing column, found on the driver
        raise Failure(str(exc)) from exc
    # Cached so the range partitioner's sampling pass and the write share one scoring pass.
    scored = scored.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        paths = write_regions(scored, layout, CLASSIFIED_TABLE, regions, files=files, manifest=manifest)
    except PythonException as exc:  # a FeatureError raised in a Spark task arrives wrapped
        inner = classify.unwrap_feature_error(exc)
        if inner is not None:
            raise Failure(str(inner)) from exc
        raise
    finally:
        scored.unpersist()
    seconds = time.perf_counter() - started

    n, bad = _label_counts(session, layout, config.sky_map_level)
    counts = {region: _region_sum((n, bad), region, config.sky_map_level) for region in regions}
    for region, path in paths.items():
        rows, flagged = counts[region]
        context.add_asset_metadata(
            {"rows": rows, "flagged_bad": flagged, "fraction_bad": MetadataValue.float(flagged / rows if rows else 0.0), "path": MetadataValue.path(str(path))},
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
        "bad_fraction_map": _png_md(sky_png.read_bytes(), "Fraction flagged bad in every classified region; crowded fields (Galactic plane, bulge, Magellanic Clouds) should stand out"),
        "bad_fraction_map_png": MetadataValue.path(str(sky_png)),
        **{f"spark_{k}": v for k, v in stage_io(session, CLASSIFIED_TABLE).items()},
    }
    return MaterializeResult(metadata=metadata)


def _region_sum(maps: tuple[np.ndarray, ...], region: str, level: int) -> tuple[int, ...]:
    """Sums of nested-pixel maps at ``level`` over one sky region (a contiguous pixel range)."""
    pixel = parse_region_key(region)[1]
    shift = 2 * (level - REGION_LEVEL)
    return tuple(int(m[pixel << shift : (pixel + 1) << shift].sum()) for m in maps)


def _label_counts(session, layout, level: int) -> tuple[np.ndarray, np.ndarray]:
    """(sources, flagged bad) per nested pixel at ``level`` over every classified region."""
    from pyspark.sql import functions as F

    table = read_regions(session, layout, CLASSIFIED_TABLE)
    pixel = F.shiftright(F.col("source_id"), source_id_shift(level)).alias("pixel")
    stats = table.groupBy(pixel).agg(F.count(F.lit(1)).alias("n"), F.sum((F.col("label") == astro.BAD).cast("long")).alias("bad")).toPandas()
    n, bad = np.zeros(npix(level)), np.zeros(npix(level))
    n[stats["pixel"].to_numpy()] = stats["n"].to_numpy()
    bad[stats["pixel"].to_numpy()] = stats["bad"].to_numpy()
    return n, bad


def _resolve_model(client, config: ClassifyConfig) -> tuple[str, str | None, float]:
    """A fixed ``models:/name/<version>`` URI for the whole run (the alias may move meanwhile)."""
    if config.model_uri:
        return config.model_uri, None, _DEFAULT_CUTS.parallax_min_mas
    champion = current_champion(client)
    if champion is None:
        raise Failure(f"no model version of {MODEL_NAME!r} carries the alias '{CHAMPION}': materialise astrometric_classifier first")
    population_min = float(champion.tags.get("population_parallax_min_mas", _DEFAULT_CUTS.parallax_min_mas))
    return f"models:/{MODEL_NAME}/{champion.version}", str(champion.version), population_min


# --- figures ---------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure_png(figure, dpi: int = 80) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    return buffer.getvalue()


def _close(figure) -> None:
    _plt().close(figure)


def _png_md(png: bytes, caption: str) -> MetadataValue:
    return MetadataValue.md(preview_markdown(png, caption))


def _training_sky_pngs(layout, source_id: np.ndarray, labels: np.ndarray, level: int) -> dict[str, bytes]:
    out = {}
    for name, value in (("good", astro.GOOD), ("bad", astro.BAD)):
        counts = astro.sky_counts(source_id[labels == value], level)
        path = render_healpix(
            np.where(counts > 0, counts, np.nan),
            layout.maps / f"{TRAINING_TABLE}_{name}.png",
            title=f"training set: {int(counts.sum()):,} {name} solutions (level {level}, Galactic)",
            unit="sources per pixel",
            lo=1.0,
            hi=max(2.0, float(counts.max())),
            norm="log",
            coord=["C", "G"],
        )
        out[name] = path.read_bytes()
    return out


def _confusion_figure(matrix: np.ndarray):
    plt = _plt()
    figure, axes = plt.subplots(figsize=(4, 3.5))
    axes.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        axes.text(j, i, f"{value}", ha="center", va="center", color="black")
    axes.set_xticks([0, 1], ["bad", "good"])
    axes.set_yticks([0, 1], ["bad", "good"])
    axes.set_xlabel("predicted")
    axes.set_ylabel("training label")
    axes.set_title("hold-out confusion matrix")
    return figure


def _importance_figure(importances: dict[str, float]):
    plt = _plt()
    ordered = sorted(importances.items(), key=lambda kv: kv[1])
    figure, axes = plt.subplots(figsize=(6, 5))
    axes.barh([k for k, _ in ordered], [v for _, v in ordered])
    axes.set_xlabel("mean decrease in impurity")
    axes.set_title("feature importances")
    return figure


def _roc_figure(labels, probability, auc: float):
    from sklearn.metrics import roc_curve

    plt = _plt()
    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(int), probability, pos_label=astro.GOOD)
    figure, axes = plt.subplots(figsize=(4, 4))
    axes.plot(fpr, tpr, label=f"AUC = {auc:.4f}")
    axes.plot([0, 1], [0, 1], ls="--", color="grey")
    axes.set_xlabel("false positive rate (bad called good)")
    axes.set_ylabel("true positive rate (good called good)")
    axes.legend(loc="lower right")
    return figure


def _importance_table(importances: dict[str, float]) -> str:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(importances.items(), key=lambda kv: -kv[1]))
    return "| feature | importance |\n|---|---|\n" + rows
