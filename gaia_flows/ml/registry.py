"""The MLflow model registry side: logging a trained forest as a registered version, the
``champion`` alias and the gate that moves it only when a new version is not worse."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from gaia_flows.engine import classify
from gaia_flows.science import astrometric as astro
from gaia_flows.science.astrometric import FEATURES, GcnsCuts

MODEL_NAME = "astrometric-quality-rf"
"""The registered model of the default data release; another release's is
``<MODEL_NAME>-<release>`` (:attr:`gaia_flows.releases.Release.model_name`)."""
CHAMPION = "champion"


class NoChampionError(LookupError):
    """No registered version carries the champion alias yet."""


def log_model(
    trained: classify.LoadedModel,
    holdout: pd.DataFrame,
    probability: np.ndarray,
    model_name: str = MODEL_NAME,
):
    """Log (and register as ``model_name``) the model with its signature and a five-row input
    example, in the active MLflow run; returns MLflow's ``ModelInfo``."""
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
            registered_model_name=model_name,
            pyfunc_predict_fn="predict_proba",
            serialization_format=mlflow_lib.sklearn.SERIALIZATION_FORMAT_SKOPS,
            skops_trusted_types=classify.SKOPS_TRUSTED_TYPES,
            pip_requirements=[
                f"mlflow=={mlflow_lib.__version__}",
                f"scikit-learn=={sklearn.__version__}",
                f"numpy=={np.__version__}",
                f"pandas=={pd.__version__}",
            ],
        )
    import mlflow.spark
    import pyspark

    signature = classify.model_signature(example, pd.DataFrame({"probability": probability[:5]}))
    return mlflow.spark.log_model(
        trained.model,
        "model",
        signature=signature,
        input_example=example,
        registered_model_name=model_name,
        pip_requirements=[f"mlflow=={mlflow_lib.__version__}", f"pyspark=={pyspark.__version__}"],
    )


def current_champion(client, model_name: str = MODEL_NAME):
    """The version of ``model_name`` the ``champion`` alias points at, or ``None``."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        return None


@dataclass(frozen=True)
class GateDecision:
    """The champion gate's numbers: the new version's and the champion's value of the metric."""

    promoted: bool
    new_value: float
    champion_value: float | None
    champion_before: str | None
    champion_after: str


def champion_gate(
    client,
    version: str,
    metrics: dict,
    holdout: pd.DataFrame,
    session: Callable,
    threshold: float,
    metric: str,
    tolerance: float,
    model_name: str = MODEL_NAME,
) -> GateDecision:
    """Score the current champion on the same hold-out; promote ``version`` if not worse.

    Parameters
    ----------
    client
        An ``MlflowClient`` of the tracking server that holds the registry.
    version
        The newly registered version of ``model_name``.
    metrics
        The new version's hold-out metrics (:func:`gaia_flows.science.astrometric.classification_metrics`).
    holdout
        The hold-out rows (features and ``label``) both versions are scored on.
    session
        Returns a Spark session, called only if the champion is a Spark model.
    threshold, metric, tolerance
        Probability threshold of a good solution, the metric compared, and how much worse
        than the champion the new version may be and still be promoted.
    model_name
        The registered model (one per data release).

    Returns
    -------
    GateDecision
        Whether ``version`` becomes the champion, with both values.
    """
    champion = current_champion(client, model_name)
    new_value = float(metrics[metric])
    if champion is None:
        return GateDecision(
            promoted=True,
            new_value=new_value,
            champion_value=None,
            champion_before=None,
            champion_after=version,
        )
    loaded = classify.load_model(f"models:/{model_name}/{champion.version}", champion.version)
    champion_probability = loaded.good_probability(
        holdout, spark=session() if loaded.flavor == "spark" else None
    )
    champion_value = float(
        astro.classification_metrics(holdout["label"], champion_probability, threshold)[metric]
    )
    promoted = bool(new_value >= champion_value - tolerance)
    return GateDecision(
        promoted=promoted,
        new_value=new_value,
        champion_value=champion_value,
        champion_before=str(champion.version),
        champion_after=version if promoted else str(champion.version),
    )


def resolve_model(
    client, model_uri: str | None, model_name: str = MODEL_NAME
) -> tuple[str, str | None, float]:
    """``(uri, version, population parallax threshold)`` of the model to apply: ``model_uri``
    if given, else a fixed ``models:/<model_name>/<version>`` of the current champion, so a
    whole run uses one version even if the alias moves meanwhile.

    Raises
    ------
    NoChampionError
        ``model_uri`` is ``None`` and no version is the champion yet.
    """
    default_min = GcnsCuts().parallax_min_mas
    if model_uri:
        return model_uri, None, default_min
    champion = current_champion(client, model_name)
    if champion is None:
        raise NoChampionError(
            f"no model version of {model_name!r} carries the alias '{CHAMPION}': materialise astrometric_classifier first"
        )
    population_min = float(champion.tags.get("population_parallax_min_mas", default_min))
    return f"models:/{model_name}/{champion.version}", str(champion.version), population_min
