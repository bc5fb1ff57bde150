"""The synthetic catalogue as a published ``gaia_source``, for the classifier's tests and benchmark.

The files come from the project's generator (``gaia_flows.science.synthetic.generate``), so the
rows carry its hidden truth (``<landing>/truth/source_truth-<seed>.parquet``). They are parsed
and validated by the ingestion's own reader (``read_gaia_file``) but published from the driver
with pyarrow: the catalogue's Spark path has its own tests, and here it would only add a
minute of start-up to every run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from gaia_flows.contracts import load_contract
from gaia_flows.engine.ingest import read_gaia_file, region_schema
from gaia_flows.layout import SOURCE_TABLE, StateLayout, landing_files
from gaia_flows.science import healpix
from gaia_flows.science.ecsv import read_file_header
from gaia_flows.science.synthetic import generate, truth_path
from gaia_flows.warehouse import write_region_arrow


def publish_synthetic(layout: StateLayout, stars: int, seed: int, files: int = 8) -> Path:
    """Generate ``stars`` synthetic sources into the landing folder, publish every region of
    ``gaia_source`` from them, and return the truth sidecar's path."""
    generate(stars, seed, layout.landing, load_contract(), files=files, processes=2, progress=False)
    contract = load_contract(SOURCE_TABLE)
    paths = landing_files(layout.landing)
    schema = region_schema({str(p): read_file_header(p) for p in paths}, contract)
    gaia_columns = [f.name for f in schema if not f.name.startswith("_")]
    parts = []
    for path in paths:
        table = pa.Table.from_batches(list(read_gaia_file(str(path), contract, schema)), schema=schema)
        rejected = table.column("_rule").null_count != table.num_rows
        assert not rejected, f"{path.name}: the generator wrote rows the contract rejects"
        parts.append(table)
    table = pa.concat_tables(parts)
    region = table.column("_region").to_numpy()
    table = table.select(gaia_columns)
    for pixel in np.unique(region):
        part = table.filter(pa.array(region == pixel)).sort_by("source_id")
        write_region_arrow(
            part, layout, SOURCE_TABLE, healpix.region_key(int(pixel)), manifest={"rows_in": part.num_rows}
        )
    return truth_path(layout.landing, seed)


def catalogue_frame(layout: StateLayout, columns: list[str] | None = None) -> pd.DataFrame:
    """Every published ``gaia_source`` row joined with its truth (``spurious``, ``population``)."""
    files = sorted(p for p in layout.table(SOURCE_TABLE).glob("hpx*/*.parquet"))
    frame = pa.concat_tables([pq.read_table(p, columns=columns) for p in files]).to_pandas()
    truth = pq.read_table(next((layout.landing / "truth").glob("source_truth-*.parquet"))).to_pandas()
    return frame.merge(truth, on="source_id", how="left", validate="one_to_one")
