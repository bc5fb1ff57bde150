"""The one Spark session factory.

Assets never call ``SparkSession.builder`` themselves: they ask the Spark resource, which asks
this module. A local master (``local[*]``, a standalone master on loopback) gets a driver bound
to loopback, because Spark otherwise advertises the machine's outside interface and nothing
local may listen there. A cluster master gets no such default: its driver must advertise an
address the executors on other hosts can reach, which the ``spark_cluster`` manifest (or the
profile's ``spark.conf``) supplies.
"""

from __future__ import annotations

import os
import sys
import warnings

from dagster_pyspark import LazyPySparkResource
from pyspark.sql import SparkSession

LOOPBACK = "127.0.0.1"

LOOPBACK_CONF: dict[str, str] = {"spark.driver.host": LOOPBACK, "spark.driver.bindAddress": LOOPBACK}

BASE_CONF: dict[str, str] = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
    "spark.sql.parquet.compression.codec": "zstd",
    "spark.ui.showConsoleProgress": "false",
}


def is_local_master(master: str) -> bool:
    return master.startswith("local") or "127.0.0.1" in master or "localhost" in master


def session(master: str, conf: dict[str, str] | None = None, app_name: str = "gaia-flows") -> SparkSession:
    """A session on ``master``, reusing the live one when it already points there.

    ``getOrCreate`` silently returns a session on the *old* master if one exists, so a change
    of master (local -> standalone cluster) stops the old session first. A reused session gets
    the requested settings that Spark can change at run time (``spark.sql.*``); the others
    (driver memory, executor shape) are fixed when the application starts, so a differing value
    raises a warning naming the keys instead of being dropped silently.
    """
    local = is_local_master(master)
    wanted = {**(LOOPBACK_CONF if local else {}), **BASE_CONF, **{k: str(v) for k, v in (conf or {}).items()}}
    if master.startswith("spark://") and not local and "spark.driver.host" not in wanted:
        raise ValueError(
            f"Spark master {master} is on another host: set spark.driver.host to the address its executors can call back "
            "(spark_cluster's manifest does, from the profile's cloud.network.orchestrator_cidr)"
        )
    merged = {**wanted, "spark.master": master, "spark.app.name": app_name}
    if local:
        os.environ["SPARK_LOCAL_IP"] = LOOPBACK
    elif os.environ.get("SPARK_LOCAL_IP", "").startswith("127."):
        # Inherited from a laptop default (``gaia-flows ui`` sets it for local runs): the
        # driver's web UI would bind to loopback while Spark advertises spark.driver.host, and
        # its REST API, which engine.metrics.stage_io reads, would refuse every request.
        del os.environ["SPARK_LOCAL_IP"]
    if "spark.pyspark.python" in wanted:
        # PySpark ships the interpreter path with every task: the executors' own, on their hosts.
        os.environ["PYSPARK_PYTHON"] = wanted["spark.pyspark.python"]
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    active = SparkSession.getActiveSession()
    if active is not None:
        if active.sparkContext.master == master:
            _apply_to_live(active, wanted)
            return active
        active.stop()
    return LazyPySparkResource(spark_config=merged).spark_session


def _apply_to_live(active: SparkSession, wanted: dict[str, str]) -> None:
    fixed = []
    for key, value in wanted.items():
        if active.conf.get(key, None) == value:
            continue
        if active.conf.isModifiable(key):
            active.conf.set(key, value)
        else:
            fixed.append(key)
    if fixed:
        # Keys only: a value may be a credential.
        warnings.warn(
            f"the live Spark application on {active.sparkContext.master} keeps its own values of {sorted(fixed)}; "
            "they are fixed at start-up and apply from the next run process (or after stop_active())",
            RuntimeWarning,
            stacklevel=3,
        )


def stop_active() -> None:
    active = SparkSession.getActiveSession()
    if active is not None:
        active.stop()
