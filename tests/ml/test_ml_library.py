"""The classifier's library code without Dagster or Spark: figures, digests, run parameters,
region sums and the registry's decisions with a stand-in MLflow client."""

import numpy as np
import pytest
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from mlflow.exceptions import MlflowException

from gaia_flows.engine import classify
from gaia_flows.ml import figures, registry, scoring, train
from gaia_flows.science.astrometric import FEATURES


def test_figures_are_bare_and_render_to_png():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    probability = np.clip(labels * 0.6 + rng.random(200) * 0.4, 0, 1)
    drawn = [
        figures.confusion_figure(np.array([[40, 10], [5, 45]])),
        figures.importance_figure({name: 1.0 / (i + 1) for i, name in enumerate(FEATURES)}),
        figures.roc_figure(labels, probability, 0.9),
    ]
    assert all(isinstance(f, Figure) for f in drawn)
    assert plt.get_fignums() == [], "no pyplot state: nothing to close"
    assert all(figures.figure_png(f).startswith(b"\x89PNG") for f in drawn)


def test_importance_table_lists_largest_first():
    table = figures.importance_table({"a": 0.1, "b": 0.7, "c": 0.2})
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["b", "c", "a"]


def test_region_sum_adds_the_pixels_of_one_region():
    level = 3  # 16 level-3 pixels per level-1 region
    n = np.arange(12 * 4**level, dtype=float)
    bad = np.ones_like(n)
    assert scoring.region_sum((n, bad), "hpx1-00", level) == (int(n[:16].sum()), 16)
    assert scoring.region_sum((n, bad), "hpx1-47", level) == (int(n[-16:].sum()), 16)


def test_table_digest_follows_names_and_bytes(tmp_path):
    (tmp_path / "part-0.parquet").write_bytes(b"abc")
    first = train.table_digest(tmp_path)
    assert first == train.table_digest(tmp_path) and len(first) == 16
    (tmp_path / "part-0.parquet").write_bytes(b"abd")
    assert train.table_digest(tmp_path) != first
    (tmp_path / "_region.json").write_text("{}")  # not a data file
    assert train.table_digest(tmp_path) == train.table_digest(tmp_path)


def test_run_params_are_an_explicit_list():
    choice = classify.choose_engine(1000, 8 << 30, 0.25, "sklearn")
    params = train.run_params(
        classify.ForestParams(), choice, 0.5, {"cuts": {"parallax_min_mas": 8.0}, "split_seed": 42}
    )
    assert params["rf_n_estimators"] == classify.ForestParams().n_estimators
    assert (
        params["cut_parallax_min_mas"] == 8.0 and params["split_seed"] == 42 and params["engine"] == "sklearn"
    )
    assert params["features"] == ",".join(FEATURES)


class _Registry:
    """Stand-in for MlflowClient's alias lookup."""

    def __init__(self, champion=None):
        self.champion = champion

    def get_model_version_by_alias(self, name, alias):
        assert (name, alias) == (registry.MODEL_NAME, registry.CHAMPION)
        if self.champion is None:
            raise MlflowException("no alias")
        return self.champion


class _Version:
    version = "4"
    tags = {"population_parallax_min_mas": "10.0"}


def test_the_first_version_is_promoted_without_a_champion():
    decision = registry.champion_gate(
        _Registry(), "1", {"accuracy": 0.9}, None, lambda: None, 0.5, "accuracy", 0.0
    )
    assert decision == registry.GateDecision(True, 0.9, None, None, "1")


def test_resolve_model_pins_the_champion_version_and_its_population():
    assert registry.resolve_model(_Registry(_Version()), None) == (
        f"models:/{registry.MODEL_NAME}/4",
        "4",
        10.0,
    )
    assert registry.resolve_model(_Registry(), "runs:/abc/model") == ("runs:/abc/model", None, 8.0)
    with pytest.raises(registry.NoChampionError, match="materialise astrometric_classifier first"):
        registry.resolve_model(_Registry(), None)
