"""Good vs spurious astrometric solutions, end to end on the synthetic catalogue.

One catalogue (150k sources, seed 7) is generated per module; its hidden truth
(``<landing>/truth/source_truth-7.parquet``) says which solutions are spurious. The training
set is materialised once; each test that trains uses its own MLflow store, so tests do not
depend on each other's order.

Accuracy floor, 0.95: the issue's minimum. The seed reported 0.33 % misclassification on real
DR3 with 500 trees; the generator's quality indicators overlap only in a few per cent of the
sources (binaries, mild spurious fits), so a 20-tree forest lands above 0.99 here and 0.95
leaves room for other seeds without letting a broken selection (labels or features shuffled:
~0.5) or a model that learned only the sky position (~0.7) through.
"""

import json
import os
import socket
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import materialize
from support.astrometric_data import catalogue_frame, publish_synthetic
from support.servers import ServerProcess, free_port
from support.spark import TEST_SPARK_CONF

from gaia_flows.assets.classified_sources import classified_sources
from gaia_flows.assets.classifier import ForestConfig, astrometric_classifier
from gaia_flows.assets.training_set import GcnsCutsConfig, TrainingSetConfig, astrometric_training_set
from gaia_flows.engine import classify
from gaia_flows.layout import StateLayout
from gaia_flows.ml.registry import CHAMPION, MODEL_NAME
from gaia_flows.partitions import range_tags, sky_regions
from gaia_flows.resources.mlflow import SERVER_ENV, MlflowResource, server_command
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource
from gaia_flows.science import astrometric as astro
from gaia_flows.science.astrometric import FEATURES, FeatureError, GcnsCuts
from gaia_flows.warehouse import write_region_arrow

STARS, SEED = 150_000, 7
FLOOR = 0.95
FAST = {"n_estimators": 20}  # the default is 100; 20 trees already separate this catalogue
ASSETS = [astrometric_training_set, astrometric_classifier, classified_sources]
ALL_REGIONS = range_tags(sky_regions.get_partition_keys()[0], sky_regions.get_partition_keys()[-1])


def _store(path) -> MlflowResource:
    path.mkdir(parents=True, exist_ok=True)
    return MlflowResource(
        storage=StorageResource(),
        tracking_uri=f"sqlite:///{path / 'mlflow.db'}",
        artifact_location=(path / "artifacts").as_uri(),
    )


def _resources(store: MlflowResource) -> dict:
    return {
        "spark": SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF),
        "storage": store.storage,
        "mlflow": store,
    }


def _train(store: MlflowResource, raise_on_error=True, **config):
    """The classifier on ``store``; forest hyper-parameters among ``config`` go to its ``forest``."""
    forest = {**FAST, **{k: config.pop(k) for k in list(config) if k in ForestConfig.model_fields}}
    return materialize(
        ASSETS,
        selection=[astrometric_classifier.key],
        resources=_resources(store),
        run_config={"ops": {"astrometric_classifier": {"config": {**config, "forest": forest}}}},
        raise_on_error=raise_on_error,
    )


def _metadata(result, node: str) -> dict:
    [materialization] = result.asset_materializations_for_node(node)
    return {k: v.value for k, v in materialization.metadata.items()}


def _partition_metadata(result, node: str) -> dict[str, dict]:
    return {
        m.partition: {k: v.value for k, v in m.metadata.items()}
        for m in result.asset_materializations_for_node(node)
    }


def _load(store: MlflowResource, uri: str) -> classify.LoadedModel:
    with store.activate():
        return classify.load_model(uri)


def _check(result, name: str):
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    return evaluation


@pytest.fixture(scope="module")
def world(tmp_path_factory, _spark_application):
    """Synthetic gaia_source for every region, the training set materialised from it."""
    home = tmp_path_factory.mktemp("classifier")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GAIA_FLOWS_HOME", str(home / "state"))
        patch.delenv("GAIA_FLOWS_LANDING", raising=False)
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("MLFLOW_REGISTRY_URI", raising=False)
        layout = StateLayout.from_env().ensure()
        truth = publish_synthetic(layout, STARS, SEED)
        result = materialize(
            ASSETS, selection=[astrometric_training_set.key], resources=_resources(_store(home / "unused"))
        )
        yield {
            "layout": layout,
            "home": home,
            "truth": truth,
            "training": result,
            "catalogue": catalogue_frame(layout),
        }


@pytest.fixture(scope="module")
def champion(world, _spark_application):
    """An sklearn model trained, registered as champion, and applied to every region."""
    store = _store(world["home"] / "mlflow-main")
    trained = _train(store)
    classified = materialize(
        ASSETS, selection=[classified_sources.key], resources=_resources(store), tags=ALL_REGIONS
    )
    return {"store": store, "trained": trained, "classified": classified}


# --- training set ------------------------------------------------------------------------------------


def test_training_set_is_the_reference_selection_stored_contiguously(world):
    """Spark's selection equals the pandas reference on the same rows, in one sorted table."""
    layout, catalogue = world["layout"], world["catalogue"]
    table = pq.read_table(layout.table("astrometric_training_set")).to_pandas()
    reference = astro.select_training_set(catalogue[list(astro.TRAINING_COLUMNS)], GcnsCuts(), 0.33, 42)
    assert table["source_id"].tolist() == reference["source_id"].tolist()
    assert (table["label"].to_numpy() == reference["label"].to_numpy()).all()
    assert (table["holdout"].to_numpy() == reference["holdout"].to_numpy()).all()
    assert np.all(np.diff(table["source_id"].to_numpy()) > 0), "one contiguous table in source_id order"
    assert abs(table["holdout"].mean() - 0.33) < 0.03

    metadata = _metadata(world["training"], "astrometric_training_set")
    good, bad = int((table["label"] == 1).sum()), int((table["label"] == 0).sum())
    print(
        f"\ntraining set: {good} good, {bad} bad of {metadata['bad_available']} available; cut flow {metadata['cut_flow']}"
    )
    assert (metadata["good"], metadata["bad"]) == (good, bad)
    assert good > 3000 and bad > 3000, "the generator's nearby population gives both classes"
    assert bad == min(metadata["bad_available"], good), "bad subsampled to the size of the good set"
    assert metadata["cuts"] == GcnsCuts().as_dict()
    assert {"low_latitude", "in_lmc", "bp_rp_excess_inconsistent"} <= set(metadata["cut_flow"])
    # Evidence: the labelling tasks saw every candidate (Spark read the files: its input bytes).
    assert metadata["python_read_rows"] == sum(metadata["cut_flow"].values()) > 0
    assert (
        metadata["python_tasks"] > 0
        and 0 < metadata["task_cpu_seconds"] <= metadata["task_wall_seconds"] * 1.05
    )
    for name in ("good", "bad"):
        assert metadata[f"sky_{name}"].startswith("![Training set")
        assert (layout.maps / f"astrometric_training_set_{name}.png").stat().st_size > 10_000
    assert _check(world["training"], "both_classes_balanced").passed


def test_every_selection_threshold_is_run_config():
    cuts = {
        "parallax_min_mas": 10.0,
        "abs_b_min_deg": 30.0,
        "exclude_magellanic_clouds": False,
        "lmc_radius_deg": 7.0,
        "excess_n_sigma": 3.0,
        "bad_per_good": 0.5,
    }
    assert set(GcnsCuts.__dataclass_fields__) <= set(GcnsCutsConfig.model_fields)
    assert TrainingSetConfig(cuts=GcnsCutsConfig(**cuts)).cuts.to_cuts() == GcnsCuts(**cuts)


def _good_star_at(ra: float, dec: float) -> dict:
    """A candidate that passes every cut but the Magellanic Cloud one (|b| and photometry set good)."""
    return {
        "source_id": 1,
        "ra": ra,
        "dec": dec,
        "l": 280.0,
        "b": -40.0,
        "parallax": 20.0,
        "random_index": 1,
        "astrometric_params_solved": 31,
        "phot_g_mean_mag": 12.0,
        "bp_rp": 1.0,
        "phot_bp_rp_excess_factor": float(astro.excess_factor_expected(1.0)),
    }


@pytest.mark.parametrize(
    "ra, dec, region",
    [(45.0, -60.0, "in_lmc"), (115.0, -78.0, "in_lmc"), (355.0, -78.0, "in_smc"), (35.0, -66.0, "in_smc")],
)
def test_seed_boxes_exclude_stars_the_circles_keep(ra, dec, region):
    """By default the seed's boxes decide: these positions lie inside a box but outside both circles."""
    frame = pd.DataFrame([_good_star_at(ra, dec)])
    circles = GcnsCuts(magellanic_regions="circles")
    assert not any(mask[0] for mask in astro.magellanic_masks([ra], [dec], circles))
    assert list(astro.selection_reason(frame)) == [region]
    assert list(astro.selection_reason(frame, circles)) == ["good"]
    assert list(astro.selection_reason(frame, GcnsCuts(exclude_magellanic_clouds=False))) == ["good"]


def test_box_edges_and_the_smc_box_across_ra_zero():
    lmc, smc = astro.magellanic_masks(
        [40.0, 40.001, 119.999, 80.0, 0.0, 359.0, 349.9, 20.0],
        [-60.0, -60.0, -60.0, -55.0, -70.0, -70.0, -70.0, -64.9],
    )
    assert lmc.tolist() == [False, True, True, False, False, False, False, False]
    assert smc.tolist() == [False, False, False, False, True, True, False, False]
    with pytest.raises(ValueError, match="magellanic_regions must be one of seed_boxes, circles"):
        GcnsCuts(magellanic_regions="squares")


def test_selection_cuts_move_rows_as_configured(world):
    """Each threshold changes the selection in the direction it should (pure function)."""
    frame = world["catalogue"][list(astro.TRAINING_COLUMNS)]
    base = astro.select_training_set(frame)
    good = lambda t: set(t["source_id"][t["label"] == 1])  # noqa: E731
    stricter_b = astro.select_training_set(frame, GcnsCuts(abs_b_min_deg=40.0))
    assert good(stricter_b) < good(base)
    assert (np.abs(frame.set_index("source_id").loc[sorted(good(stricter_b)), "b"]) > 40).all()
    clouds_in = astro.select_training_set(frame, GcnsCuts(exclude_magellanic_clouds=False))
    assert good(clouds_in) > good(base)
    half = astro.select_training_set(frame, GcnsCuts(bad_per_good=0.5))
    assert int((half["label"] == 0).sum()) == round(0.5 * len(good(half)))


# --- classifier: sklearn path, MLflow, registry -----------------------------------------------------


def test_sklearn_model_recovers_the_hidden_truth(world, champion):
    """Hold-out accuracy against the training labels, and against the generator's truth."""
    metadata = _metadata(champion["trained"], "astrometric_classifier")
    assert metadata["engine"] == "sklearn" and "driver memory" in metadata["engine_reason"]
    catalogue = world["catalogue"]
    model = _load(champion["store"], metadata["model"])
    solved = catalogue[catalogue["astrometric_params_solved"].isin(astro.FIVE_OR_SIX_PARAMETER)]
    candidates = solved[np.abs(solved["parallax"]) > 8]
    accuracy = {}
    for name, rows in (("|parallax|>8", candidates), ("all 5/6-parameter", solved)):
        predicted_good = model.good_probability(rows) >= 0.5
        accuracy[name] = float((predicted_good == ~rows["spurious"].to_numpy()).mean())
    print(
        f"\nhold-out accuracy {metadata['holdout_accuracy']:.4f}; vs truth: "
        + ", ".join(
            f"{k} {v:.4f} ({n} rows)" for (k, v), n in zip(accuracy.items(), (len(candidates), len(solved)))
        )
    )
    assert metadata["holdout_accuracy"] >= FLOOR
    assert metadata["holdout_roc_auc"] >= FLOOR
    assert abs(metadata["holdout_misclassification_rate"] - (1 - metadata["holdout_accuracy"])) < 1e-12
    assert accuracy["|parallax|>8"] >= FLOOR
    assert accuracy["all 5/6-parameter"] >= FLOOR


def test_mlflow_run_holds_params_dataset_metrics_artifacts_and_model(world, champion):
    store, metadata = champion["store"], _metadata(champion["trained"], "astrometric_classifier")
    run_id = metadata["mlflow_run_id"]
    assert run_id in metadata["mlflow_run"]
    with store.activate() as client:
        run = client.get_run(run_id)
        assert run.data.params["rf_n_estimators"] == "20" and run.data.params["rf_criterion"] == "gini"
        assert run.data.params["rf_max_features"] == "sqrt" and run.data.params["cut_abs_b_min_deg"] == "25.0"
        for name in ("accuracy", "precision", "recall", "f1", "roc_auc", "misclassification_rate"):
            assert run.data.metrics[name] == pytest.approx(metadata[f"holdout_{name}"])
        datasets = {d.dataset.name: d.dataset for d in run.inputs.dataset_inputs}
        training = datasets["astrometric_training_set"]
        assert training.digest == metadata["training_table_digest"]
        assert str(world["layout"].table("astrometric_training_set").resolve()) in training.source
        plots = {os.path.basename(a.path) for a in client.list_artifacts(run_id, "plots")}
        assert plots == {"confusion_matrix.png", "feature_importances.png", "roc_curve.png"}
        info = mlflow.models.get_model_info(metadata["model"])
        assert [c.name for c in info.signature.inputs.inputs] == list(FEATURES)
        assert {c.type.name for c in info.signature.inputs.inputs} == {"double"}, (
            "nullable: a missing value is NaN"
        )
        assert info.saved_input_example_info is not None
        assert str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version) == "1"
    evaluation = _check(champion["trained"], "not_worse_than_champion")
    assert evaluation.passed and evaluation.metadata["champion_value"].value == "no champion yet"


def test_classified_sources_apply_the_champion_per_region(world, champion):
    layout, catalogue = world["layout"], world["catalogue"]
    per_region = _partition_metadata(champion["classified"], "classified_sources")
    metadata = per_region["hpx1-00"]  # run-level keys are on every region's materialization
    files = sorted(layout.table("classified_sources").glob("hpx*/*.parquet"))
    out = pd.concat([pq.read_table(f).to_pandas() for f in files])
    assert list(out.columns) == ["source_id", "probability", "label"]
    assert len({f.parent.name for f in files}) == 48 and metadata["regions"] == 48
    solved = catalogue["astrometric_params_solved"].isin(astro.FIVE_OR_SIX_PARAMETER)
    candidates = catalogue[solved & (np.abs(catalogue["parallax"]) > 8)].set_index("source_id")
    assert sorted(out["source_id"]) == sorted(candidates.index), "exactly the candidate population"
    assert metadata["run_rows"] == len(out) == sum(m["rows"] for m in per_region.values())
    for region, m in per_region.items():
        assert m["rows"] == int((out["source_id"].to_numpy() >> 57 == int(region[5:])).sum()), region

    model = _load(champion["store"], metadata["model"])  # the same version, scored on the driver
    rows = candidates.loc[out["source_id"]]
    # Spark scores float32 features, the driver float64 ones: the trees compare in float32 either
    # way, so only the order of summing the trees (threads on the driver) may differ.
    np.testing.assert_allclose(
        out["probability"].to_numpy(), model.good_probability(rows.reset_index()), rtol=0, atol=1e-12
    )
    assert ((out["probability"] >= 0.5).astype("int8") == out["label"]).all()
    accuracy = float(((out["label"].to_numpy() == 1) == ~rows["spurious"].to_numpy()).mean())
    print(
        f"\nclassified_sources vs truth over |parallax|>8: accuracy {accuracy:.4f}, fraction bad {metadata['run_fraction_bad']:.3f}"
    )
    assert accuracy >= FLOOR

    # The bad fraction traces crowded fields: far higher near the Galactic plane than at high |b|.
    b = rows["b"].to_numpy()
    bad = out["label"].to_numpy() == 0
    assert bad[np.abs(b) < 10].mean() > 2 * bad[np.abs(b) > 40].mean()
    assert metadata["run_fraction_bad"] == pytest.approx(bad.mean())
    assert metadata["bad_fraction_map"].startswith("![Fraction flagged bad")
    assert (layout.maps / "classified_sources_bad_fraction.png").stat().st_size > 10_000

    # Evidence: the scoring tasks read the region files with pyarrow, which Spark's stage metrics
    # do not see; they report the files' sizes and the rows they scored themselves.
    read = [p for p in layout.table("gaia_source").glob("hpx*/*.parquet")]
    assert metadata["python_read_bytes"] == sum(p.stat().st_size for p in read)
    assert metadata["python_read_files"] == len(read)
    assert metadata["python_read_rows"] == metadata["run_rows"]
    assert 0 < metadata["task_cpu_seconds"] <= metadata["task_wall_seconds"] * 1.05
    assert list(metadata["python_per_host"]) == [socket.gethostname()]


# --- champion gate and determinism -------------------------------------------------------------------


def test_worse_model_does_not_take_the_alias_and_same_seed_gives_same_metrics(world, tmp_path):
    store = _store(tmp_path / "mlflow")
    first = _metadata(_train(store), "astrometric_classifier")

    worse_run = _train(store, n_estimators=1, max_depth=1)
    worse = _metadata(worse_run, "astrometric_classifier")
    gate = _check(worse_run, "not_worse_than_champion")
    assert not gate.passed and not worse["promoted"]
    assert gate.metadata["new_value"].value == pytest.approx(worse["holdout_accuracy"])
    assert gate.metadata["champion_value"].value == pytest.approx(first["holdout_accuracy"])
    assert gate.metadata["champion_version"].value == "1"
    assert worse["holdout_accuracy"] < first["holdout_accuracy"]

    again_run = _train(store)
    again = _metadata(again_run, "astrometric_classifier")
    for name in ("accuracy", "precision", "recall", "f1", "roc_auc"):
        assert again[f"holdout_{name}"] == first[f"holdout_{name}"], name
    assert again["promoted"], "an equal model is not worse, so the alias moves"
    with store.activate() as client:
        assert str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION).version) == "3"
        assert client.get_model_version(MODEL_NAME, "2").tags["champion_gate"] == "kept_previous_champion"


# --- Spark ML path -----------------------------------------------------------------------------------


def test_size_rule_picks_spark_ml_when_the_driver_is_small(world, tmp_path, spark):
    store = _store(tmp_path / "mlflow")
    result = _train(store, n_estimators=10, max_depth=5, driver_memory_gb=0.001)
    metadata = _metadata(result, "astrometric_classifier")
    assert metadata["engine"] == "spark" and ">" in metadata["engine_reason"]
    print(f"\nSpark ML hold-out accuracy {metadata['holdout_accuracy']:.4f}")
    assert metadata["holdout_accuracy"] >= FLOOR
    model = _load(store, metadata["model"])
    assert model.flavor == "spark"
    catalogue = world["catalogue"]
    rows = catalogue[
        catalogue["astrometric_params_solved"].isin(astro.FIVE_OR_SIX_PARAMETER)
        & (np.abs(catalogue["parallax"]) > 8)
    ]
    scored = classify.score(
        spark.createDataFrame(rows[["source_id", *FEATURES]].astype({f: "float64" for f in FEATURES})), model
    ).toPandas()
    truth = rows.set_index("source_id").loc[scored["source_id"], "spurious"].to_numpy()
    assert ((scored["label"].to_numpy() == 1) == ~truth).mean() >= FLOOR


def test_engine_size_rule():
    assert classify.choose_engine(10_000, 8 * 2**30).engine == "sklearn"
    assert classify.choose_engine(100_000_000, 8 * 2**30).engine == "spark"
    assert classify.choose_engine(10, 8 * 2**30, requested="spark").engine == "spark"
    with pytest.raises(ValueError, match="engine"):
        classify.choose_engine(10, 8 * 2**30, requested="xgboost")


# --- malformed input ---------------------------------------------------------------------------------


def test_missing_or_all_null_feature_is_named(world, spark):
    frame = world["catalogue"].head(500)
    model = classify.train_sklearn(
        astro.select_training_set(world["catalogue"]).head(2000), classify.ForestParams(n_estimators=3)
    )
    loaded = classify.LoadedModel("sklearn", model)
    with pytest.raises(FeatureError, match="missing feature column.*ruwe"):
        loaded.good_probability(frame.drop(columns=["ruwe"]))
    with pytest.raises(FeatureError, match="'ipd_frac_odd_win' is entirely null"):
        loaded.good_probability(frame.assign(ipd_frac_odd_win=np.nan))
    with pytest.raises(FeatureError, match="'pmra' is not numeric"):
        loaded.good_probability(frame.assign(pmra="fast"))
    with pytest.raises(FeatureError, match="missing feature column.*astrometric_gof_al"):
        classify.train_sklearn(
            frame.drop(columns=["astrometric_gof_al"]).assign(label=1), classify.ForestParams(n_estimators=3)
        )

    sdf = spark.createDataFrame(frame[["source_id", *FEATURES]].astype({f: "float64" for f in FEATURES}))
    with pytest.raises(FeatureError, match="missing feature column.*pmdec_error"):
        classify.score(sdf.drop("pmdec_error"), loaded)
    from pyspark.sql import functions as F

    with pytest.raises(FeatureError, match="'pmra' is not numeric"):
        classify.score(sdf.withColumn("pmra", F.lit("fast")), loaded)

    with pytest.raises(Exception) as failure:  # raised in a Python worker, arrives wrapped
        classify.score(sdf.withColumn("ruwe", F.lit(None).cast("double")), loaded).collect()
    inner = classify.unwrap_feature_error(failure.value)
    assert inner is not None and "'ruwe' is entirely null" in str(inner)


def test_score_files_names_missing_or_bad_columns_and_selects_the_same_population_as_spark(
    world, spark, tmp_path
):
    """The region-file scoring path (scikit-learn models in classified_sources): the same
    messages as the DataFrame path, and pyarrow's population filter selects exactly the rows
    Spark's selects."""
    frame = world["catalogue"].head(3000)
    model = classify.train_sklearn(
        astro.select_training_set(world["catalogue"]).head(2000), classify.ForestParams(n_estimators=3)
    )
    loaded = classify.LoadedModel("sklearn", model)
    table = pa.Table.from_pandas(frame, preserve_index=False)

    def files(name: str, data: pa.Table) -> list[str]:
        path = tmp_path / name / "part-0.parquet"
        path.parent.mkdir()
        pq.write_table(data, path)
        return [str(path)]

    good = files("good", table)
    for cut in (8.0, None):
        expected = (
            spark.read.parquet(*good)
            .where(classify.population_filter(cut).spark)
            .select("source_id")
            .toPandas()["source_id"]
        )
        scored = classify.score_files(spark, good, loaded, parallax_min=cut).toPandas()
        assert len(expected) > 0 and sorted(scored["source_id"]) == sorted(expected)
    scored = classify.score_files(spark, good, loaded, parallax_min=None).toPandas().set_index("source_id")
    rows = frame.set_index("source_id").loc[scored.index].reset_index()
    np.testing.assert_allclose(
        scored["probability"].to_numpy(), loaded.good_probability(rows), rtol=0, atol=1e-12
    )

    with pytest.raises(FeatureError, match="missing feature column.*pmdec_error"):
        classify.score_files(spark, files("no_pmdec_error", table.drop_columns(["pmdec_error"])), loaded)
    no_parallax = files("no_parallax", table.drop_columns(["parallax"]))
    with pytest.raises(FeatureError, match="no column.*parallax"):
        classify.score_files(spark, no_parallax, loaded, parallax_min=8.0)
    assert (
        classify.score_files(spark, no_parallax, loaded).count() > 0
    )  # all 5/6p: no parallax cut, no parallax needed
    text = table.set_column(table.schema.get_field_index("pmra"), "pmra", pa.array(["fast"] * table.num_rows))
    with pytest.raises(FeatureError, match="'pmra' is not numeric"):
        classify.score_files(spark, files("text_pmra", text), loaded)
    null = table.set_column(
        table.schema.get_field_index("ruwe"), "ruwe", pa.nulls(table.num_rows, pa.float32())
    )
    with pytest.raises(Exception) as failure:  # raised in a Python worker, arrives wrapped
        classify.score_files(spark, files("null_ruwe", null), loaded).collect()
    inner = classify.unwrap_feature_error(failure.value)
    assert inner is not None and "'ruwe' is entirely null" in str(inner)


def test_classified_sources_names_the_bad_column(world, champion, tmp_path):
    """A region whose gaia_source lost a feature fails the run with the column in the message."""
    layout = world["layout"]
    region = "hpx1-20"
    original = pq.read_table(layout.region_dir("gaia_source", region))
    column = original.schema.get_field_index("astrometric_excess_noise")
    try:
        broken = original.set_column(
            column,
            original.schema.field(column),
            pa.nulls(original.num_rows, original.schema.field(column).type),
        )
        write_region_arrow(broken, layout, "gaia_source", region)
        result = materialize(
            ASSETS,
            selection=[classified_sources.key],
            resources=_resources(champion["store"]),
            partition_key=region,
            raise_on_error=False,
        )
        assert not result.success
        [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert "'astrometric_excess_noise' is entirely null" in str(
            failure.event_specific_data.error.to_string()
        )
    finally:
        write_region_arrow(original, layout, "gaia_source", region)


# --- MLflow store and server -------------------------------------------------------------------------


def test_default_store_is_in_the_state_folder_and_env_overrides(layout, monkeypatch):
    resource = MlflowResource(storage=StorageResource())
    assert resource.resolved_tracking_uri() == layout.mlflow_tracking_uri.replace("\\", "/")
    assert resource.resolved_artifact_location() == layout.mlflow_artifacts.as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:secret@127.0.0.1:5999")
    assert resource.resolved_tracking_uri() == "http://user:secret@127.0.0.1:5999"
    assert "secret" not in json.dumps(resource.describe())
    assert resource.resolved_artifact_location() is None, "a server decides where artifacts go"


def _get(base: str, path: str, **query) -> dict:
    with urllib.request.urlopen(f"{base}{path}?{urllib.parse.urlencode(query)}", timeout=10) as response:
        return json.loads(response.read())


def test_mlflow_server_serves_run_metrics_and_registered_model(champion, tmp_path):
    """A real ``mlflow server`` on loopback, on the store the asset wrote, read over REST."""
    metadata = _metadata(champion["trained"], "astrometric_classifier")
    port = free_port()
    server = ServerProcess(
        "mlflow-server", server_command(champion["store"], port=port), log_dir=tmp_path, env=SERVER_ENV
    ).start(port=port, ready_path="/health", timeout=120)
    try:
        base = server.url
        run = _get(base, "/api/2.0/mlflow/runs/get", run_id=metadata["mlflow_run_id"])["run"]
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        assert metrics["accuracy"] == pytest.approx(metadata["holdout_accuracy"])
        assert run["info"]["status"] == "FINISHED"
        history = _get(
            base,
            "/api/2.0/mlflow/metrics/get-history",
            run_id=metadata["mlflow_run_id"],
            metric_key="roc_auc",
        )
        assert history["metrics"][0]["value"] == pytest.approx(metadata["holdout_roc_auc"])
        model = _get(base, "/api/2.0/mlflow/registered-models/get", name=MODEL_NAME)["registered_model"]
        assert {a["alias"]: a["version"] for a in model["aliases"]} == {CHAMPION: "1"}
        version = _get(base, "/api/2.0/mlflow/registered-models/alias", name=MODEL_NAME, alias=CHAMPION)[
            "model_version"
        ]
        assert version["run_id"] == metadata["mlflow_run_id"]
        tags = {t["key"]: t["value"] for t in version["tags"]}
        assert (
            tags["training_table_digest"] == metadata["training_table_digest"]
            and tags["champion_gate"] == "promoted"
        )
    finally:
        server.stop()


# --- the champion served the MLflow way ----------------------------------------------------------------


def test_mlflow_models_serve_scores_the_champion_as_classified_sources_does(world, champion, tmp_path):
    """``mlflow models serve`` on the registry alias, over HTTP on loopback, returns for the same
    rows the probabilities ``classified_sources`` wrote, including for rows with missing
    features (NaN for the forest in both, never a schema error).

    The rows with missing values are made in a copy of one region in a separate state folder,
    so the module's catalogue stays as the other tests expect it."""
    layout, region = world["layout"], "hpx1-08"
    table = pq.read_table(layout.region_dir("gaia_source", region))
    frame = table.to_pandas()
    candidates = np.flatnonzero(
        frame["astrometric_params_solved"].isin(astro.FIVE_OR_SIX_PARAMETER) & (frame["parallax"].abs() > 8)
    )
    holes = {
        candidates[0]: ["ruwe", "pmra"],
        candidates[1]: ["visibility_periods_used"],
    }  # an integer-valued feature too
    holed = frame.copy()
    for index, names in holes.items():
        holed.loc[index, names] = np.nan
    copy = StorageResource(home=str(tmp_path / "state"))
    write_region_arrow(
        pa.Table.from_pandas(holed, schema=table.schema, preserve_index=False),
        copy.layout,
        "gaia_source",
        region,
    )
    materialize(
        ASSETS,
        selection=[classified_sources.key],
        resources={**_resources(champion["store"]), "storage": copy},
        partition_key=region,
    )
    classified = (
        pq.read_table(copy.layout.region_dir("classified_sources", region)).to_pandas().set_index("source_id")
    )
    rows = holed.loc[candidates[:8], ["source_id", *FEATURES]]
    assert rows[list(FEATURES)].isna().any(axis=1).sum() == len(holes)

    port = free_port()
    model = f"models:/{MODEL_NAME}@{CHAMPION}"
    bin_dir = Path(sys.executable).parent  # the server execs uvicorn from PATH
    env = {
        "MLFLOW_TRACKING_URI": champion["store"].resolved_tracking_uri(),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [
        str(bin_dir / "mlflow"),
        "models",
        "serve",
        "-m",
        model,
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    server = ServerProcess("mlflow-models-serve", command, env=env, log_dir=tmp_path).start(
        port=port, ready_path="/ping", timeout=180
    )
    try:
        data = [
            [None if np.isnan(v) else float(v) for v in row]
            for row in rows[list(FEATURES)].to_numpy(dtype="float64")
        ]
        body = json.dumps({"dataframe_split": {"columns": list(FEATURES), "data": data}}).encode()
        request = urllib.request.Request(
            f"{server.url}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = np.asarray(json.loads(response.read())["predictions"])
    finally:
        server.stop()
    assert predictions.shape == (len(rows), 2)
    expected = classified.loc[rows["source_id"], "probability"].to_numpy()
    # Spark tasks score float32 features single-threaded, the server float64 ones with the stored
    # n_jobs: the trees compare in float32 either way, only the order of summing them may differ.
    np.testing.assert_allclose(predictions[:, 1], expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(predictions[:, 0], 1 - expected, rtol=0, atol=1e-12)
