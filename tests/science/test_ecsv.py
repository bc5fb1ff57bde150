"""The ECSV preamble of Gaia bulk files: written and read back, and every way it can be broken."""

from __future__ import annotations

import gzip
import io

import pytest

from gaia_flows.science.ecsv import EcsvColumn, GaiaFileError, format_header, read_file_header, read_header

COLUMNS = (
    EcsvColumn(
        "source_id", "int64", None, "Unique source identifier (unique within a particular Data Release)"
    ),
    EcsvColumn("ra", "float64", "deg", "Right ascension"),
    EcsvColumn("phot_g_mean_flux", "float64", "'electron'.s**-1", "G-band mean flux"),
    EcsvColumn("astrometric_params_solved", "int8", None, "Which parameters have been solved for?"),
    EcsvColumn("designation", "string", None, "Unique source designation: 'Gaia DR3 <id>', quoted"),
    EcsvColumn("in_qso_candidates", "bool", None, None),
)

# The layout of the real DR3 files: block-style YAML entries with a ``meta: ucd`` map each.
DR3_STYLE = """# %ECSV 1.0
# ---
# delimiter: ','
# datatype:
# -
#   name: solution_id
#   datatype: int64
#   description: Solution Identifier
#   meta:
#     ucd: meta.version
# -
#   name: ra
#   datatype: float64
#   unit: deg
#   description: Right ascension
#   meta:
#     ucd: pos.eq.ra;meta.main
# meta: !!omap
# - {name: gaia_source}
# schema: astropy-2.0
solution_id,ra
1636148068921376768,44.99615537864534
"""


def test_format_then_read_round_trips_columns_meta_and_position():
    text = (
        format_header(COLUMNS, meta={"release": "synthetic", "seed": 7}) + '1,2.5,3.0,31,"Gaia DR3 1",False\n'
    )
    stream = io.StringIO(text)
    header = read_header(stream, "round.csv")
    assert header.columns == COLUMNS
    assert header.meta == {"release": "synthetic", "seed": 7}
    assert header.delimiter == ","
    assert stream.readline() == '1,2.5,3.0,31,"Gaia DR3 1",False\n'
    assert text.splitlines()[header.first_data_line - 1].startswith("1,2.5")


def test_reads_the_block_style_header_of_real_dr3_files():
    header = read_header(io.StringIO(DR3_STYLE), "GaiaSource_000000-003111.csv.gz")
    assert header.names == ["solution_id", "ra"]
    assert header.columns[1] == EcsvColumn("ra", "float64", "deg", "Right ascension")
    assert header.first_data_line == 22


def test_reads_a_gzipped_file_by_path(tmp_path):
    path = tmp_path / "GaiaSource_000000-000001.csv.gz"
    path.write_bytes(gzip.compress((format_header(COLUMNS) + '1,2.5,3.0,31,"x",True\n').encode()))
    assert read_file_header(path).columns == COLUMNS


def _error(text: str, name: str = "broken.csv") -> GaiaFileError:
    with pytest.raises(GaiaFileError) as info:
        read_header(io.StringIO(text), name)
    assert name in str(info.value)
    return info.value


def test_missing_header_names_file_and_first_line():
    error = _error("source_id,ra\n1,2.0\n")
    assert error.line == 1
    assert "missing ECSV header" in error.reason


def test_plain_comment_instead_of_ecsv_is_a_missing_header():
    error = _error("# produced by hand\nsource_id,ra\n1,2.0\n")
    assert error.line == 1 and "missing ECSV header" in error.reason


def test_garbled_yaml_points_at_the_broken_line():
    lines = format_header(COLUMNS).splitlines()
    lines[5] = "# - {name: ra, datatype: float64, unit: deg"  # flow mapping never closed
    error = _error("\n".join(lines) + "\n1,2\n")
    assert "YAML does not parse" in error.reason
    assert error.line in (6, 7)  # the broken entry or the line where YAML notices


def test_unknown_datatype_is_garbled():
    text = format_header([EcsvColumn("source_id", "int64"), EcsvColumn("ra", "double")])
    assert "unknown datatype 'double'" in _error(text).reason


def test_csv_header_disagreeing_with_datatype_block_names_the_column_and_line():
    text = format_header(COLUMNS)
    lines = text.splitlines()
    lines[-1] = lines[-1].replace("ra,", "dec,")
    error = _error("\n".join(lines) + "\n")
    assert error.line == len(lines)
    assert "column 2: ECSV says 'ra', CSV header says 'dec'" in error.reason


def test_csv_header_with_missing_column_is_garbled():
    lines = format_header(COLUMNS).splitlines()
    lines[-1] = lines[-1].rsplit(",", 1)[0]
    error = _error("\n".join(lines) + "\n")
    assert "ECSV declares 6 columns, CSV header has 5" in error.reason


def test_truncated_gzip_is_unreadable_not_a_crash(tmp_path):
    path = tmp_path / "GaiaSource_000000-000001.csv.gz"
    path.write_bytes(gzip.compress(format_header(COLUMNS).encode())[:20])
    with pytest.raises(GaiaFileError) as info:
        read_file_header(path)
    assert str(path) in str(info.value) and "unreadable" in info.value.reason
