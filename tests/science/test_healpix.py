import numpy as np
import pytest
from astropy import units as u
from astropy_healpix import HEALPix

from gaia_flows.science import healpix


@pytest.fixture(scope="module")
def positions():
    rng = np.random.default_rng(7)
    n = 20_000
    ra = rng.uniform(0, 360, n)
    dec = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    return ra, dec


@pytest.mark.parametrize("level", [0, 1, 6, 8, 12])
def test_source_id_pixel_matches_astropy_healpix(positions, level):
    ra, dec = positions
    pix12 = HEALPix(nside=2**12, order="nested").lonlat_to_healpix(ra * u.deg, dec * u.deg)
    source_id = (pix12.astype(np.int64) << 35) + np.arange(ra.size)
    expected = HEALPix(nside=2**level, order="nested").lonlat_to_healpix(ra * u.deg, dec * u.deg)
    np.testing.assert_array_equal(healpix.source_id_to_healpix(source_id, level), expected)
    np.testing.assert_array_equal(healpix.radec_to_healpix(ra, dec, level), expected)


def test_real_dr3_source_id_decodes_to_its_position():
    # Gaia DR3 4295806720: ra 44.996, dec 0.005 (first row of GaiaSource_000000-003111)
    assert healpix.source_id_to_healpix(4295806720, 12) == healpix.radec_to_healpix(
        44.99615537864534, 0.005615226341865997, 12
    )
    assert healpix.source_id_to_healpix(4295806720, 8) == 0


def test_degrade_is_a_right_shift_consistent_with_positions(positions):
    ra, dec = positions
    fine = healpix.radec_to_healpix(ra, dec, 9)
    np.testing.assert_array_equal(healpix.degrade(fine, 9, 3), healpix.radec_to_healpix(ra, dec, 3))
    with pytest.raises(ValueError):
        healpix.degrade(fine, 3, 9)


def test_region_keys_round_trip():
    keys = healpix.region_keys()
    assert len(keys) == 48 and keys[7] == "hpx1-07"
    assert [healpix.parse_region_key(k) for k in keys] == [(1, p) for p in range(48)]
    for bad in ["hpx1-48", "hpx1-7x", "region-1", "hpx13-00"]:
        with pytest.raises(ValueError):
            healpix.parse_region_key(bad)


def test_file_name_range_parsing():
    assert healpix.parse_file_range("GaiaSource_000000-003111.csv.gz") == (0, 3111)
    assert healpix.parse_file_range("/landing/GaiaSource_786097-786431.csv.gz") == (786097, 786431)
    assert healpix.file_name(12, 345) == "GaiaSource_000012-000345.csv.gz"
    for bad in [
        "GaiaSource_3111-000000.csv.gz",
        "GaiaSource_000010-000001.csv.gz",
        "GaiaSource_000000-786432.csv.gz",
        "gaia.csv.gz",
    ]:
        with pytest.raises(ValueError):
            healpix.parse_file_range(bad)


def test_files_for_region_selects_overlapping_ranges_only(tmp_path):
    # region hpx1-01 covers level-8 pixels 16384..32767
    names = [
        "GaiaSource_000000-016383.csv.gz",
        "GaiaSource_016000-016400.csv.gz",
        "GaiaSource_016384-032767.csv.gz",
        "GaiaSource_032768-040000.csv.gz",
    ]
    chosen = healpix.files_for_region([tmp_path / n for n in names], "hpx1-01")
    assert [p.name for p in chosen] == names[1:3]


def test_distance_to_centre_and_pixel_radius_agree_with_healpy():
    import healpy as hp

    level = 12
    pixels = np.array([1000, 123_456, 200_000_000])
    ra, dec = healpix.healpix_centres(pixels, level)
    assert np.allclose(healpix.distance_to_centre(pixels, level, ra, dec), 0.0, atol=1e-9)
    # one degree north along a meridian is one degree away
    moved = healpix.distance_to_centre(pixels[:2], level, ra[:2], dec[:2] + 1.0)
    assert np.allclose(moved, 1.0, atol=1e-9)
    assert healpix.max_pixel_radius(level) == hp.max_pixrad(4096, degrees=True)
    # every corner of a pixel lies within its maximum radius
    corners = hp.boundaries(4096, 1000, step=1, nest=True)
    corner_ra, corner_dec = hp.vec2ang(corners.T, lonlat=True)
    assert (
        healpix.distance_to_centre(np.full(4, 1000), level, corner_ra, corner_dec)
        <= healpix.max_pixel_radius(level) + 1e-12
    ).all()
