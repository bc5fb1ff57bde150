"""Sky regions as Dagster partitions: HEALPix level-1 nested pixels, keys ``hpx1-00``..``hpx1-47``."""

from dagster import StaticPartitionsDefinition

from gaia_flows.science.healpix import region_keys

sky_regions = StaticPartitionsDefinition(region_keys())
