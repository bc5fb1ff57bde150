"""``gaia_source`` as a HATS collection, so LSDB (and any HATS reader) opens it in one line::

import lsdb
gaia = lsdb.open_catalog(".gaia/hats/gaia_source")   # catalogue + its 10" margin cache
"""

from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from gaia_flows.assets.catalogue import GROUP
from gaia_flows.engine.hats_export import HatsSettings, export
from gaia_flows.engine.metrics import run_figures, run_job_group
from gaia_flows.layout import SOURCE_TABLE
from gaia_flows.releases import release_of
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource
from gaia_flows.science.healpix import REGION_LEVEL

_DEFAULTS = HatsSettings()


class HatsCatalogueConfig(Config):
    pixel_threshold: int = Field(default=_DEFAULTS.pixel_threshold, gt=0)
    """Most rows in one partition (HATS' ``hats_max_rows``): denser sky gets smaller tiles."""
    highest_order: int = Field(default=_DEFAULTS.highest_order, ge=REGION_LEVEL, le=10)
    """Finest partition order (and the order of the row-count histogram the plan is made from)."""
    lowest_order: int = Field(default=_DEFAULTS.lowest_order, ge=REGION_LEVEL, le=10)
    """Coarsest partition order; at least the sky-region level, so a region's rerun rewrites
    only its own partitions."""
    margin_arcsec: float = Field(default=_DEFAULTS.margin_arcsec, gt=0)
    """Width of the margin cache LSDB's cross-match uses near partition borders."""

    def settings(self) -> HatsSettings:
        return HatsSettings(self.pixel_threshold, self.highest_order, self.lowest_order, self.margin_arcsec)


@asset(deps=[SOURCE_TABLE], group_name=GROUP, kinds={"spark", "parquet"})
def hats_catalogue(
    context: AssetExecutionContext,
    config: HatsCatalogueConfig,
    spark: SparkResource,
    storage: StorageResource,
) -> MaterializeResult:
    """Every published region of ``gaia_source`` as one HATS collection (catalogue with
    ``_healpix_29``, adaptive partitions, hats metadata, and a margin cache), published
    atomically. Only the partitions of regions whose rows changed since the last export are
    rewritten; the others are carried over unchanged. A release other than DR3 has its
    collection under ``hats/<release>/``."""
    release = release_of(context)
    layout = release.layout(storage.layout)
    session = spark.session()
    job_group = run_job_group(f"hats-{SOURCE_TABLE}", context.run_id)
    session.sparkContext.setJobGroup(job_group, f"HATS export of {SOURCE_TABLE}", interruptOnCancel=True)
    report = export(session, layout, SOURCE_TABLE, layout.region_versions(SOURCE_TABLE), config.settings())
    collection = layout.hats_collection(SOURCE_TABLE)
    context.log.info(
        f"HATS collection {collection}: {report.partitions_written} partitions written, {report.partitions_linked} carried over"
    )
    return MaterializeResult(
        metadata={
            "release": release.name,
            "path": MetadataValue.path(str(collection)),
            "open_with": MetadataValue.md(
                f"```python\nimport lsdb\nlsdb.open_catalog({str(collection)!r})\n```"
            ),
            "rows": report.rows,
            "partitions": report.partitions,
            "partitions_by_order": MetadataValue.json({str(k): v for k, v in report.orders.items()}),
            "partitions_written": report.partitions_written,
            "partitions_carried_over": report.partitions_linked,
            "source_regions_changed": MetadataValue.json(report.regions_changed),
            "regions_rewritten": MetadataValue.json(report.regions_rewritten),
            "margin_rows": report.margin_rows,
            "margin_arcsec": config.margin_arcsec,
            **{f"{step}_seconds": round(value, 2) for step, value in report.seconds.items()},
            **run_figures(session, job_group, report.task_records),
        }
    )
