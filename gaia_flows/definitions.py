"""The one ``Definitions`` object: ``dagster dev`` and ``dagster asset materialize -m
gaia_flows.definitions`` load it. The deployment profile (``GAIA_FLOWS_PROFILE``) picks the
resources; the asset graph is the same on every target, once per data release
(:mod:`gaia_flows.releases`)."""

from dagster import (
    AssetChecksDefinition,
    AssetDep,
    AssetsDefinition,
    AssetSelection,
    AssetSpec,
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
from gaia_flows.jobs import catalogue_jobs, teardown_cluster_job
from gaia_flows.releases import RELEASES, Release
from gaia_flows.resources import build_resources
from gaia_flows.schedules import nightly_refresh
from gaia_flows.sensors import idle_cluster_sensor, landing_files_sensor

_release_modules = [
    catalogue,
    proper_motion,
    proper_motion_maps,
    training_set,
    classifier,
    classified_sources,
    hats_catalogue,
]
"""The assets every data release has; ``spark_cluster`` (:mod:`.cluster`) serves them all."""


def release_graph(release: Release) -> tuple[list[AssetsDefinition | AssetSpec], list[AssetChecksDefinition]]:
    """The assets and checks of one release: the plain keys for the default release, else
    every key, dependency and check under the release's prefix (its landing files included),
    in the release's own groups, each asset's definition metadata naming its release."""
    prefix = release.key_prefix or None
    assets = load_assets_from_modules(_release_modules, key_prefix=prefix)
    checks = load_asset_checks_from_modules(_release_modules, asset_key_prefix=prefix)
    landing = catalogue.gaia_landing  # an external asset: the loaders take only definitions

    def in_release(spec: AssetSpec) -> AssetSpec:
        return spec.replace_attributes(
            group_name=release.group(spec.group_name or "default"),
            metadata={**spec.metadata, "release": release.name},
            deps=[
                AssetDep(release.key(landing.key.path[-1]), partition_mapping=dep.partition_mapping)
                if dep.asset_key == landing.key
                else dep
                for dep in spec.deps
            ],
        )

    landing_spec = in_release(landing).replace_attributes(key=release.key(landing.key.path[-1]))
    return [landing_spec, *(item.map_asset_specs(in_release) for item in assets)], list(checks)


_graphs = [release_graph(release) for release in RELEASES.values()]

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
    assets=[*load_assets_from_modules([cluster]), *(a for assets, _ in _graphs for a in assets)],
    asset_checks=[*load_asset_checks_from_modules([cluster]), *(c for _, checks in _graphs for c in checks)],
    jobs=[*catalogue_jobs.values(), teardown_cluster_job],
    schedules=[nightly_refresh],
    sensors=[landing_files_sensor, idle_cluster_sensor, automation_sensor],
    resources=build_resources(),
    # One process per run, so every step of a run shares one Spark application: a cold Spark
    # start (~10 s) per step would cost more than most steps, and Spark already uses every core.
    executor=in_process_executor,
)
