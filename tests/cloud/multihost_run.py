"""The Dagster run on the orchestrator host of a multi-host test (tests/cloud/test_multihost.py).

Runs in the orchestrator's network namespace, as a run worker would: it materialises assets
with the resources the profile gives (``build_resources``), so the Spark driver lives here and
reaches the cluster only through the bridge. Steps, in order, from ``--steps``:

- ``cluster``: ``spark_cluster`` (which waits until every worker runs the driver's stack);
- ``catalogue``: ``gaia_source`` and ``pm_stats`` over ``--regions`` (one single-run backfill);
- ``pm_stats``: ``pm_stats`` alone over ``--regions`` again (what a benchmark times);
- ``maps``: ``proper_motion_maps``;
- ``classify``: ``astrometric_training_set`` and ``astrometric_classifier`` (tracked in the
  profile's MLflow), then ``classified_sources`` for the first of ``--regions``;
- ``tick``: one evaluation of ``cluster_sensor`` against the instance, and the run it asks
  for (``resize_cluster`` or ``teardown_cluster``) executed with the request's config and tags,
  as the daemon would launch it;
- ``teardown``: the ``teardown_cluster`` job.

The instance is persistent, in the state folder's ``dagster/``: the runs of one process are the
history the next process's ``tick`` reads, and a ``tick`` during a run sees that run going.

Writes ``--out`` (JSON): per step its success, wall seconds and what the test checks (the
driver's settings, the executors' hosts). Exit status 0 only if every step succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from dagster import DagsterInstance, build_sensor_context, materialize

from gaia_flows import spark as spark_factory
from gaia_flows.assets.catalogue import gaia_landing, gaia_source
from gaia_flows.assets.classified_sources import classified_sources
from gaia_flows.assets.classifier import astrometric_classifier
from gaia_flows.assets.cluster import spark_cluster
from gaia_flows.assets.proper_motion import pm_stats
from gaia_flows.assets.proper_motion_maps import proper_motion_maps
from gaia_flows.assets.training_set import astrometric_training_set
from gaia_flows.jobs import resize_cluster_job, teardown_cluster_job
from gaia_flows.layout import StateLayout
from gaia_flows.partitions import sky_regions
from gaia_flows.profiles import load_profile
from gaia_flows.resources import build_resources
from gaia_flows.sensors import cluster_sensor

# The forest the classify step trains (and the test's local run): 20 trees separate the
# synthetic catalogue already; the default 500 would only cost time.
CLASSIFIER_CONFIG = {"forest": {"n_estimators": 20}}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--profile", required=True)
    parser.add_argument("--profiles-dir", required=True)
    parser.add_argument("--steps", required=True)
    parser.add_argument("--regions", default="all")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--size", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    resources = build_resources(load_profile(args.profile, Path(args.profiles_dir)))
    regions = sky_regions.get_partition_keys() if args.regions == "all" else args.regions.split(",")
    dagster_home = StateLayout.from_env().dagster_home
    dagster_home.mkdir(parents=True, exist_ok=True)
    instance = DagsterInstance.local_temp(str(dagster_home))
    out: dict = {}
    tags = {  # one single-run backfill over the regions
        "dagster/asset_partition_range_start": regions[0],
        "dagster/asset_partition_range_end": regions[-1],
    }

    def save():
        Path(args.out).write_text(json.dumps(out, indent=2, default=str))

    try:
        for step in args.steps.split(","):
            started = time.perf_counter()
            if step == "cluster":
                config = {"workers": args.workers, "size": args.size, "data_bytes": 2**30}
                result = materialize(
                    [spark_cluster],
                    resources=resources,
                    run_config={"ops": {"spark_cluster": {"config": config}}},
                    instance=instance,
                )
                (event,) = result.asset_materializations_for_node("spark_cluster")
                out["cluster"] = {
                    "success": result.success,
                    "metadata": {k: v.value for k, v in event.metadata.items()},
                }
            elif step == "catalogue":
                result = materialize(
                    [spark_cluster, gaia_landing, gaia_source, pm_stats],
                    selection=[gaia_source.key, pm_stats.key],
                    resources=resources,
                    tags=tags,
                    instance=instance,
                )
                session = resources["spark"].session()
                hosts = sorted(
                    set(
                        session.sparkContext.parallelize(range(16), 16)
                        .map(lambda _: os.environ.get("SPARK_LOCAL_IP"))
                        .collect()
                    )
                )
                conf = dict(session.sparkContext.getConf().getAll())
                out["catalogue"] = {
                    "success": result.success,
                    "master": session.sparkContext.master,
                    "driver": {
                        k: conf.get(k)
                        for k in (
                            "spark.driver.host",
                            "spark.driver.port",
                            "spark.blockManager.port",
                            "spark.authenticate",
                            "spark.network.crypto.enabled",
                        )
                    },
                    "task_hosts": hosts,
                    "evidence": {  # the run-level figures, on every region's materialization
                        node: {
                            k: v.value
                            for k, v in result.asset_materializations_for_node(node)[0].metadata.items()
                            if k in ("python_per_host", "spark_per_host", "python_read_bytes")
                        }
                        for node in ("gaia_source", "pm_stats")
                    },
                }
            elif step == "pm_stats":
                result = materialize(
                    [gaia_source, pm_stats],
                    selection=[pm_stats.key],
                    resources=resources,
                    tags=tags,
                    instance=instance,
                )
                out["pm_stats"] = {"success": result.success}
            elif step == "maps":
                result = materialize(
                    [pm_stats, proper_motion_maps],
                    selection=[proper_motion_maps.key],
                    resources=resources,
                    instance=instance,
                )
                out["maps"] = {"success": result.success}
            elif step == "classify":
                graph = [gaia_source, astrometric_training_set, astrometric_classifier, classified_sources]
                trained = materialize(
                    graph,
                    selection=[astrometric_training_set.key, astrometric_classifier.key],
                    resources=resources,
                    instance=instance,
                    run_config={"ops": {"astrometric_classifier": {"config": CLASSIFIER_CONFIG}}},
                )
                classified = materialize(
                    graph,
                    selection=[classified_sources.key],
                    partition_key=regions[0],
                    resources=resources,
                    instance=instance,
                )
                (model,) = trained.asset_materializations_for_node("astrometric_classifier")
                out["classify"] = {
                    "success": trained.success and classified.success,
                    "classifier": {
                        k: v.value
                        for k, v in model.metadata.items()
                        if k.startswith("mlflow_") or k == "model_version"
                    },
                }
            elif step == "tick":
                out["tick"] = tick(instance, resources)
            elif step == "teardown":
                spark_factory.stop_active()
                result = teardown_cluster_job.execute_in_process(
                    resources={"cloud": resources["cloud"]}, instance=instance
                )
                out["teardown"] = {
                    "success": result.success,
                    "summary": result.output_for_node("teardown_cluster_nodes"),
                }
            else:
                raise SystemExit(f"unknown step {step!r}")
            out[step]["seconds"] = round(time.perf_counter() - started, 2)
            save()
            if not out[step]["success"]:
                return 1
    except Exception:
        out["error"] = traceback.format_exc()
        save()
        return 1
    return 0


def tick(instance: DagsterInstance, resources: dict) -> dict:
    """``cluster_sensor`` once, then the run it requests, in this process."""
    with build_sensor_context(instance=instance, resources={"cloud": resources["cloud"]}) as context:
        result = cluster_sensor.evaluate_tick(context)
    if not result.run_requests:
        return {"success": True, "skip": result.skip_message}
    (request,) = result.run_requests
    out = {"job": request.job_name, "tags": request.tags}
    if request.job_name == resize_cluster_job.name:
        run = materialize(
            [spark_cluster],
            resources=resources,
            run_config=request.run_config,
            tags=request.tags,
            instance=instance,
        )
        (event,) = run.asset_materializations_for_node("spark_cluster")
        out["metadata"] = {k: v.value for k, v in event.metadata.items()}
    else:
        run = teardown_cluster_job.execute_in_process(
            resources={"cloud": resources["cloud"]}, instance=instance, tags=request.tags
        )
        out["summary"] = run.output_for_node("teardown_cluster_nodes")
    return {**out, "success": run.success}


if __name__ == "__main__":
    sys.exit(main())
