"""The gaia_source contract is the schema of record: check it is the real DR3 table and self-consistent."""

from __future__ import annotations

import pyarrow as pa
import pytest

from gaia_flows.contracts import load_contract
from gaia_flows.science.contract import ARROW_TYPES


@pytest.fixture(scope="module")
def contract():
    return load_contract("gaia_source")


def test_contract_has_the_152_dr3_columns_in_archive_order(contract):
    assert contract.table == "gaia_source"
    assert len(contract.columns) == 152
    assert len(set(contract.names)) == 152
    assert contract.names[:5] == ["solution_id", "designation", "source_id", "random_index", "ref_epoch"]
    assert contract.names[-1] == "libname_gspphot"
    assert contract.names.index("pm") == contract.names.index("pmra") - 1
    assert contract.names.index("l") < contract.names.index("b") < contract.names.index("ecl_lon")


@pytest.mark.parametrize(
    ("name", "datatype", "unit"),
    [
        ("solution_id", "int64", None),
        ("designation", "string", None),
        ("source_id", "int64", None),
        ("ref_epoch", "float64", "yr"),
        ("ra", "float64", "deg"),
        ("ra_error", "float32", "mas"),
        ("parallax", "float64", "mas"),
        ("pmra", "float64", "mas.yr**-1"),
        ("astrometric_params_solved", "int8", None),
        ("visibility_periods_used", "int16", None),
        ("ipd_frac_multi_peak", "int8", None),
        ("phot_g_mean_flux", "float64", "'electron'.s**-1"),
        ("phot_g_mean_mag", "float32", "mag"),
        ("phot_variable_flag", "string", None),
        ("in_qso_candidates", "bool", None),
        ("has_xp_continuous", "bool", None),
        ("libname_gspphot", "string", None),
    ],
)
def test_columns_carry_the_bulk_file_datatypes_and_units(contract, name, datatype, unit):
    column = contract.by_name[name]
    assert (column.datatype, column.unit) == (datatype, unit)


def test_keys_and_required_columns(contract):
    assert contract.primary_key == contract.sort_key == "source_id"
    assert set(contract.required) == {"source_id", "ra", "dec"}
    for name in (
        "solution_id",
        "designation",
        "source_id",
        "random_index",
        "ref_epoch",
        "ra",
        "dec",
        "ra_error",
        "dec_error",
        "astrometric_params_solved",
        "l",
        "b",
    ):
        assert not contract.by_name[name].nullable, name
    for name in ("parallax", "pmra", "pmdec", "ruwe", "phot_bp_mean_mag", "radial_velocity"):
        assert contract.by_name[name].nullable, name


def test_every_datatype_maps_to_arrow(contract):
    schema = contract.arrow_schema()
    assert len(schema) == 152
    assert all(c.datatype in ARROW_TYPES for c in contract.columns)
    assert schema.field("source_id").type == pa.int64() and not schema.field("source_id").nullable
    assert schema.field("in_qso_candidates").type == pa.bool_()


def test_ranges_are_sane(contract):
    for column in contract.columns:
        if column.min is not None and column.max is not None:
            assert column.min < column.max, column.name
        if column.has_range:
            assert column.datatype != "string", column.name
    by = contract.by_name
    assert (by["ra"].min, by["ra"].max, by["ra"].max_exclusive) == (0, 360, True)
    assert (by["dec"].min, by["dec"].max, by["dec"].max_exclusive) == (-90, 90, False)
    assert by["l"].range_text() == "[0, 360)"
    assert by["b"].range_text() == "[-90, 90]"
    assert by["ipd_frac_multi_peak"].range_text() == by["ipd_frac_odd_win"].range_text() == "[0, 100]"
    for name in (
        "ruwe",
        "astrometric_excess_noise",
        "visibility_periods_used",
        "random_index",
        "phot_bp_rp_excess_factor",
    ):
        assert by[name].min == 0 and by[name].max is None, name
    for name in ("parallax", "parallax_over_error", "pmra", "pmdec"):
        assert not by[name].has_range, name


def test_every_error_is_non_negative_and_every_correlation_bounded(contract):
    errors = [c for c in contract.columns if c.name.endswith("_error") and not c.name.endswith("_over_error")]
    correlations = [c for c in contract.columns if c.name.endswith("_corr")]
    assert len(errors) == 12 and len(correlations) == 15
    assert all(c.min == 0 for c in errors)
    assert all((c.min, c.max) == (-1, 1) for c in correlations)
