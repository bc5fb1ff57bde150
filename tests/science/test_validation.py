"""The contract rules on raw tokens, without Spark."""

import io

import healpy as hp
import numpy as np
import pyarrow as pa
import pytest

from gaia_flows.contracts import load_contract
from gaia_flows.science import healpix
from gaia_flows.science.ecsv import GaiaFileError, read_header
from gaia_flows.science.validation import check_header, home_regions, validate_rows
from support.gaia_files import COLUMNS, header_for, region_file_range, render_rows, set_token, stars_in_region

REGION = "hpx1-07"


def _validate(rows: list[str], names=COLUMNS):
    header = read_header(io.StringIO(header_for(names)), "test.csv")
    split = [r.split(",") for r in rows]
    raw = pa.table({n: pa.array([s[i].strip('"') for s in split], pa.string()) for i, n in enumerate(names)})
    return validate_rows(raw, header, load_contract(), region_file_range(REGION))


def _rows(n=5):
    return render_rows(stars_in_region(REGION, n))


def test_clean_rows_are_typed_as_the_contract_says():
    table, reasons = _validate(_rows())
    assert not reasons.rejected.any()
    contract = load_contract()
    for field in table.schema:
        assert field.type == contract.by_name[field.name].arrow_type, field.name
    assert table.column("designation")[0].as_py().startswith("Gaia DR3 ")


@pytest.mark.parametrize("token", ["null", "", "nan", "NaN"])
def test_missing_value_tokens_become_null(token):
    table, reasons = _validate([set_token(_rows(1)[0], "pmra", token)])
    assert not reasons.rejected.any()
    assert table.column("pmra").null_count == 1


@pytest.mark.parametrize(
    "column, token, rule, fragment",
    [
        ("ra", "400.0", "range:ra", "ra: 400 outside [0, 360)"),
        ("dec", "-91", "range:dec", "dec: -91 outside [-90, 90]"),
        ("ra_error", "-0.5", "range:ra_error", "ra_error: -0.5 outside"),
        ("pmra", "abc", "parse:pmra", "pmra: cannot parse 'abc' as float64"),
        ("source_id", "12x", "parse:source_id", "source_id: cannot parse '12x' as int64"),
        ("astrometric_params_solved", "99999", "parse:astrometric_params_solved", "does not fit int8"),
        ("ra", "null", "null:ra", "ra: missing value in non-nullable column"),
        ("parallax", "inf", "finite:parallax", "parallax: not a finite number"),
    ],
)
def test_each_rule_rejects_with_a_reason(column, token, rule, fragment):
    rows = _rows(3)
    rows[1] = set_token(rows[1], column, token)
    _, reasons = _validate(rows)
    assert list(reasons.rejected) == [False, True, False]
    assert reasons.rules[1] == rule
    assert fragment in reasons.values[1]


def test_source_id_outside_the_file_range_is_rejected_and_kept_in_the_file_region():
    rows = _rows(2)
    far = int(healpix.region_source_id_range("hpx1-30")[0]) + 5
    rows[0] = set_token(rows[0], "source_id", str(far))
    table, reasons = _validate(rows)
    assert reasons.rules[0] == "source_id:file-range"
    lo, hi = region_file_range(REGION)
    assert list(home_regions(table.column("source_id"), (lo, hi))) == [7, 7]


def test_position_must_be_in_the_encoded_pixel_or_a_neighbour():
    cols = stars_in_region(REGION, 3)
    pix = int(cols["source_id"][1]) >> 35
    near = hp.get_all_neighbours(4096, pix, nest=True)[0]
    near_ra, near_dec = healpix.healpix_centres(near, 12)
    rows = render_rows(cols)
    rows[1] = set_token(set_token(rows[1], "ra", repr(float(near_ra))), "dec", repr(float(near_dec)))
    rows[2] = set_token(set_token(rows[2], "ra", repr(float(cols["ra"][2]) + 1.0)), "dec", repr(float(cols["dec"][2])))
    _, reasons = _validate(rows)
    assert list(reasons.rules) == [None, None, "source_id:position"]


def test_several_failures_are_all_reported():
    row = set_token(set_token(_rows(1)[0], "ra_error", "-1"), "dec_error", "-2")
    _, reasons = _validate([row])
    assert reasons.rules[0] == "range:ra_error"
    assert "ra_error" in reasons.values[0] and "dec_error" in reasons.values[0]


def test_header_disagreeing_with_contract_is_a_file_error():
    contract = load_contract()
    header = read_header(io.StringIO(header_for(COLUMNS).replace("{name: ra, unit: deg, datatype: float64", "{name: ra, unit: deg, datatype: string")), "f.csv")
    with pytest.raises(GaiaFileError, match="column 'ra' declared as string but the contract says float64"):
        check_header(header, contract, "f.csv")
    missing = read_header(io.StringIO(header_for([c for c in COLUMNS if c != "dec"])), "g.csv")
    with pytest.raises(GaiaFileError, match=r"required column\(s\) \['dec'\] missing"):
        check_header(missing, contract, "g.csv")


def test_home_regions_cover_every_row_once():
    sid = pa.array([None, 0, int(healpix.region_source_id_range(REGION)[0])], pa.int64())
    regions = home_regions(sid, region_file_range(REGION))
    assert regions.tolist() == [7, 7, 7]
    assert np.issubdtype(regions.dtype, np.integer)
