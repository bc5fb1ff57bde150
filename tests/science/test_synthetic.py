"""The synthetic catalogue: real DR3 file format, position-encoding source_ids, and the sky it claims."""

from __future__ import annotations

import healpy as hp
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from astropy import units as u
from astropy.coordinates import SkyCoord

from gaia_flows.contracts import load_contract
from gaia_flows.science import healpix
from gaia_flows.science import synthetic as syn
from gaia_flows.science.ecsv import read_file_header

STARS = 30_000
SEED = 7


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    out = tmp_path_factory.mktemp("landing")
    report = syn.generate(STARS, SEED, out, load_contract(), files=6, processes=1, progress=False)
    return report


def _read(path) -> pa.Table:
    header = read_file_header(path)
    schema = load_contract("gaia_source").arrow_schema(header.names)
    return pacsv.read_csv(
        path,
        read_options=pacsv.ReadOptions(skip_rows=header.comment_lines),
        convert_options=pacsv.ConvertOptions(
            column_types=schema, null_values=["null"], strings_can_be_null=False
        ),
    )


@pytest.fixture(scope="module")
def rows(catalogue) -> pa.Table:
    return pa.concat_tables([_read(path) for path in catalogue.files])


@pytest.fixture(scope="module")
def simulated():
    rng = np.random.default_rng(11)
    sky = syn.sample_sky(rng, 200_000)
    columns, spurious = syn.simulate_sources(rng, sky)
    return sky, columns, spurious


# --- pure functions -----------------------------------------------------------------------------


def test_galactic_conversion_agrees_with_astropy_and_round_trips():
    rng = np.random.default_rng(3)
    ra, dec = rng.uniform(0, 360, 1000), np.degrees(np.arcsin(rng.uniform(-1, 1, 1000)))
    l, b = syn.icrs_to_galactic(ra, dec)
    galactic = SkyCoord(ra=ra * u.deg, dec=dec * u.deg, frame="icrs").galactic
    separation = SkyCoord(l=l * u.deg, b=b * u.deg, frame="galactic").separation(galactic).arcsec
    assert separation.max() < 0.1
    back_ra, back_dec = syn.galactic_to_icrs(l, b)
    assert np.allclose(back_dec, dec, atol=1e-9)
    assert np.allclose((back_ra - ra + 180) % 360 - 180, 0, atol=1e-9)
    centre_ra, centre_dec = syn.galactic_to_icrs(np.array([0.0]), np.array([0.0]))
    assert abs(centre_ra[0] - 266.405) < 0.01 and abs(centre_dec[0] + 28.936) < 0.01


def test_solar_reflex_matches_astropy_in_galactic_axes():
    """A star at rest in the Galaxy, 1 kpc away, mirrors the Sun's velocity: -v_sun / 4.74."""
    l, b = np.array([0.0, 90.0, 30.0]), np.array([0.0, 0.0, 60.0])
    ra, dec = syn.galactic_to_icrs(l, b)
    sky = syn.Sky(ra, dec, l, b, np.zeros(3, dtype=np.int8))
    distance = np.ones(3)
    pmra, pmdec = syn.proper_motion_from_velocity(sky, distance, np.zeros((3, 3)))
    galactic = SkyCoord(
        ra=ra * u.deg,
        dec=dec * u.deg,
        pm_ra_cosdec=pmra * u.mas / u.yr,
        pm_dec=pmdec * u.mas / u.yr,
        frame="icrs",
    ).galactic
    k = syn.KM_S_PER_MAS_YR_KPC
    u_sun, v_sun, w_sun = syn.SUN_VELOCITY
    # toward the centre the Sun's rotation (y) and W are transverse; toward l = 90 it is U and W
    assert galactic.pm_l_cosb.value[0] == pytest.approx(-v_sun / k, abs=0.01)
    assert galactic.pm_b.value[0] == pytest.approx(-w_sun / k, abs=0.01)
    assert galactic.pm_l_cosb.value[1] == pytest.approx(u_sun / k, abs=0.01)
    assert galactic.pm_b.value[1] == pytest.approx(-w_sun / k, abs=0.01)
    speed = np.hypot(pmra[2], pmdec[2]) * k
    direction = syn.lonlat_to_unit(30.0, 60.0)
    transverse = syn.SUN_VELOCITY - (syn.SUN_VELOCITY @ direction) * direction
    assert speed == pytest.approx(np.linalg.norm(transverse), rel=1e-9)


def test_parallax_uncertainty_follows_dr3_performance():
    sigma = syn.parallax_uncertainty(np.array([10.0, 13.0, 15.0, 17.0, 20.0, 21.0]))
    assert sigma[0] == sigma[1]
    assert 0.02 <= sigma[2] <= 0.03
    assert 0.06 <= sigma[3] <= 0.09
    assert 0.5 <= sigma[4] <= 0.7
    assert 1.2 <= sigma[5] <= 1.5
    assert np.all(np.diff(sigma[1:]) > 0)


def test_riello_relation_is_continuous():
    edges = np.array([0.5, 4.0])
    assert np.allclose(syn.riello_excess(edges - 1e-9), syn.riello_excess(edges + 1e-9), atol=2e-3)


def test_source_ids_restart_their_running_number_in_every_pixel():
    pixels = np.array([5, 5, 5, 9, 12, 12])
    ids = syn.assign_source_ids(pixels)
    assert list(ids >> 35) == list(pixels)
    assert list(ids & (2**35 - 1)) == [0, 1, 2, 0, 0, 1]


def test_plan_files_is_contiguous_balanced_and_never_empty():
    rng = np.random.default_rng(5)
    level8 = np.sort(rng.integers(0, healpix.npix(8), 100_000))
    ranges = syn.plan_files(level8, 10)
    assert len(ranges) == 10
    assert ranges[0][0] == 0 and ranges[-1][1] == healpix.npix(8) - 1
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))
    counts = [np.count_nonzero((level8 >= s) & (level8 <= e)) for s, e in ranges]
    assert min(counts) > 0 and max(counts) < 1.2 * 100_000 / 10
    few = syn.plan_files(np.array([3, 3, 3]), 10)
    assert few == [(0, healpix.npix(8) - 1)]


# --- the simulated sky ---------------------------------------------------------------------------


def test_magellanic_clouds_are_overdense_and_move_with_their_constants(simulated):
    sky, columns, spurious = simulated
    mean_density = len(sky) / (4 * np.pi * np.degrees(1) ** 2)
    for name, centre, pm in (("lmc", syn.LMC_CENTRE, syn.LMC_PM), ("smc", syn.SMC_CENTRE, syn.SMC_PM)):
        inside = syn.angular_distance(sky.ra, sky.dec, centre) < 2.0
        density = inside.sum() / (2 * np.pi * (1 - np.cos(np.radians(2.0))) * np.degrees(1) ** 2)
        assert density > 20 * mean_density, name
        members = sky.is_population(name) & ~spurious & np.isfinite(columns["pmra"])
        assert members.sum() > 500
        assert np.median(columns["pmra"][members]) == pytest.approx(pm[0], abs=0.1)
        assert np.median(columns["pmdec"][members]) == pytest.approx(pm[1], abs=0.1)


def test_disc_and_bulge_crowd_toward_the_galactic_centre(simulated):
    sky, _, _ = simulated
    low = np.abs(sky.b) < 10
    assert low.mean() > 0.5
    toward_centre = low & ((sky.l < 30) | (sky.l > 330))
    toward_anticentre = low & (sky.l > 150) & (sky.l < 210)
    assert toward_centre.sum() > 2 * toward_anticentre.sum()


def test_spurious_solutions_crowd_into_the_plane(simulated):
    sky, _, spurious = simulated
    clouds = (syn.angular_distance(sky.ra, sky.dec, syn.LMC_CENTRE) < 10) | (
        syn.angular_distance(sky.ra, sky.dec, syn.SMC_CENTRE) < 6
    )
    plane = (np.abs(sky.b) < 5) & ~clouds
    high = (np.abs(sky.b) > 30) & ~clouds
    assert spurious[plane].mean() > 5 * spurious[high].mean()
    assert 0.05 < spurious.mean() < 0.10


def test_enough_gcns_like_candidates_of_both_classes(simulated):
    """Scaled to 1,000,000 stars these are the >= 20,000 good and bad candidates the demo needs."""
    sky, columns, _ = simulated
    parallax = columns["parallax"]
    clouds = (syn.angular_distance(sky.ra, sky.dec, syn.LMC_CENTRE) < 10) | (
        syn.angular_distance(sky.ra, sky.dec, syn.SMC_CENTRE) < 6
    )
    good = (parallax > 8) & (np.abs(sky.b) > 25) & ~clouds
    bad = parallax < -8
    assert good.sum() >= 0.02 * len(sky)
    assert bad.sum() >= 0.02 * len(sky)
    assert (parallax > 8).sum() > 0 and np.nanmin(parallax) < -50


def test_spurious_sources_carry_the_crowded_field_signature(simulated):
    _, columns, spurious = simulated
    five = np.isfinite(columns["parallax"])
    good = five & ~spurious
    assert np.median(columns["ruwe"][spurious]) > 1.4 > np.median(columns["ruwe"][good])
    assert (
        np.median(columns["astrometric_excess_noise_sig"][spurious])
        > 2
        > np.median(columns["astrometric_excess_noise_sig"][good])
    )
    assert np.mean(columns["ipd_frac_multi_peak"][spurious]) > 10 * max(
        np.mean(columns["ipd_frac_multi_peak"][good]), 0.1
    )
    assert np.median(columns["visibility_periods_used"][spurious]) < np.median(
        columns["visibility_periods_used"][good]
    )
    assert np.median(np.abs(columns["parallax_over_error"][spurious])) > 5 * np.median(
        np.abs(columns["parallax_over_error"][good])
    )
    negative, positive = (columns["parallax"][spurious] < -8).sum(), (columns["parallax"][spurious] > 8).sum()
    assert 0.8 < negative / positive < 1.25


def test_good_sources_follow_riello_excess_and_spurious_scatter_above(simulated):
    _, columns, spurious = simulated
    corrected = columns["phot_bp_rp_excess_factor"] - syn.riello_excess(columns["bp_rp"])
    z = corrected / syn.riello_sigma(columns["phot_g_mean_mag"])
    measured = np.isfinite(z)
    assert np.mean(np.abs(z[measured & ~spurious]) < 3) > 0.99
    assert np.median(z[measured & spurious]) > 2
    assert np.std(corrected[measured & spurious]) > 2.5 * np.std(corrected[measured & ~spurious])


def test_solution_types_and_their_nulls(simulated):
    _, columns, spurious = simulated
    params = columns["astrometric_params_solved"]
    assert set(np.unique(params)) == {3, 31, 95}
    two = params == 3
    assert 0.02 <= two.mean() <= 0.04
    assert not (two & spurious).any()
    for name in ("parallax", "parallax_error", "pmra", "pmdec", "pm", "ruwe", "parallax_pmdec_corr"):
        assert np.isnan(columns[name][two]).all() and np.isfinite(columns[name][~two]).all(), name
    assert (
        np.isfinite(columns["ra_dec_corr"]).all() and np.isfinite(columns["astrometric_excess_noise"]).all()
    )


# --- the files -----------------------------------------------------------------------------------


def test_files_parse_with_the_contract_header_in_contract_order(catalogue):
    contract = load_contract("gaia_source")
    for path in catalogue.files:
        assert healpix.is_gaia_file_name(path)
        header = read_file_header(path)
        assert header.names == [name for name in contract.names if name in syn.SYNTHETIC_COLUMNS]
        assert all(
            c.datatype == contract.by_name[c.name].datatype and c.unit == contract.by_name[c.name].unit
            for c in header.columns
        )


def test_source_id_encodes_the_position_of_every_row(rows):
    ra, dec = rows["ra"].to_numpy(), rows["dec"].to_numpy()
    source_id = rows["source_id"].to_numpy()
    assert np.array_equal(source_id >> 35, hp.ang2pix(4096, ra, dec, nest=True, lonlat=True))
    assert len(np.unique(source_id)) == len(source_id) == STARS
    assert np.all(np.diff(source_id) > 0)


def test_rows_sit_inside_their_file_range_and_ranges_tile_the_sky(catalogue):
    ranges = [healpix.parse_file_range(path) for path in catalogue.files]
    assert ranges[0][0] == 0 and ranges[-1][1] == healpix.npix(8) - 1
    assert all(a[1] + 1 == b[0] for a, b in zip(ranges, ranges[1:]))
    for path, (start, end) in zip(catalogue.files, ranges):
        level8 = healpix.source_id_to_healpix(_read(path)["source_id"].to_numpy(), 8)
        assert len(level8) > 0 and level8.min() >= start and level8.max() <= end


def test_values_respect_the_contract(rows):
    contract = load_contract("gaia_source")
    for name in rows.column_names:
        column, values = contract.by_name[name], rows[name]
        if not column.nullable:
            assert values.null_count == 0, name
        if column.has_range:
            data = values.drop_null().to_numpy().astype(float)
            if column.min is not None:
                assert (data > column.min).all() if column.min_exclusive else (data >= column.min).all(), name
            if column.max is not None:
                assert (data < column.max).all() if column.max_exclusive else (data <= column.max).all(), name
    assert rows["designation"].to_pylist()[:3] == [f"Gaia DR3 {s}" for s in rows["source_id"].to_pylist()[:3]]
    assert sorted(rows["random_index"].to_numpy()) == list(range(STARS))
    assert set(rows["astrometric_params_solved"].to_numpy()) == {3, 31, 95}


def test_text_looks_like_the_archive(catalogue):
    import gzip

    text = gzip.decompress(catalogue.files[0].read_bytes()).decode()
    first_row = text.split("\n")[read_file_header(catalogue.files[0]).first_data_line - 1]
    fields = first_row.split(",")
    assert fields[0] == str(syn.SOLUTION_ID)
    assert fields[1] == f'"Gaia DR3 {fields[2]}"'
    assert ",null," in text and ",nan" not in text and ",," not in text


def test_truth_sidecar_labels_every_row_and_stays_out_of_the_gaia_columns(catalogue, rows):
    truth = pq.read_table(catalogue.truth)
    assert (
        catalogue.truth.parent.name == "truth" and catalogue.truth.parent.parent == catalogue.files[0].parent
    )
    assert truth.num_rows == rows.num_rows == STARS
    assert np.array_equal(truth["source_id"].to_numpy(), rows["source_id"].to_numpy())
    assert set(truth["population"].to_pylist()) == set(syn.POPULATIONS)
    assert truth["spurious"].to_numpy().sum() == catalogue.spurious
    assert not {"spurious", "population"} & set(rows.column_names)
    assert sum(catalogue.populations.values()) == STARS


def test_same_seed_same_bytes_whatever_the_processes(tmp_path, catalogue):
    again = syn.generate(
        STARS, SEED, tmp_path / "again", load_contract(), files=6, processes=2, progress=False
    )
    assert [p.name for p in again.files] == [p.name for p in catalogue.files]
    for a, b in zip(again.files, catalogue.files):
        assert a.read_bytes() == b.read_bytes(), a.name
    assert again.truth.read_bytes() == catalogue.truth.read_bytes()
    other = syn.generate(
        2_000, SEED + 1, tmp_path / "other", load_contract(), files=2, processes=1, progress=False
    )
    assert other.files[0].read_bytes() != again.files[0].read_bytes()


def test_refuses_to_mix_two_catalogues_in_one_folder(tmp_path):
    syn.generate(2_000, 1, tmp_path, load_contract(), files=2, processes=1, progress=False)
    syn.generate(
        2_000, 1, tmp_path, load_contract(), files=2, processes=1, progress=False
    )  # rerun: same names, fine
    with pytest.raises(FileExistsError, match="another synthetic catalogue"):
        syn.generate(2_000, 2, tmp_path, load_contract(), files=3, processes=1, progress=False)
    assert not list(tmp_path.glob(".*tmp*"))
