"""The driver's Python stack, and the check that every worker of a cluster runs the same one.

PySpark pickles functions and Arrow batches between the driver and Python workers on the
nodes; a different Python minor version fails at once, a different pyarrow, numpy, pandas or
scikit-learn can fail late or, worse, compute something slightly different. So at cluster
start ``spark_cluster`` runs one small job whose tasks report the versions their host runs
and fails, naming both versions, on any difference (the node image: ``deployments/node-image``).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from importlib.metadata import version

PACKAGES = ("pyspark", "pyarrow", "numpy", "pandas", "scikit-learn")


class StackMismatch(RuntimeError):
    pass


def local_stack() -> dict[str, str]:
    """Python minor version and the versions of :data:`PACKAGES` in this interpreter."""
    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        **{name: version(name) for name in PACKAGES},
    }


# How long each probe task holds its slot: four waves of them keep a backlog past Spark's
# spark.dynamicAllocation.schedulerBacklogTimeout (1 s), and under dynamic allocation only a
# backlog asks the master for executors on workers that were busy when the application started
# (a cluster grown while a backfill holds its first workers). Tasks that end at once never do,
# and the check would wait for those workers in vain.
PROBE_TASK_SECONDS = 0.5


def _host_stack(_) -> tuple[str, dict[str, str]]:
    # Runs in a Python worker on a node: SPARK_LOCAL_IP is the address its daemon advertises.
    time.sleep(PROBE_TASK_SECONDS)
    return os.environ.get("SPARK_LOCAL_IP") or socket.gethostname(), local_stack()


def worker_stacks(session, hosts: int, timeout: float, poll: float = 1.0) -> dict[str, dict[str, str]]:
    """``{host: stack}`` from tasks spread over the cluster, once ``hosts`` hosts have answered.

    Executors register as their workers start, so the job is repeated (wide enough that every
    executor gets tasks, long enough to keep a backlog: ``PROBE_TASK_SECONDS``) until every
    worker host has run one, or ``timeout`` passes.
    """
    sc = session.sparkContext
    deadline = time.monotonic() + timeout
    found: dict[str, dict[str, str]] = {}
    while True:
        tasks = max(16, 4 * sc.defaultParallelism)
        found.update(dict(sc.parallelize(range(tasks), tasks).map(_host_stack).collect()))
        if len(found) >= hosts or time.monotonic() > deadline:
            return found
        time.sleep(poll)


def mismatches(driver: dict[str, str], workers: dict[str, dict[str, str]]) -> list[str]:
    """One line per worker package whose version differs from the driver's."""
    return [
        f"worker {host}: {name} {stack.get(name, 'missing')} (driver {wanted})"
        for host, stack in sorted(workers.items())
        for name, wanted in driver.items()
        if stack.get(name) != wanted
    ]


def check_cluster(session, hosts: int, timeout: float) -> dict[str, dict[str, str]]:
    """Every worker's stack equals the driver's, else :class:`StackMismatch` naming both."""
    driver = local_stack()
    workers = worker_stacks(session, hosts, timeout)
    if len(workers) < hosts:
        raise StackMismatch(
            f"only {len(workers)} of {hosts} worker hosts ran a task within {timeout:.0f}s: {sorted(workers)}"
        )
    wrong = mismatches(driver, workers)
    if wrong:
        raise StackMismatch(
            "nodes do not run the driver's stack (rebuild the node image, deployments/node-image):\n"
            + "\n".join(wrong)
        )
    return workers
