"""The contract rules on raw tokens, without Spark."""

import io

import healpy as hp
import numpy as np
import pyarrow as pa
import pytest
from support.gaia_files import COLUMNS, header_for, region_file_range, render_rows, set_token, stars_in_region

from gaia_flows.contracts import load_contract
from gaia_flows.science import healpix
from gaia_flows.science.ecsv import GaiaFileError, read_header
from gaia_flows.science.validation import check_header, home_regions, validate_rows

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


def test_position_must_be_near_the_encoded_pixel():
    cols = stars_in_region(REGION, 3)
    pix = int(cols["source_id"][1]) >> 35
    near = hp.get_all_neighbours(4096, pix, nest=True)[0]
    near_ra, near_dec = healpix.healpix_centres(near, 12)
    rows = render_rows(cols)
    rows[1] = set_token(set_token(rows[1], "ra", repr(float(near_ra))), "dec", repr(float(near_dec)))
    rows[2] = set_token(
        set_token(rows[2], "ra", repr(float(cols["ra"][2]) + 1.0)), "dec", repr(float(cols["dec"][2]))
    )
    _, reasons = _validate(rows)
    assert list(reasons.rules) == [None, None, "source_id:position"]


def test_several_failures_are_all_reported():
    row = set_token(set_token(_rows(1)[0], "ra_error", "-1"), "dec_error", "-2")
    _, reasons = _validate([row])
    assert reasons.rules[0] == "range:ra_error"
    assert "ra_error" in reasons.values[0] and "dec_error" in reasons.values[0]


def test_header_disagreeing_with_contract_is_a_file_error():
    contract = load_contract()
    header = read_header(
        io.StringIO(
            header_for(COLUMNS).replace(
                "{name: ra, unit: deg, datatype: float64", "{name: ra, unit: deg, datatype: string"
            )
        ),
        "f.csv",
    )
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


# Real DR3 rows of the fastest nearby stars: (source_id, ra, dec, pmra, pmdec) at J2016.0, in
# degrees and mas/yr, as the Gaia archive returns them. Sources, each quoting the DR3 row:
# - Barnard's star and Kapteyn's star: the DR3 values used as worked examples in public
#   astrometry code (Barnard: also SIMBAD's "Gaia DR3 4472832130942575872", Wikipedia's infobox
#   pm -801.551 / 10362.394 mas/yr); Kapteyn's star's id is SIMBAD's cross-identification of HD 33793.
# - Proxima Centauri: DR3 row as returned by an archive ADQL query (ra, dec, parallax 768.0665,
#   pmra, pmdec), the same values VizieR I/355/gaiadr3 lists.
# - 61 Cyg A and B: "Gaia DR3 (J2016.0) astrometry of both stars, as returned by the Gaia archive
#   for these source ids"; ids from SIMBAD (61 Cyg A = Gaia DR3 1872046609345556480, 61 Cyg B =
#   Gaia DR3 1872046574983497216).
# - Groombridge 1830 (Gaia DR3 4034171629042489088, SIMBAD): no published J2016.0 row was found.
#   Its position here is DERIVED, not DR3: SIMBAD's J2000 position (11 52 58.7683801554
#   +37 43 07.240082865) moved 16 years by SIMBAD's proper motion (4002.567, -5817.856 mas/yr).
FAST_STARS = {
    "Barnard's star": (
        4472832130942575872,
        269.44850252543836,
        4.739420051112412,
        -801.5509783684709,
        10362.394206546573,
    ),
    "Proxima Centauri": (
        5853498713190525696,
        217.39232147200883,
        -62.67607511676666,
        -3781.741008265163,
        769.4650146478623,
    ),
    "61 Cyg A": (
        1872046609345556480,
        316.7484792940004,
        38.76386244649797,
        4164.2086922846665,
        3249.613883848584,
    ),
    "61 Cyg B": (
        1872046574983497216,
        316.753662752556,
        38.75607277205679,
        4105.976428209489,
        3155.9416398273515,
    ),
    "Kapteyn's star": (
        4810594479418041856,
        77.9599373502188,
        -45.0438126993602,
        6491.223339061598,
        -5708.614150045243,
    ),
    "Groombridge 1830 (derived position)": (
        4034171629042489088,
        178.2673570544303,
        37.69282066301806,
        4002.567,
        -5817.856,
    ),
}
FAST_COLUMNS = ["source_id", "ra", "dec", "pmra", "pmdec"]


def _validate_star(source_id: int, ra: float, dec: float, pmra, pmdec):
    """One row through the contract, in a file whose level-8 range holds the source_id."""
    header = read_header(io.StringIO(header_for(FAST_COLUMNS)), "stars.csv")
    tokens = [
        str(source_id),
        repr(ra),
        repr(dec),
        "null" if pmra is None else repr(pmra),
        "null" if pmdec is None else repr(pmdec),
    ]
    raw = pa.table({name: pa.array([token], pa.string()) for name, token in zip(FAST_COLUMNS, tokens)})
    level8 = int(healpix.source_id_to_healpix(source_id, healpix.FILE_LEVEL))
    return validate_rows(raw, header, load_contract(), (level8, level8))


@pytest.mark.parametrize("name", sorted(FAST_STARS))
def test_the_id_is_the_star_its_track_crosses_the_encoded_pixel(name):
    """The id really is this star: between J2000 (the input catalogue's epoch) and J2016 its
    track passes within one pixel radius of the centre of the pixel its id encodes, while its
    J2016 position alone may be farther away."""
    source_id, ra, dec, pmra, pmdec = FAST_STARS[name]
    years = np.linspace(-16.0, 0.0, 321)
    track_ra = ra + pmra * years / 3.6e6 / np.cos(np.radians(dec))
    track_dec = dec + pmdec * years / 3.6e6
    pixel = np.full(years.size, source_id >> 35)
    distance = healpix.distance_to_centre(pixel, healpix.SOURCE_ID_LEVEL, track_ra, track_dec)
    assert distance.min() <= healpix.max_pixel_radius(healpix.SOURCE_ID_LEVEL)


@pytest.mark.parametrize("name", sorted(FAST_STARS))
def test_real_fast_stars_are_accepted(name):
    table, reasons = _validate_star(*FAST_STARS[name])
    assert not reasons.rejected.any(), reasons.values[0]
    assert table.column("source_id")[0].as_py() == FAST_STARS[name][0]


def test_barnards_star_is_far_outside_the_old_neighbour_rule():
    source_id, ra, dec, _, _ = FAST_STARS["Barnard's star"]
    offset = healpix.distance_to_centre([source_id >> 35], healpix.SOURCE_ID_LEVEL, [ra], [dec])[0]
    assert offset > 2.5 * healpix.max_pixel_radius(
        healpix.SOURCE_ID_LEVEL
    )  # 157" from the centre: 2.9 pixel radii


def test_a_fast_star_whose_id_is_really_far_from_its_position_is_rejected():
    source_id, ra, dec, pmra, pmdec = FAST_STARS["Barnard's star"]
    # 20 years of Barnard's motion is 208": a position 0.2 degrees (720") off is corrupt
    _, reasons = _validate_star(source_id, ra, dec + 0.2, pmra, pmdec)
    assert reasons.rules[0] == "source_id:position"
    assert "its proper motion allows" in reasons.values[0]


def test_a_row_without_proper_motion_gets_the_floor():
    source_id, ra, dec, _, _ = FAST_STARS["Barnard's star"]
    # Barnard's position with its proper motion missing: 157" is beyond the floor of two pixel radii
    _, reasons = _validate_star(source_id, ra, dec, None, None)
    assert reasons.rules[0] == "source_id:position"
    # the centre of a neighbouring pixel is inside the floor
    pixel = source_id >> 35
    near = hp.get_all_neighbours(4096, pixel, nest=True)[0]
    near_ra, near_dec = healpix.healpix_centres(near, 12)
    _, reasons = _validate_star(source_id, float(near_ra), float(near_dec), None, None)
    assert not reasons.rejected.any()
