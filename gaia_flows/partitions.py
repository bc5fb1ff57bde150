"""Sky regions as Dagster partitions: HEALPix level-1 nested pixels, keys ``hpx1-00``..``hpx1-47``.

Every data release partitions its assets by the same regions; the release is the asset key's
prefix (``dr4/gaia_source``, partition ``hpx1-07``), not a second partition dimension, so each
release keeps its own contract, schema and run history (:mod:`gaia_flows.releases`)."""

from dagster import StaticPartitionsDefinition

from gaia_flows.science.healpix import region_keys

sky_regions = StaticPartitionsDefinition(region_keys())


RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"
PARTITION_TAG = "dagster/partition"


def range_tags(first: str, last: str) -> dict[str, str]:
    """Run tags that make one run cover regions ``first``..``last`` (single-run backfill)."""
    return {RANGE_START_TAG: first, RANGE_END_TAG: last}


def run_regions(tags: dict[str, str]) -> list[str]:
    """The sky regions a run covers, from its tags (a range, one partition, or none: a run of
    anything not partitioned by sky region covers none)."""
    keys = sky_regions.get_partition_keys()
    first, last = tags.get(RANGE_START_TAG), tags.get(RANGE_END_TAG)
    if first in keys and last in keys:
        return keys[keys.index(first) : keys.index(last) + 1]
    return [tags[PARTITION_TAG]] if tags.get(PARTITION_TAG) in keys else []
