"""The one ``Definitions`` object: ``dagster dev`` and ``dagster asset materialize -m
gaia_flows.definitions`` load it. The deployment profile (``GAIA_FLOWS_PROFILE``) picks the
resources; the asset graph is the same on every target."""

from dagster import (
    AssetSelection,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    in_process_executor,
    load_asset_checks_from_modules,
    load_assets_from_modules,
)

from gaia_flows.assets import (
    catalogue,
    classified_sources,
    classifier,
    cluster,
    hats_catalogue,
    proper_motion,
    proper_motion_maps,
    training_set,
)
from gaia_flows.jobs import catalogue_job, resize_cluster_job, teardown_cluster_job
from gaia_flows.resources import build_resources
from gaia_flows.schedules import nightly_refresh
from gaia_flows.sensors import cluster_sensor, landing_files_sensor

_modules = [
    cluster,
    catalogue,
    proper_motion,
    proper_motion_maps,
    training_set,
    classifier,
    classified_sources,
    hats_catalogue,
]

# Declarative automation (the assets' `AutomationCondition.eager()`) only acts while a sensor
# evaluates it; Dagster's implicit default sensor starts STOPPED. Declared here, RUNNING, so new
# landing files flow on to pm_stats, the maps and classified_sources with the daemon alone.
automation_sensor = AutomationConditionSensorDefinition(
    "automation_sensor",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)

defs = Definitions(
    assets=load_assets_from_modules(_modules),
    asset_checks=load_asset_checks_from_modules(_modules),
    jobs=[catalogue_job, resize_cluster_job, teardown_cluster_job],
    schedules=[nightly_refresh],
    sensors=[landing_files_sensor, cluster_sensor, automation_sensor],
    resources=build_resources(),
    # One process per run, so every step of a run shares one Spark application: a cold Spark
    # start (~10 s) per step would cost more than most steps, and Spark already uses every core.
    executor=in_process_executor,
)
