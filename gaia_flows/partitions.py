"""Sky regions as Dagster partitions: HEALPix level-1 nested pixels, keys ``hpx1-00``..``hpx1-47``.

Every data release partitions its assets by the same regions; the release is the asset key's
prefix (``dr4/gaia_source``, partition ``hpx1-07``), not a second partition dimension, so each
release keeps its own contract, schema and run history (:mod:`gaia_flows.releases`)."""

from dagster import StaticPartitionsDefinition

from gaia_flows.science.healpix import region_keys

sky_regions = StaticPartitionsDefinition(region_keys())


def range_tags(first: str, last: str) -> dict[str, str]:
    """Run tags that make one run cover regions ``first``..``last`` (single-run backfill)."""
    return {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}
