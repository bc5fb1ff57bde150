"""Files as a user gets them: the bulk files' header and the Gaia archive's ECSV export.

An archive export (``launch_job(..., output_format="ecsv")``, written by astropy) declares the
byte columns ``int16`` where the bulk files and the contract say ``int8``, carries only the
columns the query selected, in the query's order, and writes a missing value as an empty field.
Read here with the executor-side reader, without Spark.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from support.gaia_files import region_file_range, stars_in_region, write_gaia_file

from gaia_flows.contracts import load_contract
from gaia_flows.engine.ingest import read_gaia_file, region_schema
from gaia_flows.science.ecsv import GaiaFileError, read_file_header

REGION = "hpx1-07"

# The bulk GaiaSource_*.csv.gz layout: block-style YAML entries with a ``meta: ucd`` map each.
BULK_HEADER = """# %ECSV 1.0
# ---
# delimiter: ','
# datatype:
# -
#   name: source_id
#   datatype: int64
#   description: Unique source identifier (unique within a particular Data Release)
#   meta:
#     ucd: meta.id
# -
#   name: ra
#   datatype: float64
#   unit: deg
#   description: Right ascension
#   meta:
#     ucd: pos.eq.ra;meta.main
# -
#   name: dec
#   datatype: float64
#   unit: deg
#   description: Declination
#   meta:
#     ucd: pos.eq.dec;meta.main
# -
#   name: pmra
#   datatype: float64
#   unit: mas.yr**-1
#   description: Proper motion in right ascension direction
# -
#   name: astrometric_params_solved
#   datatype: int8
#   description: Which parameters have been solved for?
# -
#   name: phot_g_mean_mag
#   datatype: float32
#   unit: mag
#   description: G-band mean magnitude
# meta: !!omap
# - {name: gaia_source}
# schema: astropy-2.0
source_id,ra,dec,pmra,astrometric_params_solved,phot_g_mean_mag
"""

# The archive's ECSV export as astropy writes it: flow-style entries, no delimiter line, the
# VOTable's INFO elements as table meta, wider integer and float types than the contract's.
ARCHIVE_HEADER = """# %ECSV 1.0
# ---
# datatype:
# - {name: source_id, datatype: int64, description: Unique source identifier (unique within a particular Data Release), meta: {ucd: meta.id}}
# - {name: ra, unit: deg, datatype: float64, description: Right ascension, meta: {ucd: pos.eq.ra;meta.main}}
# - {name: dec, unit: deg, datatype: float64, description: Declination, meta: {ucd: pos.eq.dec;meta.main}}
# - {name: pmra, unit: mas / yr, datatype: float64, description: Proper motion in right ascension direction}
# - {name: astrometric_params_solved, datatype: int16, description: Which parameters have been solved for?}
# - {name: phot_g_mean_mag, unit: mag, datatype: float64, description: G-band mean magnitude}
# meta: !!omap
# - {name: votable}
# - {QUERY_STATUS: OK}
# - {QUERY: 'SELECT source_id, ra, dec, pmra, astrometric_params_solved, phot_g_mean_mag FROM gaiadr3.gaia_source'}
# schema: astropy-2.0
source_id,ra,dec,pmra,astrometric_params_solved,phot_g_mean_mag
"""


def _rows(n: int, missing: str) -> list[str]:
    stars = stars_in_region(REGION, n)
    return [
        f"{stars['source_id'][i]},{float(stars['ra'][i])!r},{float(stars['dec'][i])!r},{missing if i == 0 else repr(float(stars['pmra'][i]))},31,{15.5 + i}"
        for i in range(n)
    ]


def _read(*paths) -> pa.Table:
    contract = load_contract()
    schema = region_schema({str(p): read_file_header(p) for p in paths}, contract)
    return pa.Table.from_batches(
        [batch for path in paths for batch in read_gaia_file(str(path), contract, schema)], schema=schema
    )


def _write(tmp_path, header: str, rows: list[str], name: str = "landing"):
    lo, hi = region_file_range(REGION)
    return write_gaia_file(tmp_path / name, lo, hi, {}, rows=rows, header=header)


@pytest.mark.parametrize(
    "header, missing", [(BULK_HEADER, "null"), (ARCHIVE_HEADER, "")], ids=["bulk", "archive"]
)
def test_both_header_flavours_load_into_the_contract_types(tmp_path, header, missing):
    table = _read(_write(tmp_path, header, _rows(3, missing)))
    contract = load_contract()
    assert table.num_rows == 3 and table.column("_rule").null_count == 3
    for name in ("source_id", "ra", "dec", "pmra", "astrometric_params_solved", "phot_g_mean_mag"):
        assert table.schema.field(name).type == contract.by_name[name].arrow_type, name
    assert table.column("astrometric_params_solved").to_pylist() == [31, 31, 31]
    assert table.column("pmra").to_pylist()[0] is None
    assert table.column("phot_g_mean_mag").to_pylist() == [15.5, 16.5, 17.5]


def test_a_value_the_contract_type_cannot_hold_is_quarantined_with_its_reason(tmp_path):
    rows = _rows(3, "")
    rows[1] = rows[1].replace(",31,", ",300,")  # fits the declared int16, not the contract's int8
    rows[2] = rows[2].rsplit(",", 1)[0] + ",1e300"  # fits the declared float64, not float32
    table = _read(_write(tmp_path, ARCHIVE_HEADER, rows))
    assert table.column("_rule").to_pylist() == [
        None,
        "parse:astrometric_params_solved",
        "parse:phot_g_mean_mag",
    ]
    reasons = table.column("_reason").to_pylist()
    assert "astrometric_params_solved: '300' does not fit int8" in reasons[1]
    assert "phot_g_mean_mag: '1e300' does not fit float32" in reasons[2]
    assert table.column("_line").to_pylist() == [
        16,
        17,
        18,
    ]  # every row kept, with its line (14 header lines, the column names, then data)


def test_text_where_a_number_is_expected_refuses_the_file_naming_it_and_the_column(tmp_path):
    header = ARCHIVE_HEADER.replace(
        "{name: astrometric_params_solved, datatype: int16",
        "{name: astrometric_params_solved, datatype: string",
    )
    path = _write(tmp_path, header, _rows(2, ""))
    with pytest.raises(
        GaiaFileError,
        match="column 'astrometric_params_solved' declared as string but the contract says int8",
    ) as error:
        _read(path)
    assert error.value.file == str(path)


def test_a_file_missing_optional_columns_loads_with_nulls_where_they_are_missing(tmp_path):
    full = _write(tmp_path, BULK_HEADER, _rows(2, "null"), "bulk")
    subset_header = ARCHIVE_HEADER.replace(
        "# - {name: phot_g_mean_mag, unit: mag, datatype: float64, description: G-band mean magnitude}\n", ""
    )
    subset_header = subset_header.replace(",phot_g_mean_mag\n", "\n").replace(
        ", phot_g_mean_mag FROM", " FROM"
    )
    subset_rows = [row.rsplit(",", 1)[0] for row in _rows(2, "")]
    subset = _write(tmp_path, subset_header, subset_rows, "archive")
    alone = _read(subset)
    assert "phot_g_mean_mag" not in alone.column_names and alone.column("_rule").null_count == 2
    together = _read(full, subset)
    contract = load_contract()
    names = [name for name in contract.names if name in together.column_names]
    assert together.schema.names[: len(names)] == names  # contract order
    assert together.column("phot_g_mean_mag").to_pylist() == [15.5, 16.5, None, None]
    assert together.column("_rule").null_count == 4


@pytest.mark.parametrize("dropped", ["source_id", "ra", "dec"])
def test_a_file_without_source_id_ra_or_dec_is_refused(tmp_path, dropped):
    names = ["source_id", "ra", "dec", "pmra", "astrometric_params_solved", "phot_g_mean_mag"]
    keep = [i for i, name in enumerate(names) if name != dropped]
    lines = [line for line in ARCHIVE_HEADER.splitlines() if f"{{name: {dropped}," not in line]
    lines[-1] = ",".join(names[i] for i in keep)
    rows = [",".join(np.array(row.split(","))[keep]) for row in _rows(2, "")]
    path = _write(tmp_path, "\n".join(lines) + "\n", rows)
    with pytest.raises(GaiaFileError, match=rf"required column\(s\) \['{dropped}'\] missing"):
        _read(path)
