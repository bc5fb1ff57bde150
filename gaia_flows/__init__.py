"""gaia-flows: Dagster + Spark workflows for mining the Gaia catalogue on any cloud."""

from gaia_flows.maps import map_table  # noqa: E402,F401  (notebooks: the all-sky map table of a level, no Spark)
