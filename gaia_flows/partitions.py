"""Sky regions as Dagster partitions: HEALPix level-1 nested pixels, keys ``hpx1-00``..``hpx1-47``."""

from dagster import StaticPartitionsDefinition

from gaia_flows.science.healpix import region_keys

sky_regions = StaticPartitionsDefinition(region_keys())


def range_tags(first: str, last: str) -> dict[str, str]:
    """Run tags that make one run cover regions ``first``..``last`` (single-run backfill)."""
    return {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}
