"""Engine code: maps the pure functions of ``gaia_flows.science`` over Spark DataFrames."""
