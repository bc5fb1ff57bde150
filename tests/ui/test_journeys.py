"""The day-one journeys through the Dagster UI and the MLflow browser, clicked in headless
Chromium (Playwright driving Debian's ``/usr/bin/chromium``) against the real servers
``gaia-flows ui`` and ``gaia-flows mlflow`` start. One state folder and one pair of servers
serve the whole module (``support.ui.ui_world``); the journey that launches a run goes last,
so the automation it sets off does not change what the others read."""

import re

import pytest
from PIL import Image
from support.ui import (
    REGION,
    VIEWPORT,
    chromium,
    journey_lineage,
    journey_materialize_region,
    journey_model,
    journey_sky_map,
    ui_world,
)

from gaia_flows.definitions import defs
from gaia_flows.ml.registry import CHAMPION, MODEL_NAME

pytestmark = pytest.mark.ui


@pytest.fixture(scope="module")
def world(tmp_path_factory, _spark_application):
    with ui_world(tmp_path_factory.mktemp("ui")) as world:
        yield world


@pytest.fixture(scope="module")
def browser():
    with chromium() as browser:
        yield browser


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT)
    yield context.new_page()
    context.close()


def test_asset_graph_draws_the_lineage(world, page):
    graph = defs.resolve_asset_graph()
    names = {key.to_user_string() for key in graph.materializable_asset_keys}
    edges = journey_lineage(page, world, names)
    chains = [
        ["spark_cluster", "gaia_source", "pm_stats", "proper_motion_maps"],
        ["gaia_source", "astrometric_training_set", "astrometric_classifier", "classified_sources"],
    ]
    for chain in chains:
        assert set(zip(chain, chain[1:])) <= edges, f"{chain} not drawn; the graph shows {sorted(edges)}"
    dependencies = {
        (parent.to_user_string(), key.to_user_string())
        for key in graph.materializable_asset_keys
        for parent in graph.get(key).parent_keys
    }
    assert edges <= dependencies, f"edges drawn that Definitions do not declare: {edges - dependencies}"


def test_sky_map_image_loads_in_the_latest_materialization(world, page):
    shown = journey_sky_map(page, world)
    width, height = shown["natural_size"]
    assert width > 0 and height > 0, f"{shown['key']}: the image did not load"
    with Image.open(shown["png"]) as png:
        assert abs(width / height - png.width / png.height) < 0.01, (
            f"the embedded map ({width}x{height}) is not the drawn {shown['png']} ({png.width}x{png.height})"
        )
    assert shown["alt"] == shown["key"].removeprefix("map_")


def test_mlflow_link_leads_to_the_run_metrics_and_the_champion(world, page):
    seen = journey_model(page, world)
    dagster, mlflow = seen["metadata"], seen["metrics"]
    assert seen["url"].startswith(world.mlflow) and dagster["mlflow_run_id"] in seen["url"]
    assert mlflow["holdout_rows"] == dagster["holdout_rows"]
    assert float(mlflow["accuracy"]) == pytest.approx(float(dagster["holdout_accuracy"]), abs=1e-3)
    assert float(mlflow["roc_auc"]) == pytest.approx(float(dagster["holdout_roc_auc"]), abs=1e-3)
    [version] = [v for v in seen["versions"] if v.startswith(f"Version {dagster['champion_version']}")]
    assert re.search(rf"@\s{CHAMPION}\b", version), f"{MODEL_NAME}: no {CHAMPION} alias in {version!r}"


def test_materialize_a_region_from_the_ui(world, page):
    rows = world.region_rows(REGION)
    seen = journey_materialize_region(page, world, REGION)
    assert seen["status"] == "Success", f"run {seen['run_id']} ended {seen['status']}"
    shown = seen["metadata"]
    assert (shown["rows_in"], shown["rows_accepted"], shown["rows_rejected"]) == (str(rows), str(rows), "0")
    assert world.region_rows(REGION) == rows
