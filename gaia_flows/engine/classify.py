"""Random Forest training and scoring: scikit-learn on the driver or Spark ML on the cluster.

Both model kinds take the *raw* Gaia feature columns (``science.astrometric.FEATURES``) and
apply ``|parallax_over_error|`` themselves, so a registered model can be used by anyone with a
Gaia table, and both are scored inside Spark:

- scikit-learn models are broadcast (shipped once per executor by Spark's torrent broadcast,
  unpickled once per Python worker and cached there for later tasks) and applied with
  ``mapInArrow`` to float32 features in batches of ~250k rows, one thread per task so the
  cores are not oversubscribed. On the catalogue's region files the tasks read the Parquet
  themselves (:func:`score_files`); any other DataFrame is handed over by Spark
  (:func:`score`). ``benchmarks/classifier.py`` measures both;
- Spark ML models are applied with their own ``transform`` (the JVM broadcasts the trees).

Which one trains is a size rule (:func:`choose_engine`): scikit-learn (``n_jobs=-1``) while the
training set fits the driver comfortably, Spark ML beyond that.
"""

from __future__ import annotations

import math
import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa

from gaia_flows.engine.sizing import balanced_groups
from gaia_flows.science import astrometric as astro
from gaia_flows.science.astrometric import ABS_FEATURES, FEATURES, FeatureError

Engine = Literal["sklearn", "spark"]
SCORE_SCHEMA = "source_id long, probability double, label byte"
LABEL = "label"
FOREST_STEP = "forest"
ABS_PREFIX = "abs_"
SKOPS_TRUSTED_TYPES = ["sklearn.tree._tree.Tree"]
"""The one type of our pipeline skops does not trust by default. Models are stored with skops,
not pickle, so loading a registered model cannot run arbitrary code; the tree arrays are the
only thing we vouch for, and only for models this project wrote."""


@dataclass(frozen=True)
class ForestParams:
    """Random Forest hyper-parameters shared by both engines (names as in scikit-learn).

    Hold-out accuracy is flat from 10 trees and depth 8 upwards (``benchmarks/classifier.py``),
    while prediction cost grows with trees x nodes: 100 trees capped at depth 16 sit on that
    plateau and score several times faster than 500 fully grown ones. The cap also bounds the
    cost on noisier real data, where unlimited trees grow far deeper than on the synthetic
    catalogue.
    """

    n_estimators: int = 100
    max_depth: int | None = 16
    min_samples_leaf: int = 1
    max_features: str = "sqrt"
    criterion: str = "gini"
    random_state: int = 42
    spark_max_bins: int = 64

    def as_dict(self) -> dict:
        return asdict(self)


# --- which engine ----------------------------------------------------------------------------------

# Bytes per training row on the driver: the pandas frame read from Parquet (~30 float64
# columns), the float32 matrix scikit-learn builds, sample weights and per-thread split buffers.
DRIVER_BYTES_PER_ROW = 30 * 8 + len(FEATURES) * 4 + 64


@dataclass(frozen=True)
class EngineChoice:
    engine: Engine
    rows: int
    estimated_bytes: int
    budget_bytes: int
    reason: str


def choose_engine(
    rows: int, memory_bytes: int, fraction: float = 0.25, requested: str = "auto"
) -> EngineChoice:
    """scikit-learn while the training set takes at most ``fraction`` of the driver's memory.

    ``memory_bytes`` is what the driver can use (available RAM, or a configured budget). The
    forest's own size is not part of the rule: it depends on how separable the classes are,
    not on the row count (the benchmark reports it).
    """
    estimated = int(rows) * DRIVER_BYTES_PER_ROW
    budget = int(memory_bytes * fraction)
    if requested in ("sklearn", "spark"):
        return EngineChoice(requested, rows, estimated, budget, f"requested engine={requested}")
    if requested != "auto":
        raise ValueError(f"engine must be 'auto', 'sklearn' or 'spark', got {requested!r}")
    if estimated <= budget:
        reason = f"{rows} rows need ~{estimated / 2**20:.0f} MiB <= {fraction:.0%} of driver memory ({budget / 2**20:.0f} MiB)"
        return EngineChoice("sklearn", rows, estimated, budget, reason)
    reason = f"{rows} rows need ~{estimated / 2**20:.0f} MiB > {fraction:.0%} of driver memory ({budget / 2**20:.0f} MiB)"
    return EngineChoice("spark", rows, estimated, budget, reason)


def driver_memory_bytes() -> int:
    """Memory the driver process may still use: available RAM, capped by a cgroup limit."""
    import psutil

    available = psutil.virtual_memory().available
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()
        except OSError:
            continue
        if text.isdigit():
            used = psutil.Process().memory_info().rss
            available = min(available, max(0, int(text) - used))
        break
    return int(available)


# --- scikit-learn ----------------------------------------------------------------------------------


def sklearn_pipeline(params: ForestParams, n_jobs: int = -1):
    """Raw Gaia columns -> |parallax_over_error| -> Random Forest, as one picklable object.

    Two column branches (the absolute-valued features, the rest passed through), not one per
    feature: every branch costs a column selection and an ``hstack`` input per predicted batch,
    a noticeable share of the scoring time with sixteen branches. The forest therefore sees the
    features in the transformer's output order, which :meth:`LoadedModel.feature_importances`
    reads back by name.
    """
    from sklearn.compose import ColumnTransformer
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    columns = ColumnTransformer(
        [
            ("absolute", FunctionTransformer(np.abs, feature_names_out="one-to-one"), list(ABS_FEATURES)),
            ("raw", "passthrough", [name for name in FEATURES if name not in ABS_FEATURES]),
        ],
        remainder="drop",
        verbose_feature_names_out=False,
    )
    forest = RandomForestClassifier(
        n_estimators=params.n_estimators,
        max_depth=params.max_depth,
        min_samples_leaf=params.min_samples_leaf,
        max_features=params.max_features,
        criterion=params.criterion,
        random_state=params.random_state,
        n_jobs=n_jobs,
    )
    return Pipeline([("features", columns), (FOREST_STEP, forest)])


def training_rows(frame: pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray, int]:
    """(features, labels, rows dropped for a null feature) of a training-set frame."""
    if LABEL not in frame.columns:
        raise FeatureError(f"training input has no '{LABEL}' column")
    features = astro.feature_frame(frame)
    keep = astro.complete_rows(features)
    labels = frame[LABEL].to_numpy()[keep].astype(int)
    present = set(np.unique(labels).tolist())
    if present != {astro.BAD, astro.GOOD}:
        raise ValueError(
            f"training set needs both classes (bad=0, good=1); it has only {sorted(present)} in {int(keep.sum())} complete rows"
        )
    return features[keep], labels, int((~keep).sum())


def train_sklearn(frame: pd.DataFrame, params: ForestParams, n_jobs: int = -1):
    features, labels, _ = training_rows(frame)
    model = sklearn_pipeline(params, n_jobs=n_jobs)
    model.fit(features, labels)
    return model


def sklearn_good_probability(model, frame: pd.DataFrame) -> np.ndarray:
    """P(good) for each row of a frame with the raw feature columns (validated first)."""
    features = astro.feature_frame(frame)
    if len(features) == 0:
        return np.zeros(0)
    classes = list(model.classes_)
    return model.predict_proba(features)[:, classes.index(astro.GOOD)]


def set_threads(model, n_jobs: int):
    if hasattr(model, "named_steps") and FOREST_STEP in model.named_steps:
        model.named_steps[FOREST_STEP].n_jobs = n_jobs
    return model


def forest_of(model):
    return model.named_steps[FOREST_STEP] if hasattr(model, "named_steps") else model


# --- Spark ML --------------------------------------------------------------------------------------


def spark_pipeline(params: ForestParams):
    """The same model as :func:`sklearn_pipeline` in Spark ML (raw columns in, |x| inside)."""
    from pyspark.ml import Pipeline
    from pyspark.ml.classification import RandomForestClassifier
    from pyspark.ml.feature import SQLTransformer, VectorAssembler

    absolute = ", ".join(f"abs(`{name}`) AS `{ABS_PREFIX}{name}`" for name in ABS_FEATURES)
    inputs = [f"{ABS_PREFIX}{name}" if name in ABS_FEATURES else name for name in FEATURES]
    forest = RandomForestClassifier(
        featuresCol="features",
        labelCol=LABEL,
        numTrees=params.n_estimators,
        maxDepth=min(params.max_depth or 30, 30),  # Spark's limit; None = "as deep as allowed"
        minInstancesPerNode=params.min_samples_leaf,
        featureSubsetStrategy=params.max_features,
        impurity=params.criterion,
        maxBins=params.spark_max_bins,
        seed=params.random_state,
        bootstrap=True,
    )
    return Pipeline(
        stages=[
            SQLTransformer(statement=f"SELECT *, {absolute} FROM __THIS__"),
            VectorAssembler(inputCols=inputs, outputCol="features", handleInvalid="keep"),
            forest,
        ]
    )


def train_spark(df, params: ForestParams):
    """Fit on a Spark DataFrame of the training table (rows with a null feature dropped)."""
    from pyspark.sql import functions as F

    astro.check_feature_columns(df.columns)
    train = df.dropna(subset=list(FEATURES)).withColumn(LABEL, F.col(LABEL).cast("double"))
    return spark_pipeline(params).fit(train)


def spark_good_probability_column(model, df, threshold: float):
    """source_id, probability (of good) and label from a fitted Spark ML pipeline."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    scored = model.transform(df)
    probability = vector_to_array(F.col("probability"))[astro.GOOD]
    return scored.select(
        F.col("source_id").cast("long").alias("source_id"),
        probability.alias("probability"),
        (probability >= F.lit(threshold)).cast("byte").alias("label"),
    )


# --- one interface over both kinds -----------------------------------------------------------------


@dataclass
class LoadedModel:
    """A model from MLflow (or freshly trained) with its kind, scoring through one interface."""

    flavor: Engine
    model: Any
    uri: str | None = None
    version: str | None = None

    def good_probability(self, frame: pd.DataFrame, spark=None) -> np.ndarray:
        """P(good) for a pandas frame on the driver (hold-out evaluation, small inputs)."""
        if self.flavor == "sklearn":
            return sklearn_good_probability(self.model, frame)
        if spark is None:
            raise ValueError("a Spark ML model needs a Spark session to score")
        astro.feature_frame(frame)  # same validation and messages as the scikit-learn path
        columns = ["source_id", *FEATURES]
        sdf = spark.createDataFrame(frame[columns].astype({f: "float64" for f in FEATURES}))
        scored = spark_good_probability_column(self.model, sdf, 0.5).toPandas()
        order = pd.Series(np.arange(len(frame)), index=frame["source_id"].to_numpy())
        return scored["probability"].to_numpy()[
            np.argsort(order.loc[scored["source_id"].to_numpy()].to_numpy())
        ]

    def feature_importances(self) -> dict[str, float]:
        if self.flavor == "sklearn":
            names = (
                self.model[:-1].get_feature_names_out() if hasattr(self.model, "named_steps") else FEATURES
            )
            values = forest_of(self.model).feature_importances_
        else:
            names, values = FEATURES, self.model.stages[-1].featureImportances.toArray()
        by_name = {str(name): float(v) for name, v in zip(names, values)}
        return {name: by_name[name] for name in FEATURES}

    def describe(self) -> dict[str, Any]:
        if self.flavor == "sklearn":
            forest = forest_of(self.model)
            depths = [e.get_depth() for e in forest.estimators_]
            nodes = [e.tree_.node_count for e in forest.estimators_]
        else:
            trees = self.model.stages[-1].trees
            depths = [t.depth for t in trees]
            nodes = [t.numNodes for t in trees]
        return {
            "trees": len(depths),
            "max_depth": int(max(depths)),
            "mean_depth": float(np.mean(depths)),
            "nodes": int(sum(nodes)),
        }


def model_signature(example: pd.DataFrame, output):
    """The logged signature: the 16 raw features, each a nullable double, then the output
    inferred from ``output``.

    Inferred from an example, a feature whose values happen to be whole numbers
    (``visibility_periods_used``) would become an integer column, and MLflow's schema
    enforcement would then refuse a row where it is missing. As doubles, a missing value is
    NaN, exactly what :func:`column_features` hands the forest in ``classified_sources``: the
    trees route it, where training drops incomplete rows (:func:`training_rows`).
    """
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("double", name) for name in FEATURES])
    return ModelSignature(inputs=inputs, outputs=infer_signature(example, output).outputs)


def load_model(uri: str, version: str | None = None) -> LoadedModel:
    """Load an MLflow model in its native flavour (scikit-learn or Spark ML)."""
    import mlflow

    flavors = mlflow.models.get_model_info(uri).flavors
    if "spark" in flavors:
        import mlflow.spark

        return LoadedModel("spark", mlflow.spark.load_model(uri), uri, version)
    if "sklearn" in flavors:
        import mlflow.sklearn

        return LoadedModel("sklearn", mlflow.sklearn.load_model(uri), uri, version)
    raise ValueError(f"model {uri} has flavours {sorted(flavors)}; expected 'sklearn' or 'spark'")


# --- scoring inside Spark --------------------------------------------------------------------------

_WORKER_MODELS: dict[str, Any] = {}

SCORE_BATCH_ROWS = 250_000
"""Rows per ``predict_proba`` call in a Python worker (Spark's Arrow batches are 10k rows). A
call costs a fixed ~25-30 ms on top of its per-row cost (column selection, joblib's dispatch of
each tree, one output array per tree): in one process the default forest predicted 386k rows/s
in 10k-row calls, 530-570k in 100k-row calls and 575-630k in 250k-row calls; at 500k rows the
per-tree arrays outgrow the caches and it slows again. 250k rows of 16 float32 features are
~16 MB."""


def _worker_model(broadcast, token: str):
    """The broadcast model, unpickled once per Python worker and single-threaded there.

    ``token`` names one scoring call (the worker-side Broadcast carries no usable identity);
    Python workers are reused across tasks, so later tasks of the same call find the model here.
    """
    model = _WORKER_MODELS.get(token)
    if model is None:
        model = set_threads(broadcast.value, 1)
        _WORKER_MODELS.clear()  # one model per worker at a time
        _WORKER_MODELS[token] = model
    return model


def _rebatched(batches, rows: int):
    """Arrow record batches regrouped into tables of at least ``rows`` rows (the last smaller)."""
    pending, count = [], 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        if count >= rows:
            yield pa.Table.from_batches(pending)
            pending, count = [], 0
    if pending:
        yield pa.Table.from_batches(pending)


FEATURE_VECTOR = "features"


def arrow_features(table) -> pd.DataFrame:
    """The 16 features of an Arrow table's ``features`` column (a list of 16 float32 per row, in
    model order) as one float32 matrix: a DataFrame over the list values, copied only where
    nulls must become NaN."""
    vectors = table.column(FEATURE_VECTOR).combine_chunks()
    matrix = vectors.flatten().to_numpy(zero_copy_only=False).reshape(len(vectors), len(FEATURES))
    _check_not_entirely_null(np.isnan(matrix).all(axis=0), len(matrix))
    return pd.DataFrame(matrix, columns=list(FEATURES), copy=False)


def column_features(table) -> pd.DataFrame:
    """The 16 features of an Arrow table with one column per feature, as float32 columns
    (null -> NaN). One array per column, not one row-major matrix: filling a matrix column by
    column writes with a 64-byte stride, several times the cost of the arrays, for no faster
    prediction."""
    columns = {
        name: table.column(name).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
        for name in FEATURES
    }
    _check_not_entirely_null(
        np.array([np.isnan(values).all() for values in columns.values()]), table.num_rows
    )
    return pd.DataFrame(columns, copy=False)


def _check_not_entirely_null(empty: np.ndarray, rows: int) -> None:
    """An entirely null or NaN feature (``empty``, one flag per feature in model order) raises
    :class:`FeatureError` naming it, as :func:`~gaia_flows.science.astrometric.feature_frame`
    does for pandas input."""
    if rows and empty.any():
        raise astro.entirely_null(FEATURES[int(np.flatnonzero(empty)[0])], rows)


def _scored(
    model, source_id, features: pd.DataFrame, good_column: int, threshold: float
) -> Iterator[pa.RecordBatch]:
    p = model.predict_proba(features)[:, good_column] if len(features) else np.zeros(0)
    label = (p >= threshold).astype(np.int8)
    yield from pa.Table.from_arrays(
        [source_id, pa.array(p), pa.array(label)], names=["source_id", "probability", "label"]
    ).to_batches()


def _check_numeric(df) -> None:
    from pyspark.sql.types import NumericType

    for name in FEATURES:
        dtype = df.schema[name].dataType
        if not isinstance(dtype, NumericType):
            raise FeatureError(f"feature column '{name}' is not numeric (Spark type {dtype.simpleString()})")


def score(df, loaded: LoadedModel, threshold: float = 0.5):
    """Spark DataFrame of ``source_id, probability, label`` (label 1 = good solution).

    ``df`` must hold ``source_id`` and the raw numeric feature columns; a missing or non-numeric
    column fails here, on the driver, naming it. An all-null feature fails in the first batch
    that shows it.

    For a scikit-learn model the features cross to Python as one array of 16 float32 per row,
    cast by Spark. The trees compare float32 thresholds (scikit-learn casts its input to
    float32 before predicting), so this changes no prediction. One array column instead of 16
    columns cut the JVM's Arrow conversion, Spark's floor for any Python scoring, by a third
    (``benchmarks/classifier.py``); ``mapInArrow`` then reads the matrix straight from the
    Arrow buffer, without a pandas frame per column.
    """
    from pyspark.sql import functions as F

    astro.check_feature_columns(df.columns)
    if "source_id" not in df.columns:
        raise FeatureError("model input is missing column: source_id")
    _check_numeric(df)
    if loaded.flavor == "spark":
        df = df.select("source_id", *FEATURES)
        _check_not_all_null(df)
        return spark_good_probability_column(loaded.model, df, threshold)

    df = df.select(
        F.col("source_id").cast("long"),
        F.array(*[F.col(name).cast("float") for name in FEATURES]).alias(FEATURE_VECTOR),
    )
    broadcast = df.sparkSession.sparkContext.broadcast(loaded.model)
    token = uuid.uuid4().hex
    good_column = list(loaded.model.classes_).index(astro.GOOD)

    def score_batches(batches):
        model = _worker_model(broadcast, token)
        for table in _rebatched(batches, SCORE_BATCH_ROWS):
            yield from _scored(
                model, table.column("source_id"), arrow_features(table), good_column, threshold
            )

    return df.mapInArrow(score_batches, SCORE_SCHEMA)


FILTER_COLUMNS = ("astrometric_params_solved", "parallax")


class Population(NamedTuple):
    """The rows to classify, as a Spark column (for :func:`score`'s DataFrame input) and as a
    pyarrow expression (for :func:`score_files`), built side by side so they cannot drift
    apart, with the columns they read."""

    spark: Any
    arrow: Any
    columns: tuple[str, ...]


def population_filter(parallax_min: float | None) -> Population:
    """5/6-parameter solutions, with |parallax| > ``parallax_min`` unless it is ``None``."""
    import pyarrow.compute as pc
    from pyspark.sql import functions as F

    solved = list(astro.FIVE_OR_SIX_PARAMETER)
    spark = F.col("astrometric_params_solved").isin(*solved)
    arrow = pc.field("astrometric_params_solved").isin(solved)
    if parallax_min is None:
        return Population(spark, arrow, FILTER_COLUMNS[:1])
    spark = spark & (F.abs(F.col("parallax")) > F.lit(parallax_min))
    arrow = arrow & (pc.abs(pc.field("parallax")) > pa.scalar(float(parallax_min)))
    return Population(spark, arrow, FILTER_COLUMNS)


def _check_files(files: list[str], population: Population) -> None:
    """Missing or non-numeric columns, named on the driver from the Parquet footers."""
    import pyarrow.parquet as pq

    for path in files:
        schema = pq.read_schema(path)
        astro.check_feature_columns(schema.names)
        missing = [c for c in ("source_id", *population.columns) if c not in schema.names]
        if missing:
            raise FeatureError(
                f"{path} has no column(s) {', '.join(missing)}: the population cannot be selected"
            )
        for name in FEATURES:
            kind = schema.field(name).type
            if not (pa.types.is_integer(kind) or pa.types.is_floating(kind)):
                raise FeatureError(f"feature column '{name}' is not numeric (Arrow type {kind} in {path})")


def score_files(
    session,
    files: list[str],
    loaded: LoadedModel,
    threshold: float = 0.5,
    parallax_min: float | None = None,
    records=None,
):
    """Spark DataFrame of ``source_id, probability, label`` for the population
    (:func:`population_filter`) of Parquet ``files``, scored by a scikit-learn model in Spark
    tasks that read the files themselves.

    Spark's own reader would hand every row to Python through its per-value Arrow writer:
    ~0.9 µs of JVM CPU per row, more than half of what the default forest's prediction costs.
    pyarrow reads the same columns for 0.25-0.7 µs of Python CPU per row (alone / in a busy
    worker), and the JVM only carries the three output columns. The files go out in groups of
    similar size, two per core: a Python task costs ~45 ms of scheduling in local mode, so one
    task per small file would eat the gain (``docs/benchmarks.md``, classifier, third pass).
    Missing or non-numeric columns fail here on the driver, naming them; an all-null feature
    fails in the first batch that shows it. ``records`` (``engine.metrics.task_records``), when
    given, receives one record per group of files: bytes and rows read, CPU against wall.
    """
    import pyarrow.parquet as pq

    from gaia_flows.engine.metrics import TaskClock

    if loaded.flavor != "sklearn":
        raise ValueError(
            f"score_files scores scikit-learn models; a {loaded.flavor} model scores a DataFrame with score()"
        )
    files = [str(f) for f in files]
    population = population_filter(parallax_min)
    _check_files(files, population)
    groups = balanced_groups(
        {path: os.path.getsize(path) for path in files}, 2 * session.sparkContext.defaultParallelism
    )
    rows = population.arrow  # what the tasks capture: the Spark column does not pickle
    columns = list(dict.fromkeys(["source_id", *FEATURES, *population.columns]))
    broadcast = session.sparkContext.broadcast(loaded.model)
    token = uuid.uuid4().hex
    good_column = list(loaded.model.classes_).index(astro.GOOD)

    def score_groups(batches):
        model = _worker_model(broadcast, token)
        for batch in batches:
            for group in batch.column(0).to_pylist():
                clock, read = TaskClock(), 0
                for path in groups[group]:
                    table = pq.read_table(path, columns=columns, filters=rows)
                    read += table.num_rows
                    for start in range(0, max(table.num_rows, 1), SCORE_BATCH_ROWS):
                        part = table.slice(start, SCORE_BATCH_ROWS)
                        yield from _scored(
                            model,
                            part.column("source_id").cast(pa.int64()),
                            column_features(part),
                            good_column,
                            threshold,
                        )
                if records is not None:
                    records.add([clock.record(groups[group], rows=read)])

    return session.range(0, len(groups), 1, len(groups)).mapInArrow(score_groups, SCORE_SCHEMA)


def _check_not_all_null(df) -> None:
    from pyspark.sql import functions as F

    row = df.select(
        F.count(F.lit(1)).alias("__rows"), *[F.count(F.col(f)).alias(f) for f in FEATURES]
    ).first()
    if row["__rows"]:
        for name in FEATURES:
            if row[name] == 0:
                raise astro.entirely_null(name, row["__rows"])


_FEATURE_ERROR_RE = re.compile(r"FeatureError: (.+)")


def unwrap_feature_error(exc: BaseException) -> FeatureError | None:
    """The :class:`FeatureError` raised inside a Spark task, recovered from the wrapped trace."""
    match = _FEATURE_ERROR_RE.search(str(exc))
    return FeatureError(match.group(1).strip()) if match else None


def files_for_rows(rows: int, bytes_per_row: int = 17, target_bytes: int = 128 * 2**20) -> int:
    return max(1, math.ceil(rows * bytes_per_row / target_bytes))
