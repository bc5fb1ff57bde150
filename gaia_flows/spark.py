"""The one Spark session factory.

Assets never call ``SparkSession.builder`` themselves: they ask the Spark resource, which asks
this module. Everything local binds to loopback, because Spark otherwise advertises the
machine's outside interface, and nothing here may listen there.
"""

from __future__ import annotations

import os
import sys
import warnings

from dagster_pyspark import LazyPySparkResource
from pyspark.sql import SparkSession

LOOPBACK = "127.0.0.1"

BASE_CONF: dict[str, str] = {
    "spark.driver.host": LOOPBACK,
    "spark.driver.bindAddress": LOOPBACK,
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
    wanted = {**BASE_CONF, **{k: str(v) for k, v in (conf or {}).items()}}
    merged = {**wanted, "spark.master": master, "spark.app.name": app_name}
    if is_local_master(master):
        os.environ["SPARK_LOCAL_IP"] = LOOPBACK
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
