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
    asset_check,
    in_process_executor,
    load_asset_checks_from_modules,
    load_assets_from_modules,
    multi_asset,
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
from gaia_flows.jobs import release_catalogue_job, resize_cluster_job, teardown_cluster_job
from gaia_flows.releases import RELEASES, Release
from gaia_flows.resources import build_resources
from gaia_flows.schedules import nightly_refresh
from gaia_flows.sensors import build_landing_files_sensor, cluster_sensor

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


def release_graph(release: Release) -> tuple[list[AssetsDefinition], list[AssetChecksDefinition]]:
    """The assets and checks of one release: the plain keys for the default release, else
    every key, dependency and check under the release's prefix (the landing files it depends
    on included: ``dr4/gaia_landing``), in the release's own groups, each asset's definition
    metadata naming its release.

    The loaders prefix keys but keep op names (dagster-io/dagster#12406), and one job cannot
    hold two ops of one name, so a further release's assets and checks are declared again
    from the same functions under ops named after their keys (``dr4__gaia_source``; run
    config goes under that name).
    """
    prefix = release.key_prefix or None
    assets = load_assets_from_modules(_release_modules, key_prefix=prefix)
    checks = load_asset_checks_from_modules(_release_modules, asset_key_prefix=prefix)
    if prefix:
        assets = [_own_op(item) for item in assets]
        checks = [_own_check_op(item) for item in checks]
    landing = catalogue.gaia_landing.key  # external: the loaders prefix only what they load

    def in_release(spec: AssetSpec) -> AssetSpec:
        return spec.replace_attributes(
            group_name=release.group(spec.group_name or "default"),
            metadata={**spec.metadata, "release": release.name},
            deps=[
                AssetDep(release.key(landing.path[-1]), partition_mapping=dep.partition_mapping)
                if dep.asset_key == landing
                else dep
                for dep in spec.deps
            ],
        )

    return [item.map_asset_specs(in_release) for item in assets], list(checks)


def _own_op(assets_def: AssetsDefinition) -> AssetsDefinition:
    """``assets_def`` (one asset) with an op named after its key."""
    [spec] = assets_def.specs
    return multi_asset(
        name=spec.key.to_python_identifier(),
        specs=[spec],
        check_specs=list(assets_def.check_specs),
        partitions_def=spec.partitions_def,
        backfill_policy=assets_def.backfill_policy,
        pool=assets_def.op.pool,
    )(assets_def.op.compute_fn.decorated_fn)


def _own_check_op(checks_def: AssetChecksDefinition) -> AssetChecksDefinition:
    """``checks_def`` (one check) with an op named after its asset's key and its name."""
    [spec] = checks_def.check_specs
    return asset_check(
        asset=spec.asset_key, name=spec.name, description=spec.description, blocking=spec.blocking
    )(checks_def.op.compute_fn.decorated_fn)


# Declarative automation (the assets' `AutomationCondition.eager()`) only acts while a sensor
# evaluates it; Dagster's implicit default sensor starts STOPPED. Declared here, RUNNING, so new
# landing files flow on to pm_stats, the maps and classified_sources with the daemon alone.
automation_sensor = AutomationConditionSensorDefinition(
    "automation_sensor",
    target=AssetSelection.all(),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)


def build_definitions(releases: tuple[Release, ...]) -> Definitions:
    """The platform for ``releases``: their asset graphs beside ``spark_cluster``, a catalogue
    job each, the schedule, and the sensors."""
    graphs = [release_graph(release) for release in releases]
    return Definitions(
        assets=[*load_assets_from_modules([cluster]), *(a for assets, _ in graphs for a in assets)],
        asset_checks=[
            *load_asset_checks_from_modules([cluster]),
            *(c for _, checks in graphs for c in checks),
        ],
        jobs=[
            *(release_catalogue_job(release) for release in releases),
            resize_cluster_job,
            teardown_cluster_job,
        ],
        schedules=[nightly_refresh],
        sensors=[build_landing_files_sensor(releases), cluster_sensor, automation_sensor],
        resources=build_resources(),
        # One process per run, so every step of a run shares one Spark application: a cold Spark
        # start (~10 s) per step would cost more than most steps, and Spark already uses every core.
        executor=in_process_executor,
    )


defs = build_definitions(tuple(RELEASES.values()))
