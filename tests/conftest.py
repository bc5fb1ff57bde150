"""Shared fixtures: one local Spark session for the whole suite (a cold start costs ~10 s),
and a fresh state folder per test."""

from __future__ import annotations

import pytest

from gaia_flows import spark as spark_factory
from gaia_flows.layout import StateLayout

TEST_SPARK_CONF = {
    "spark.ui.enabled": "false",
    "spark.sql.shuffle.partitions": "4",
    "spark.default.parallelism": "2",
    "spark.driver.memory": "2g",
}


@pytest.fixture(scope="session")
def spark():
    session = spark_factory.session("local[2]", TEST_SPARK_CONF)
    yield session
    spark_factory.stop_active()


@pytest.fixture
def layout(tmp_path, monkeypatch) -> StateLayout:
    monkeypatch.setenv("GAIA_FLOWS_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("GAIA_FLOWS_LANDING", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return StateLayout.from_env().ensure()
