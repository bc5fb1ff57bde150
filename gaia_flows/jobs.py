"""Named jobs a person launches from the UI, a schedule or a sensor."""

from dagster import AssetSelection, define_asset_job

from gaia_flows.partitions import sky_regions

# Per-region work: ingestion and per-region statistics, one Spark application per run.
catalogue_job = define_asset_job(
    "catalogue_refresh",
    selection=AssetSelection.assets("gaia_source", "pm_stats"),
    partitions_def=sky_regions,
    description="Ingest landing files and recompute per-region proper-motion statistics.",
)
