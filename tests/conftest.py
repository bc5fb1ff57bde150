"""Shared fixtures: one local Spark application reused across the suite (a cold start costs
~10 s), a real standalone cluster on loopback for the tests that need one, and a fresh state
folder per test."""

from __future__ import annotations

import pytest
from support.spark import TEST_SPARK_CONF

from gaia_flows import spark as spark_factory
from gaia_flows.cloud.local_spark import LocalSparkCluster
from gaia_flows.layout import StateLayout


@pytest.fixture(scope="session")
def _spark_application():
    yield
    spark_factory.stop_active()


@pytest.fixture
def spark(_spark_application):
    """The local[2] session; re-created only if a cluster test switched the master away."""
    return spark_factory.session("local[2]", TEST_SPARK_CONF)


@pytest.fixture(scope="session")
def standalone_cluster(tmp_path_factory):
    """A real Spark standalone master and two workers on 127.0.0.1, stopped by PID at the end."""
    with LocalSparkCluster(
        workers=2, cores=1, memory_mb=1024, log_dir=tmp_path_factory.mktemp("spark-cluster")
    ) as cluster:
        yield cluster


@pytest.fixture
def cluster_spark(standalone_cluster, _spark_application):
    """A session on the standalone cluster (the local session is stopped while it is in use)."""
    # Explicit executor shape: the JVM keeps the first session's conf as defaults, and an earlier
    # test's planned shape (e.g. 2 cores per executor) would not fit these 1-core workers.
    conf = {
        **TEST_SPARK_CONF,
        "spark.ui.enabled": "true",
        "spark.executor.memory": "768m",
        "spark.executor.cores": "1",
        "spark.cores.max": "2",
    }
    return spark_factory.session(standalone_cluster.master_url, conf)


@pytest.fixture
def layout(tmp_path, monkeypatch) -> StateLayout:
    monkeypatch.setenv("GAIA_FLOWS_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("GAIA_FLOWS_LANDING", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return StateLayout.from_env().ensure()
