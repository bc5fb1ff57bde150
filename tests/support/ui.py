"""The Dagster UI and the MLflow browser as a person meets them on day one, for the browser tests
(``tests/ui/``) and ``make screenshots`` alike.

:func:`ui_world` builds a state folder much as ``make demo`` leaves it (a small synthetic
catalogue, every region ingested, the maps drawn, the classifier trained and registered as
champion), all through the Python API so no journey waits for it, then starts what a user
starts: ``gaia-flows ui`` (``dagster dev``: the webserver and the daemon that dequeues runs
launched from the UI) and ``gaia-flows mlflow``, each on a free loopback port. The classifier's
metadata links to that MLflow server.

Each ``journey_*`` function is one thing a user does in headless Chromium. It waits for what
the user waits for (Playwright's ``expect`` fails with the page's state when something never
shows), returns what it saw for the test to judge, and saves a screenshot when given a folder.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import materialize
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from gaia_flows import definitions
from gaia_flows.cli import dagster_env, open_instance
from gaia_flows.contracts import load_contract
from gaia_flows.layout import SOURCE_TABLE, StateLayout
from gaia_flows.ml.registry import MODEL_NAME
from gaia_flows.partitions import range_tags, sky_regions
from gaia_flows.resources import build_resources
from gaia_flows.resources.mlflow import MlflowResource
from gaia_flows.resources.spark import SparkResource
from gaia_flows.science.synthetic import generate
from support.servers import ServerProcess, free_port
from support.spark import TEST_SPARK_CONF

STARS, SEED, FILES = 30_000, 5, 8
TREES = 20  # the default forest has 500; 20 trees separate this catalogue
CHROMIUM = "/usr/bin/chromium"  # Debian's, installed by .ci/run; Playwright downloads no browser
VIEWPORT = {"width": 1280, "height": 800}
REGION = "hpx1-07"


@dataclass
class UiWorld:
    layout: StateLayout
    dagster: str  # base URL of the Dagster UI
    mlflow: str  # base URL of the MLflow server

    def region_rows(self, region: str) -> int:
        """Rows of ``gaia_source`` published for ``region``, read from its Parquet footers."""
        return sum(
            pq.read_metadata(p).num_rows
            for p in self.layout.region_dir(SOURCE_TABLE, region).glob("*.parquet")
        )


def materialize_catalogue(layout: StateLayout, mlflow_url: str) -> None:
    """Everything up to the champion model, in the state folder's instance (``classified_sources``
    and the HATS export are left out: no journey opens them)."""
    generate(STARS, SEED, layout.landing, load_contract(), files=FILES, processes=1, progress=False)
    instance = open_instance(layout)
    resources = build_resources()
    resources.update(
        spark=SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF),
        mlflow=MlflowResource(storage=resources["storage"], ui_url=mlflow_url),
    )
    keys = sky_regions.get_partition_keys()
    steps = [
        (["spark_cluster"], {}, {}),  # upstream of everything: the UI asks before a run without it
        (["gaia_source", "pm_stats"], range_tags(keys[0], keys[-1]), {}),
        (
            ["proper_motion_maps", "astrometric_training_set", "astrometric_classifier"],
            {},
            {"ops": {"astrometric_classifier": {"config": {"forest": {"n_estimators": TREES}}}}},
        ),
    ]
    assets = list(definitions.defs.assets)
    for selection, tags, run_config in steps:
        result = materialize(
            assets,
            selection=selection,
            resources=resources,
            instance=instance,
            tags=tags,
            run_config=run_config,
        )
        assert result.success, f"materialising {selection} failed"


@contextlib.contextmanager
def ui_world(home: Path) -> Iterator[UiWorld]:
    """The state folder under ``home`` with the Dagster UI and MLflow serving it; both servers
    are stopped by PID on exit and the environment is restored."""
    gaia_flows = str(Path(sys.executable).with_name("gaia-flows"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("GAIA_FLOWS_HOME", str(home / "state"))
        for name in (
            "GAIA_FLOWS_LANDING",
            "GAIA_FLOWS_PROFILE",
            "MLFLOW_TRACKING_URI",
            "MLFLOW_REGISTRY_URI",
        ):
            env.delenv(name, raising=False)
        layout = StateLayout.from_env().ensure()
        env.setenv("DAGSTER_HOME", dagster_env(layout)["DAGSTER_HOME"])
        mlflow_port, dagster_port = free_port(), free_port()
        mlflow = ServerProcess(
            "mlflow",
            [gaia_flows, "mlflow", "--port", str(mlflow_port)],
            env=dagster_env(layout),
            log_dir=home,
        )
        dagster = ServerProcess(
            "dagster-dev",
            [gaia_flows, "ui", "--port", str(dagster_port)],
            env=dagster_env(layout),
            log_dir=home,
        )
        try:
            # MLflow first: its port goes into the classifier's metadata, and it starts while
            # Spark works. The UI's daemon last: it would ingest what is not yet ingested.
            mlflow.start(port=mlflow_port, ready_path="/health", timeout=120)
            materialize_catalogue(layout, mlflow.url)
            dagster.start(port=dagster_port, ready_path="/server_info", timeout=180)
            yield UiWorld(layout=layout, dagster=dagster.url, mlflow=mlflow.url)
        finally:
            dagster.stop()
            mlflow.stop()


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's Chromium, headless, driven by Playwright."""
    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does this)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield browser
        finally:
            browser.close()


# --- journeys --------------------------------------------------------------------------------------


def open_ui(page: Page, world: UiWorld, path: str) -> None:
    """Go to ``path`` of the Dagster UI; on the instance's first visit, skip the community dialog
    (Dagster remembers the answer in ``$DAGSTER_HOME/.nux/``, so it shows once per instance)."""
    page.goto(world.dagster + path)
    if not (world.layout.dagster_home / ".nux" / "nux.yaml").exists():
        expect(page.get_by_text("Join the Dagster community")).to_be_visible(timeout=30_000)
        page.get_by_role("button", name="Skip").click()
        expect(page.get_by_text("Join the Dagster community")).to_be_hidden()


def shoot(page: Page, shots: Path | None, name: str) -> None:
    """Save the page as the user sees it, after its data requests have settled (at most 5 s: some
    pages poll) and the live status they fetch last has been drawn (3 s)."""
    if shots is not None:
        with contextlib.suppress(PlaywrightTimeoutError):
            page.wait_for_load_state("networkidle", timeout=5_000)
        page.wait_for_timeout(3_000)
        page.screenshot(path=shots / f"{name}.png")


def metadata_table(page: Page) -> dict[str, str]:
    """Key -> shown value of every metadata row on the page (a row's last non-empty cell: the
    asset overview puts a timestamp between key and value)."""
    rows = page.locator("tr").evaluate_all(
        "rows => rows.map(r => [...r.querySelectorAll('td')].map(c => c.innerText.trim()))"
    )
    return {cells[0]: ([c for c in cells[1:] if c] or [""])[-1] for cells in rows if len(cells) >= 2}


def _asset_named(shown: str, names: set[str]) -> str:
    """The asset a graph node stands for: the minimal node view shortens long names in the
    middle (``astrometric_t…_set``)."""
    head, _, tail = shown.partition("…")
    [name] = [n for n in names if n == shown or ("…" in shown and n.startswith(head) and n.endswith(tail))]
    return name


def journey_lineage(
    page: Page, world: UiWorld, names: set[str], shots: Path | None = None
) -> set[tuple[str, str]]:
    """Open ``gaia_source``'s lineage with every group expanded and read the drawn edges.

    The graph is an SVG: each asset is a ``foreignObject`` box, each edge a path from the right
    side of its upstream box to just left of its downstream box. Returns the (upstream,
    downstream) pairs the picture shows."""
    open_ui(page, world, "/assets/gaia_source?view=lineage&lineageScope=neighbors&lineageDepth=4")
    boxes = page.locator("foreignObject:has([class*=assetName])")
    expect(boxes).to_have_count(len(names), timeout=60_000)
    drawn = page.evaluate(
        """() => ({
            boxes: [...document.querySelectorAll('foreignObject')]
                .filter(f => f.querySelector('[class*=assetName]'))
                .map(f => ({name: f.querySelector('[class*=assetName]').textContent,
                            x: +f.getAttribute('x'), y: +f.getAttribute('y'),
                            w: +f.getAttribute('width'), h: +f.getAttribute('height')})),
            edges: [...document.querySelectorAll('path[marker-end]')]
                .map(p => p.getAttribute('d').match(/-?[0-9.]+/g).map(Number)),
        })"""
    )
    shoot(page, shots, "1-asset-lineage")

    def box_at(x: float, y: float, side: str) -> str:
        [name] = [
            b["name"]
            for b in drawn["boxes"]
            if b["y"] <= y <= b["y"] + b["h"]
            and (abs(b["x"] + b["w"] - x) < 1 if side == "right" else 0 <= b["x"] - x < 20)
        ]
        return _asset_named(name, names)

    return {(box_at(d[0], d[1], "right"), box_at(d[-2], d[-1], "left")) for d in drawn["edges"]}


def journey_materialize_region(
    page: Page, world: UiWorld, region: str = REGION, shots: Path | None = None
) -> dict:
    """Open ``gaia_source``'s partitions, pick ``region``, press Materialize and launch; follow
    the run until it ends, then come back to the region. Returns the run's id and final status
    and the region's metadata as shown after the run."""
    open_ui(page, world, "/assets/gaia_source?view=partitions")
    page.get_by_text(region, exact=True).first.click()
    page.get_by_role("button", name="Materialize…").first.click()
    dialog = page.get_by_role("dialog")
    expect(dialog).to_contain_text("Launch runs to materialize gaia_source")
    expect(dialog).to_contain_text("1 partition")
    shoot(page, shots, "2-materialize-region")
    dialog.get_by_role("button", name="Launch 1 run").click()
    expect(dialog).to_be_hidden(timeout=30_000)

    page.goto(world.dagster + "/runs")
    newest = page.locator("[class*=RunsFeedRow_rowGrid]").first  # newest first
    expect(newest).to_contain_text(f"partition: {region}")
    newest.locator("a[href^='/runs/']").first.click()
    page.wait_for_url(re.compile(r"/runs/[0-9a-f-]{36}"))
    run_id = re.search(r"/runs/([0-9a-f-]{36})", page.url).group(1)
    ended = page.get_by_text(re.compile(r"^(Success|Failure|Canceled)$")).first
    expect(ended).to_be_visible(timeout=300_000)
    status = ended.inner_text()

    page.goto(f"{world.dagster}/assets/gaia_source?view=partitions&partition={region}")
    expect(page.get_by_role("link", name=run_id[:8]).first).to_be_visible(timeout=30_000)
    expect(page.get_by_text("rows_accepted", exact=True)).to_be_visible()
    shoot(page, shots, "2-region-materialized")
    return {"run_id": run_id, "status": status, "metadata": metadata_table(page)}


def journey_sky_map(page: Page, world: UiWorld, shots: Path | None = None) -> dict:
    """Open ``proper_motion_maps`` and show the pmra map of its latest materialization. Returns
    the metadata key shown, the image's natural size and the PNG path the metadata names."""
    open_ui(page, world, "/assets/proper_motion_maps")
    row = page.locator("tr", has=page.get_by_text(re.compile(r"^map_pmra_level_\d+$"))).first
    key = row.locator("td").first.inner_text().strip()
    png = metadata_table(page)[key.replace("map_", "png_")]
    row.get_by_text("[Show Markdown]").click()
    image = page.get_by_role("dialog").locator("img")
    expect(image).to_be_visible()
    page.wait_for_function("i => i.complete", arg=image.element_handle())
    size = image.evaluate("i => [i.naturalWidth, i.naturalHeight]")
    shoot(page, shots, "3-sky-map")
    return {"key": key, "natural_size": tuple(size), "png": png, "alt": image.get_attribute("alt")}


def _mlflow_rows(page: Page) -> list[list[str]]:
    return page.locator("[role=row]").evaluate_all(
        "rows => rows.map(r => [...r.querySelectorAll('[role=cell]')].map(c => c.innerText.trim()))"
    )


def journey_model(page: Page, world: UiWorld, shots: Path | None = None) -> dict:
    """Open ``astrometric_classifier``, follow its ``mlflow_run`` link to the MLflow server, read
    the run's metrics, then open the registered model. Returns the Dagster metadata, the URL
    reached, the run page's rows (metrics, then parameters) and the registered model's version
    rows as MLflow shows them."""
    open_ui(page, world, "/assets/astrometric_classifier")
    expect(page.get_by_text("mlflow_run", exact=True)).to_be_visible(timeout=30_000)
    metadata = metadata_table(page)
    with page.context.expect_page() as opened:
        page.locator(f"a[href='{metadata['mlflow_run']}']").first.click()
    mlflow_page = opened.value
    mlflow_page.set_viewport_size(VIEWPORT)
    reached = mlflow_page.url
    expect(mlflow_page.get_by_text(re.compile(r"^Metrics \(\d+\)$"))).to_be_visible(timeout=60_000)
    expect(mlflow_page.get_by_text("holdout_rows", exact=True)).to_be_visible()
    metrics = {cells[0]: cells[1] for cells in _mlflow_rows(mlflow_page) if len(cells) >= 2}
    shoot(mlflow_page, shots, "4-mlflow-run")

    mlflow_page.goto(f"{world.mlflow}/#/models/{MODEL_NAME}")
    expect(mlflow_page.get_by_text(MODEL_NAME, exact=True).first).to_be_visible(timeout=60_000)
    expect(mlflow_page.get_by_text(re.compile(r"^Version \d+$")).first).to_be_visible()
    versions = [" ".join(c for c in cells if c) for cells in _mlflow_rows(mlflow_page)]
    shoot(mlflow_page, shots, "4-mlflow-registry")
    mlflow_page.close()
    return {"metadata": metadata, "url": reached, "metrics": metrics, "versions": versions}
