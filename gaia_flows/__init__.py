"""gaia-flows: Dagster + Spark workflows for mining the Gaia catalogue on any cloud."""


def __getattr__(name: str):
    # ``from gaia_flows import map_table``: the all-sky map table of a level, for notebooks.
    # Resolved lazily so ``import gaia_flows.<anything>`` does not pay for pyarrow/healpy.
    if name == "map_table":
        from gaia_flows.maps import map_table

        return map_table
    raise AttributeError(f"module 'gaia_flows' has no attribute {name!r}")
