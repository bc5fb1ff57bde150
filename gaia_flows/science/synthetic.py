"""A deterministic synthetic Gaia DR3 catalogue, written in the real bulk-file format.

Real DR3 is 1.8 billion rows and has no labels; the pipeline needs a catalogue of any size that
reads exactly like the archive's ``GaiaSource_*.csv.gz`` files *and* carries a hidden truth, so
maps and the spurious-solution classifier can be checked against the answer. Same seed, same
star count and same file count give byte-identical files, whatever the number of processes.

The sky is a superposition of populations, each a few lines of standard Galactic structure:

* ``disc``: exponential in ``|b|`` and peaked toward the Galactic centre in ``l``; stars
  rotate with a flat rotation curve, so their proper motions show the Oort pattern;
* ``bulge``: a Gaussian blob around the centre, non-rotating, at 8.2 kpc;
* ``halo``: isotropic, non-rotating, hot; it shows the full solar reflex;
* ``lmc`` / ``smc``: exponential discs on the sky around the Clouds, moving with the
  published mean proper motions :data:`LMC_PM` and :data:`SMC_PM`;
* ``nearby``: stars within :data:`NEARBY_MAX_KPC` spread over the whole sky.

Every field star's proper motion is its Galactic velocity minus the Sun's
(:data:`SUN_VELOCITY`), projected on the sky: ``pm = v_perp / (4.74 d_kpc)``, so halo stars show
``-(v_sun)_perp / (4.74 d)``, the solar reflex. Errors follow the DR3 performance formula
(:func:`parallax_uncertainty`). Spurious solutions, the thing the classifier must find, are
injected with a probability that rises with the model's sky density (:func:`crowding`), as in
real crowded fields, and carry the real signature: a large parallax of either sign, larger
excess noise, RUWE and IPD-multiplicity indicators, fewer visibility periods, and a BP/RP flux
excess above the Riello et al. (2021) colour relation that good sources follow.

The pure functions (sampling, kinematics, errors, injection) need no files; :func:`generate`
only wires them to HEALPix-ordered files, a pool of processes, and the ground-truth sidecar.
"""

from __future__ import annotations

import contextlib
import functools
import io
import multiprocessing
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from gaia_flows.science import healpix
from gaia_flows.science.contract import TableContract
from gaia_flows.science.ecsv import EcsvColumn, format_header

# --- populations ---------------------------------------------------------------------------------

POPULATIONS = ("disc", "bulge", "halo", "lmc", "smc", "nearby")
POPULATION_FRACTIONS = (0.60, 0.14, 0.16, 0.04, 0.01, 0.05)
"""Share of each population in the catalogue.

The real sky has about one star in 5,000 within 125 pc; a one-million-star demo drawn to scale
would hold a few hundred, far too few to train or check a classifier. ``nearby`` is therefore
over-sampled to 5 %: with 58 % of the sky at ``|b| > 25`` deg, a 1M catalogue yields about
28,000 sources with ``parallax > 8`` mas there, the "good" side of a GCNS-like training set.
The "bad" side (``parallax < -8`` mas) comes only from spurious solutions; see
:data:`SPURIOUS_MAX_PROBABILITY`.
"""

NEARBY_MAX_KPC = 0.120
"""Nearby stars fill a sphere of this radius uniformly, so nearly all have ``parallax > 8`` mas."""
NEARBY_MIN_KPC = 0.002

LMC_CENTRE = (80.89, -69.76)
SMC_CENTRE = (13.19, -72.83)
LMC_SCALE_DEG = 1.5
SMC_SCALE_DEG = 0.7
LMC_PM = (1.91, 0.229)
"""Mean (pmra, pmdec) of the LMC in mas/yr: the HST value of Kallivayalil et al. 2013 (ApJ 764,
161; μW = −1.910, μN = 0.229). Gaia DR2 gives (1.850, 0.234) (Gaia Collaboration, Helmi et al.
2018, A&A 616, A12)."""
SMC_PM = (0.797, -1.220)
"""Mean (pmra, pmdec) of the SMC in mas/yr (Gaia Collaboration, Helmi et al. 2018)."""
CLOUD_DISTANCE_KPC = {"lmc": (49.6, 1.5), "smc": (62.8, 2.5)}
CLOUD_PM_DISPERSION = 0.1

DISC_L_CENTRAL_WEIGHT = 0.5
DISC_L_SCALE_DEG = 60.0
DISC_B_SCALE_DEG = 6.0
BULGE_SIGMA_DEG = (6.0, 4.5)

# --- Galaxy and Sun ---------------------------------------------------------------------------------

R0_KPC = 8.2
V_CIRC = 240.0
SUN_VELOCITY = np.array([11.1, 12.24 + V_CIRC, 7.25])
"""Sun's velocity in the Galactic rest frame, km/s: Schoenrich et al. (2010) peculiar motion
(U, V, W) plus the circular speed. Axes: x toward the centre, y along rotation, z to the NGP."""
KM_S_PER_MAS_YR_KPC = 4.740470446
DISC_DISPERSION = np.array([35.0, 25.0, 18.0])
BULGE_DISPERSION = 100.0
HALO_DISPERSION = 110.0

ICRS_TO_GALACTIC = np.array(
    [
        [-0.0548755604162154, -0.8734370902348850, -0.4838350155487132],
        [+0.4941094278755837, -0.4448296299600112, +0.7469822444972189],
        [-0.8676661490190047, -0.1980763734312015, +0.4559837761750669],
    ]
)
"""The Hipparcos matrix A_G' that Gaia uses for ``l``, ``b``: r_gal = A_G' r_icrs."""

# --- photometry -------------------------------------------------------------------------------------

G_BRIGHT, G_FAINT = 3.0, 21.0
ABSOLUTE_MAG = {
    "disc": (6.0, 1.5),
    "bulge": (2.0, 0.8),
    "halo": (6.0, 1.5),
    "lmc": (0.0, 0.8),
    "smc": (0.0, 0.8),
    "nearby": (10.0, 1.5),
}
"""(centre, scale) of each population's logistic luminosity function in M_G."""
GIANT_POPULATIONS = ("bulge", "lmc", "smc")
EXTINCTION_MAX_MAG = 5.0
EXTINCTION_LENGTH_KPC = 2.0
EXTINCTION_B_SCALE_DEG = 3.0
EXTINCTION_PER_REDDENING = 1.9
BPRP_MISSING_MAX = 0.5
"""BP/RP photometry is missing for up to half of the faintest sources, rising from G = 19."""

# --- astrometric solutions --------------------------------------------------------------------------

SOLUTION_ID = 1636148068921376768
"""The solution_id every row of DR3 gaia_source carries."""
REF_EPOCH = 2016.0
PARAMS_2P, PARAMS_5P, PARAMS_6P = 3, 31, 95
TWO_PARAM_MAX = 0.20
"""2-parameter probability at G = 21, rising linearly from G = 19.5; about 3 % overall."""
POSITION_ERROR_FACTORS = (0.80, 0.70)
PM_ERROR_FACTORS = (1.03, 0.89)
"""Sky-averaged (ra, dec) and (pmra, pmdec) errors per unit parallax error (Gaia EDR3 performance)."""
SIX_PARAM_ERROR_FACTOR = 1.25
TWO_PARAM_POSITION_FACTOR = 3.0
ERROR_SCATTER_DEX = 0.08

SPURIOUS_MAX_PROBABILITY = 0.40
CROWDING_HALF = 8.0
"""Spurious probability is ``SPURIOUS_MAX_PROBABILITY * c / (c + CROWDING_HALF)`` for crowding
``c`` (sky density over the all-sky mean), damped for bright sources. This yields about 7 % of
sources overall, a third of them at ``parallax < -8`` mas: at least 20,000 "bad" GCNS-like
candidates in a 1M catalogue, concentrated in the plane, the bulge and the Magellanic Clouds."""
SPURIOUS_PARALLAX_SCALE_MAS = 20.0
SPURIOUS_PM_SCALE = 6.0
BINARY_FRACTION = 0.05

RIELLO_SIGMA = (0.0059898, 8.817481e-12, 7.618399)
"""sigma_C*(G) = a + b G^c, the 1-sigma width of the corrected BP/RP excess of good sources."""
SPURIOUS_EXCESS_SCALE = 0.15

SYNTHETIC_COLUMNS = frozenset(
    """solution_id designation source_id random_index ref_epoch ra ra_error dec dec_error parallax
    parallax_error parallax_over_error pm pmra pmra_error pmdec pmdec_error ra_dec_corr ra_parallax_corr
    dec_parallax_corr parallax_pmra_corr parallax_pmdec_corr pmra_pmdec_corr astrometric_gof_al
    astrometric_excess_noise astrometric_excess_noise_sig astrometric_params_solved visibility_periods_used
    astrometric_sigma5d_max ipd_gof_harmonic_amplitude ipd_frac_multi_peak ipd_frac_odd_win ruwe
    phot_g_mean_mag phot_bp_mean_mag phot_rp_mean_mag phot_bp_rp_excess_factor bp_rp l b""".split()
)
"""The gaia_source columns the generator fills; files hold them in the contract's order."""
_FIVE_PARAM_CORRS = (
    "ra_parallax_corr",
    "dec_parallax_corr",
    "parallax_pmra_corr",
    "parallax_pmdec_corr",
    "pmra_pmdec_corr",
)
_FIVE_PARAM_ONLY = (
    "parallax",
    "parallax_error",
    "parallax_over_error",
    "pm",
    "pmra",
    "pmra_error",
    "pmdec",
    "pmdec_error",
    "ruwe",
)

DEFAULT_FILES = 96
GZIP_LEVEL = 1
_SKY_STREAM, _FILE_STREAM = 0, 1


# --- coordinates -----------------------------------------------------------------------------------


def lonlat_to_unit(lon, lat) -> np.ndarray:
    """Unit vectors, shape (3, n), of longitudes/latitudes in degrees."""
    lon, lat = np.radians(lon), np.radians(lat)
    cos_lat = np.cos(lat)
    return np.stack([cos_lat * np.cos(lon), cos_lat * np.sin(lon), np.sin(lat)])


def unit_to_lonlat(vec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Longitude in [0, 360) and latitude in [-90, 90] degrees of (3, n) vectors."""
    lon = np.degrees(np.arctan2(vec[1], vec[0])) % 360.0
    lat = np.degrees(np.arctan2(vec[2], np.hypot(vec[0], vec[1])))
    return np.where(lon >= 360.0, 0.0, lon), lat  # -1e-15 % 360 rounds up to 360.0


def icrs_to_galactic(ra, dec) -> tuple[np.ndarray, np.ndarray]:
    return unit_to_lonlat(ICRS_TO_GALACTIC @ lonlat_to_unit(ra, dec))


def galactic_to_icrs(l, b) -> tuple[np.ndarray, np.ndarray]:
    return unit_to_lonlat(ICRS_TO_GALACTIC.T @ lonlat_to_unit(l, b))


def angular_distance(lon, lat, centre: tuple[float, float]) -> np.ndarray:
    """Great-circle distance in degrees from ``centre`` (same frame as lon/lat)."""
    a = lonlat_to_unit(lon, lat)
    c = lonlat_to_unit(*centre)
    return np.degrees(np.arctan2(np.linalg.norm(np.cross(a.T, c), axis=1), c @ a))


def _offset(centre: tuple[float, float], radius_deg, angle) -> tuple[np.ndarray, np.ndarray]:
    """Points at ``radius_deg`` from ``centre`` in direction ``angle`` (radians, from north)."""
    lon0, lat0 = np.radians(centre)
    r = np.radians(radius_deg)
    sin_lat = np.sin(lat0) * np.cos(r) + np.cos(lat0) * np.sin(r) * np.cos(angle)
    lat = np.arcsin(np.clip(sin_lat, -1.0, 1.0))
    lon = lon0 + np.arctan2(np.sin(angle) * np.sin(r) * np.cos(lat0), np.cos(r) - np.sin(lat0) * sin_lat)
    lon = np.degrees(lon) % 360.0
    return np.where(lon >= 360.0, 0.0, lon), np.degrees(lat)


# --- where the stars are ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Sky:
    """Positions (degrees, ICRS and Galactic) and population index of each source."""

    ra: np.ndarray
    dec: np.ndarray
    l: np.ndarray
    b: np.ndarray
    population: np.ndarray

    def __len__(self) -> int:
        return len(self.ra)

    def take(self, index) -> Sky:
        return Sky(self.ra[index], self.dec[index], self.l[index], self.b[index], self.population[index])

    def is_population(self, name: str) -> np.ndarray:
        return self.population == POPULATIONS.index(name)


def _truncated_laplace(rng: np.random.Generator, n: int, scale: float, limit: float) -> np.ndarray:
    """Symmetric exponential on [-limit, limit], by inverting the truncated CDF."""
    u = rng.random(n)
    magnitude = -scale * np.log1p(-u * (1.0 - np.exp(-limit / scale)))
    return np.where(rng.random(n) < 0.5, -magnitude, magnitude)


def _disc_lb(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    central = rng.random(n) < DISC_L_CENTRAL_WEIGHT
    l = np.where(central, rng.laplace(0.0, DISC_L_SCALE_DEG, n), rng.uniform(0.0, 360.0, n)) % 360.0
    return np.where(l >= 360.0, 0.0, l), _truncated_laplace(rng, n, DISC_B_SCALE_DEG, 90.0)


def _bulge_lb(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    l = rng.normal(0.0, BULGE_SIGMA_DEG[0], n) % 360.0
    return np.where(l >= 360.0, 0.0, l), np.clip(rng.normal(0.0, BULGE_SIGMA_DEG[1], n), -90.0, 90.0)


def _isotropic(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.uniform(0.0, 360.0, n), np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, n)))


def _cloud(
    rng: np.random.Generator, n: int, centre: tuple[float, float], scale_deg: float
) -> tuple[np.ndarray, np.ndarray]:
    """An exponential disc on the sky: radius ~ Gamma(2, scale) is the exponential surface profile."""
    return _offset(centre, rng.gamma(2.0, scale_deg, n), rng.uniform(0.0, 2.0 * np.pi, n))


def sample_sky(rng: np.random.Generator, n: int) -> Sky:
    """Positions of ``n`` sources; populations are interleaved at random, never in blocks."""
    population = rng.choice(len(POPULATIONS), size=n, p=POPULATION_FRACTIONS).astype(np.int8)
    ra, dec, l, b = (np.empty(n) for _ in range(4))
    for index, name in enumerate(POPULATIONS):
        rows = np.flatnonzero(population == index)
        k = len(rows)
        if name in ("disc", "bulge"):
            l[rows], b[rows] = (_disc_lb if name == "disc" else _bulge_lb)(rng, k)
            ra[rows], dec[rows] = galactic_to_icrs(l[rows], b[rows])
            continue
        if name in ("halo", "nearby"):
            ra[rows], dec[rows] = _isotropic(rng, k)
        else:
            centre, scale = (LMC_CENTRE, LMC_SCALE_DEG) if name == "lmc" else (SMC_CENTRE, SMC_SCALE_DEG)
            ra[rows], dec[rows] = _cloud(rng, k, centre, scale)
        l[rows], b[rows] = icrs_to_galactic(ra[rows], dec[rows])
    return Sky(ra, dec, l, b, population)


def crowding(sky: Sky) -> np.ndarray:
    """Model source density at each position over the all-sky mean (1 = average sky).

    Computed from the population densities, not by counting neighbours, so it is the same
    whatever chunk or file a source lands in. Each term integrates to its population's share.
    """
    per_rad = np.degrees(1.0)
    cos_b = np.maximum(np.cos(np.radians(sky.b)), 1e-9)
    l_wrapped = (sky.l + 180.0) % 360.0 - 180.0
    s = DISC_L_SCALE_DEG
    p_l = (
        DISC_L_CENTRAL_WEIGHT
        * (np.exp(-np.abs(l_wrapped) / s) + np.exp(-(360.0 - np.abs(l_wrapped)) / s))
        / (2 * s)
    )
    p_l += (1.0 - DISC_L_CENTRAL_WEIGHT) / 360.0
    h = DISC_B_SCALE_DEG
    p_b = np.exp(-np.abs(sky.b) / h) / (2 * h * (1.0 - np.exp(-90.0 / h)))
    disc = p_l * p_b * per_rad**2 / cos_b
    sl, sb = BULGE_SIGMA_DEG
    bulge = (
        np.exp(-0.5 * ((l_wrapped / sl) ** 2 + (sky.b / sb) ** 2))
        / (2 * np.pi * sl * sb)
        * per_rad**2
        / cos_b
    )
    clouds = []
    for centre, scale in ((LMC_CENTRE, LMC_SCALE_DEG), (SMC_CENTRE, SMC_SCALE_DEG)):
        r = np.radians(angular_distance(sky.ra, sky.dec, centre))
        scale_rad = np.radians(scale)
        clouds.append(np.exp(-r / scale_rad) / (2 * np.pi * scale_rad**2))
    f = dict(zip(POPULATIONS, POPULATION_FRACTIONS))
    isotropic = (f["halo"] + f["nearby"]) / (4 * np.pi)
    density = f["disc"] * disc + f["bulge"] * bulge + f["lmc"] * clouds[0] + f["smc"] * clouds[1] + isotropic
    return 4 * np.pi * density


# --- distances, photometry, kinematics --------------------------------------------------------------


def sample_distances(rng: np.random.Generator, population: np.ndarray) -> np.ndarray:
    """Heliocentric distance in kpc per population."""
    n = len(population)
    d = np.empty(n)
    for index, name in enumerate(POPULATIONS):
        rows = np.flatnonzero(population == index)
        k = len(rows)
        if name == "disc":
            d[rows] = rng.gamma(3.0, 1.3, k)
        elif name == "bulge":
            d[rows] = np.maximum(rng.normal(R0_KPC, 0.9, k), 4.0)
        elif name == "halo":
            d[rows] = rng.lognormal(np.log(5.0), 0.6, k)
        elif name == "nearby":
            d[rows] = np.maximum(NEARBY_MAX_KPC * rng.random(k) ** (1.0 / 3.0), NEARBY_MIN_KPC)
        else:
            mean, sigma = CLOUD_DISTANCE_KPC[name]
            d[rows] = rng.normal(mean, sigma, k)
    return d


def extinction_g(distance_kpc: np.ndarray, b: np.ndarray) -> np.ndarray:
    """A_G from a dust layer: saturating with distance, thin in ``|b|``."""
    return (
        EXTINCTION_MAX_MAG
        * -np.expm1(-distance_kpc / EXTINCTION_LENGTH_KPC)
        * np.exp(-np.abs(b) / EXTINCTION_B_SCALE_DEG)
    )


def _truncated_logistic(rng: np.random.Generator, centre, scale, low, high) -> np.ndarray:
    """Logistic variates restricted to [low, high] by inverting the CDF (no rejection loop)."""
    cdf_low = 1.0 / (1.0 + np.exp(-(low - centre) / scale))
    cdf_high = 1.0 / (1.0 + np.exp(-(high - centre) / scale))
    u = cdf_low + rng.random(len(centre)) * (cdf_high - cdf_low)
    with np.errstate(divide="ignore"):
        x = centre + scale * np.log(u / (1.0 - u))
    return np.clip(x, low, high)


def riello_excess(bp_rp) -> np.ndarray:
    """Expected phot_bp_rp_excess_factor of a good source (Riello et al. 2021, eq. 6)."""
    x = np.asarray(bp_rp, dtype=float)
    return np.select(
        [x < 0.5, x < 4.0],
        [
            1.154360 + 0.033772 * x + 0.032277 * x**2,
            1.162004 + 0.011464 * x + 0.049255 * x**2 - 0.005879 * x**3,
        ],
        1.057572 + 0.140537 * x,
    )


def riello_sigma(g) -> np.ndarray:
    a, b, c = RIELLO_SIGMA
    return a + b * np.asarray(g, dtype=float) ** c


def sample_photometry(
    rng: np.random.Generator, population: np.ndarray, distance_kpc: np.ndarray, b: np.ndarray
) -> dict[str, np.ndarray]:
    """G, BP, RP and BP-RP from a luminosity function, distance modulus and extinction.

    Absolute magnitudes are drawn only from the range that lands within Gaia's [3, 21] window,
    so the magnitude limit selects intrinsically bright stars at large distance, as it should.
    BP/RP are NaN (null) for a share of faint sources, as in DR3.
    """
    n = len(population)
    names = np.array(POPULATIONS)[population]
    centre = np.array([ABSOLUTE_MAG[p][0] for p in POPULATIONS])[population]
    scale = np.array([ABSOLUTE_MAG[p][1] for p in POPULATIONS])[population]
    a_g = extinction_g(distance_kpc, b)
    shift = 5.0 * np.log10(distance_kpc * 1000.0) - 5.0 + a_g
    m_g = _truncated_logistic(rng, centre, scale, G_BRIGHT - shift, G_FAINT - shift)
    g = m_g + shift
    giant = np.isin(names, GIANT_POPULATIONS)
    intrinsic = np.where(
        giant,
        rng.normal(1.3, 0.25, n),
        np.clip(0.82 + 0.27 * (m_g - 4.67), -0.3, 4.2) + rng.normal(0.0, 0.1, n),
    )
    bp_rp = intrinsic + a_g / EXTINCTION_PER_REDDENING
    x = np.minimum(bp_rp, 4.25)
    g_rp = 0.02 + 0.68 * x - 0.08 * x**2
    rp = g - g_rp
    bp = rp + bp_rp
    missing = rng.random(n) < BPRP_MISSING_MAX * np.clip((g - 19.0) / 2.0, 0.0, 1.0)
    nan = np.where(missing, np.nan, 0.0)
    return {
        "phot_g_mean_mag": g,
        "phot_bp_mean_mag": bp + nan,
        "phot_rp_mean_mag": rp + nan,
        "bp_rp": bp_rp + nan,
    }


def sample_velocities(rng: np.random.Generator, sky: Sky, distance_kpc: np.ndarray) -> np.ndarray:
    """Galactic rest-frame velocities (km/s, shape (3, n)) of field stars.

    Disc and nearby stars rotate on a flat rotation curve with the thin-disc dispersion; bulge and
    halo stars do not rotate. The Clouds get theirs in :func:`true_proper_motions`.
    """
    n = len(sky)
    position = lonlat_to_unit(sky.l, sky.b) * distance_kpc
    galactocentric = position - np.array([[R0_KPC], [0.0], [0.0]])
    radius = np.maximum(np.hypot(galactocentric[0], galactocentric[1]), 1e-3)
    rotation = V_CIRC * np.stack([galactocentric[1], -galactocentric[0], np.zeros(n)]) / radius
    rotating = sky.is_population("disc") | sky.is_population("nearby")
    dispersion = np.where(
        rotating,
        DISC_DISPERSION[:, None],
        np.where(sky.is_population("bulge"), BULGE_DISPERSION, HALO_DISPERSION),
    )
    return np.where(rotating, rotation, 0.0) + rng.normal(0.0, 1.0, (3, n)) * dispersion


def proper_motion_from_velocity(
    sky: Sky, distance_kpc: np.ndarray, velocity: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(pmra, pmdec) in mas/yr of stars moving with Galactic ``velocity`` as seen from the Sun.

    The heliocentric velocity is ``velocity - SUN_VELOCITY``; its component across the line of
    sight over ``4.74 d`` is the proper motion, rotated from Galactic to ICRS axes and projected
    on the local east/north directions (pmra includes cos dec, like Gaia's).
    """
    direction = lonlat_to_unit(sky.l, sky.b)
    helio = velocity - SUN_VELOCITY[:, None]
    transverse = helio - (helio * direction).sum(axis=0) * direction
    pm_icrs = ICRS_TO_GALACTIC.T @ (transverse / (KM_S_PER_MAS_YR_KPC * distance_kpc))
    ra, dec = np.radians(sky.ra), np.radians(sky.dec)
    east = np.stack([-np.sin(ra), np.cos(ra), np.zeros_like(ra)])
    north = np.stack([-np.sin(dec) * np.cos(ra), -np.sin(dec) * np.sin(ra), np.cos(dec)])
    return (pm_icrs * east).sum(axis=0), (pm_icrs * north).sum(axis=0)


def true_proper_motions(
    rng: np.random.Generator, sky: Sky, distance_kpc: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    pmra, pmdec = proper_motion_from_velocity(sky, distance_kpc, sample_velocities(rng, sky, distance_kpc))
    for name, mean in (("lmc", LMC_PM), ("smc", SMC_PM)):
        rows = np.flatnonzero(sky.is_population(name))
        pmra[rows] = mean[0] + rng.normal(0.0, CLOUD_PM_DISPERSION, len(rows))
        pmdec[rows] = mean[1] + rng.normal(0.0, CLOUD_PM_DISPERSION, len(rows))
    return pmra, pmdec


# --- astrometric solutions --------------------------------------------------------------------------


def parallax_uncertainty(g) -> np.ndarray:
    """Typical DR3 parallax error in mas: sqrt(40 + 800 z + 30 z^2) uas, z = 10^(0.4 (max(G, 13) - 15)).

    That is the published EDR3/DR3 performance relation: about 0.02-0.03 mas at G < 15, 0.07 at
    G = 17, 0.5 at G = 20 and 1.3-1.4 at G = 21. Position and proper-motion errors are fixed
    multiples of it (:data:`POSITION_ERROR_FACTORS`, :data:`PM_ERROR_FACTORS`, pm in mas/yr).
    """
    z = 10.0 ** (0.4 * (np.maximum(np.asarray(g, dtype=float), 13.0) - 15.0))
    return 1e-3 * np.sqrt(40.0 + 800.0 * z + 30.0 * z**2)


def sample_solution_type(rng: np.random.Generator, g: np.ndarray, has_colour: np.ndarray) -> np.ndarray:
    """astrometric_params_solved: 3 (2p) for a few per cent of faint sources, else 31 or 95.

    6p solutions replace a photometric colour the source lacks, so every source without BP/RP
    gets one, and they take over toward the faint end as in DR3.
    """
    n = len(g)
    two_param = rng.random(n) < TWO_PARAM_MAX * np.clip((g - 19.5) / 1.5, 0.0, 1.0)
    six_param = ~has_colour | (rng.random(n) < 1.0 / (1.0 + np.exp(-(g - 18.5) / 0.7)))
    return np.where(two_param, PARAMS_2P, np.where(six_param, PARAMS_6P, PARAMS_5P)).astype(np.int8)


def spurious_probability(crowd: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Chance of a spurious solution: saturating in crowding, mostly for faint sources."""
    faint = 1.0 / (1.0 + np.exp(-(g - 18.0) / 0.8))
    return SPURIOUS_MAX_PROBABILITY * crowd / (crowd + CROWDING_HALF) * faint


def _percent(rng: np.random.Generator, probability) -> np.ndarray:
    return rng.binomial(100, np.clip(probability, 0.0, 1.0)).astype(np.int8)


def quality_indicators(
    rng: np.random.Generator,
    spurious: np.ndarray,
    crowd: np.ndarray,
    parallax_error: np.ndarray,
    params: np.ndarray,
) -> dict[str, np.ndarray]:
    """Goodness-of-fit and image-parameter columns.

    One latent "excess" per source (in units of its error) drives excess noise, its
    significance, gof_al and RUWE together, so the indicators correlate as in DR3. Good sources
    sit near zero (binaries a little higher), spurious ones well above, with overlap. Crowding
    raises the IPD window flags of good sources too, so position alone does not give the answer.
    """
    n = len(spurious)
    excess = np.where(spurious, 2.0 + rng.exponential(6.0, n), np.maximum(rng.normal(-0.2, 1.0, n), 0.0))
    excess += np.where(rng.random(n) < BINARY_FRACTION, rng.exponential(1.5, n), 0.0)
    visibility = np.where(spurious, rng.normal(13.0, 3.0, n), rng.normal(21.0, 3.0, n))
    visibility = np.where(params == PARAMS_2P, rng.normal(8.0, 3.0, n), visibility)
    low = np.where(params == PARAMS_2P, 3, 9)
    return {
        "astrometric_excess_noise": 0.5 * excess * parallax_error,
        "astrometric_excess_noise_sig": excess,
        "astrometric_gof_al": rng.normal(0.0, 1.2, n) + 1.5 * excess,
        "ruwe": np.exp(rng.normal(0.0, 0.05, n)) * np.sqrt(1.0 + (0.2 * excess) ** 2),
        "visibility_periods_used": np.clip(np.rint(visibility), low, 34).astype(np.int16),
        "ipd_gof_harmonic_amplitude": np.where(
            spurious, 0.05 + rng.exponential(0.12, n), rng.exponential(0.03, n) * (1.0 + 0.02 * crowd)
        ),
        "ipd_frac_multi_peak": _percent(
            rng, np.where(spurious, rng.uniform(0.05, 0.5, n), 0.002 * (1.0 + 0.05 * crowd))
        ),
        "ipd_frac_odd_win": _percent(
            rng, np.where(spurious, rng.uniform(0.02, 0.4, n), 0.003 * (1.0 + 0.1 * crowd))
        ),
    }


def simulate_sources(rng: np.random.Generator, sky: Sky) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every synthetic Gaia column except identifiers, plus the hidden spurious flag.

    Values are float64/int NumPy arrays with NaN for null; the writer casts them to the
    contract's types. 2-parameter solutions have null parallax, proper motion, their errors,
    their correlations and RUWE, like DR3.
    """
    n = len(sky)
    distance = sample_distances(rng, sky.population)
    columns = sample_photometry(rng, sky.population, distance, sky.b)
    g = columns["phot_g_mean_mag"]
    params = sample_solution_type(rng, g, np.isfinite(columns["bp_rp"]))
    crowd = crowding(sky)
    spurious = (rng.random(n) < spurious_probability(crowd, g)) & (params != PARAMS_2P)

    scatter = 10.0 ** rng.normal(0.0, ERROR_SCATTER_DEX, n) * np.where(
        params == PARAMS_6P, SIX_PARAM_ERROR_FACTOR, 1.0
    )
    scatter *= np.where(spurious, 1.0 + rng.exponential(0.5, n), 1.0)
    sigma = parallax_uncertainty(g) * scatter
    position_factor = np.where(params == PARAMS_2P, TWO_PARAM_POSITION_FACTOR, 1.0)

    pmra_true, pmdec_true = true_proper_motions(rng, sky, distance)
    columns["parallax_error"] = sigma
    columns["parallax"] = (
        1.0 / distance
        + rng.normal(0.0, 1.0, n) * sigma
        + np.where(spurious, rng.laplace(0.0, SPURIOUS_PARALLAX_SCALE_MAS, n), 0.0)
    )
    columns["parallax_over_error"] = columns["parallax"] / sigma
    for name, true, factor in (
        ("pmra", pmra_true, PM_ERROR_FACTORS[0]),
        ("pmdec", pmdec_true, PM_ERROR_FACTORS[1]),
    ):
        columns[f"{name}_error"] = factor * sigma
        columns[name] = (
            true
            + rng.normal(0.0, 1.0, n) * factor * sigma
            + np.where(spurious, rng.laplace(0.0, SPURIOUS_PM_SCALE, n), 0.0)
        )
    columns["pm"] = np.hypot(columns["pmra"], columns["pmdec"])
    columns["ra_error"] = POSITION_ERROR_FACTORS[0] * sigma * position_factor
    columns["dec_error"] = POSITION_ERROR_FACTORS[1] * sigma * position_factor
    columns["astrometric_sigma5d_max"] = 1.5 * sigma * position_factor
    columns["ra_dec_corr"] = np.tanh(rng.normal(0.0, 0.3, n))
    for name in _FIVE_PARAM_CORRS:
        columns[name] = np.tanh(rng.normal(0.0, 1.0, n) * np.where(spurious, 0.7, 0.3))
    columns.update(quality_indicators(rng, spurious, crowd, sigma, params))
    columns["astrometric_params_solved"] = params

    excess = riello_excess(columns["bp_rp"])
    width = riello_sigma(g)
    columns["phot_bp_rp_excess_factor"] = excess + np.where(
        spurious,
        np.abs(rng.normal(0.0, 1.0, n)) * width + rng.exponential(SPURIOUS_EXCESS_SCALE, n),
        rng.normal(0.0, 1.0, n) * width,
    )

    two_param = params == PARAMS_2P
    for name in (*_FIVE_PARAM_ONLY, *_FIVE_PARAM_CORRS):
        columns[name] = np.where(two_param, np.nan, columns[name])
    columns["l"], columns["b"] = sky.l, sky.b
    columns["ra"], columns["dec"] = sky.ra, sky.dec
    return columns, spurious


# --- identifiers and file layout --------------------------------------------------------------------


def assign_source_ids(hpx12_sorted: np.ndarray) -> np.ndarray:
    """``hpx12 * 2**35 + running number within the pixel``, for pixels already in ascending order."""
    n = len(hpx12_sorted)
    first = np.r_[True, hpx12_sorted[1:] != hpx12_sorted[:-1]]
    group_start = np.flatnonzero(first)
    running = np.arange(n) - np.repeat(group_start, np.diff(np.r_[group_start, n]))
    return (hpx12_sorted.astype(np.int64) << healpix.SOURCE_ID_SHIFT) + running


def plan_files(level8_sorted: np.ndarray, files: int) -> list[tuple[int, int]]:
    """Contiguous level-8 ranges covering the whole sky, each with roughly ``n / files`` rows.

    Every range holds at least one row; fewer than ``files`` ranges come back when the rows are
    too few or too concentrated to split further.
    """
    last = healpix.npix(healpix.FILE_LEVEL) - 1
    cumulative = np.cumsum(np.bincount(level8_sorted, minlength=last + 1))
    total = cumulative[-1]
    ends = np.unique(np.searchsorted(cumulative, total * np.arange(1, files) / files, side="left"))
    ends = np.r_[ends[cumulative[ends] < total], last]
    starts = np.r_[0, ends[:-1] + 1]
    return [(int(s), int(e)) for s, e in zip(starts, ends)]


# --- writing ----------------------------------------------------------------------------------------


@functools.cache
def synthetic_header(contract: TableContract) -> str:
    """ECSV header and CSV column line of every synthetic file (the synthetic columns, contract order)."""
    return format_header(
        [
            EcsvColumn(c.name, c.datatype, c.unit, c.description)
            for c in contract.columns
            if c.name in SYNTHETIC_COLUMNS
        ]
    )


def gaia_csv(columns: dict[str, np.ndarray], contract: TableContract) -> bytes:
    """One DR3 bulk file's text: ECSV header, then rows with strings quoted and ``null`` for missing.

    Columns are cast to the contract's types and written in its order. Missing values travel as
    NaN: Arrow prints them as ``nan``, and since the only text column (designation) never holds
    those letters, a single replace gives Gaia's ``null``, far cheaper than patching empty fields.
    """
    arrays = {}
    for column in contract.columns:
        if column.name not in SYNTHETIC_COLUMNS:
            continue
        if column.name == "designation":
            arrays["designation"] = pc.binary_join_element_wise(
                "Gaia DR3 ", pc.cast(pa.array(columns["source_id"]), pa.string()), ""
            )
        else:
            arrays[column.name] = pa.array(
                np.asarray(columns[column.name]).astype(np.dtype(column.datatype)), type=column.arrow_type
            )
    sink = io.BytesIO()
    pacsv.write_csv(pa.table(arrays), sink, pacsv.WriteOptions(include_header=False, batch_size=8192))
    return synthetic_header(contract).encode() + sink.getvalue().replace(b"nan", b"null")


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a hidden temporary name in the same folder, then rename: readers and sensors
    never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass(frozen=True)
class _FileTask:
    path: Path
    seed: int
    start: int
    sky: Sky
    source_id: np.ndarray
    random_index: np.ndarray
    contract: TableContract


def _write_file(task: _FileTask) -> tuple[int, np.ndarray]:
    """Simulate one file's sources, write it, return (bytes written, spurious flags)."""
    rng = np.random.default_rng(np.random.SeedSequence(task.seed, spawn_key=(_FILE_STREAM, task.start)))
    columns, spurious = simulate_sources(rng, task.sky)
    n = len(task.sky)
    columns.update(
        solution_id=np.full(n, SOLUTION_ID, dtype=np.int64),
        source_id=task.source_id,
        random_index=task.random_index,
        ref_epoch=np.full(n, REF_EPOCH),
    )
    data = zlib.compress(gaia_csv(columns, task.contract), GZIP_LEVEL, wbits=31)
    write_atomic(task.path, data)
    return len(data), spurious


@dataclass(frozen=True)
class GenerationReport:
    stars: int
    seed: int
    populations: dict[str, int]
    spurious: int
    files: list[Path]
    truth: Path
    bytes: int
    seconds: float
    processes: int


def truth_path(out: Path, seed: int) -> Path:
    return Path(out) / "truth" / f"source_truth-{seed}.parquet"


def _refuse_stale(out: Path, planned: Sequence[Path]) -> None:
    """A landing folder mixing two generations would hold overlapping ranges and a truth that
    disagrees with the files; rerunning the same command (same names) is fine."""
    present = set(out.glob(healpix.FILE_GLOB)) | set((out / "truth").glob("source_truth-*.parquet"))
    stale = sorted(present - set(planned))
    if stale:
        names = ", ".join(p.name for p in stale[:3])
        raise FileExistsError(
            f"{out} already holds files of another synthetic catalogue ({len(stale)}: {names}, ...); empty it or choose another --out"
        )


def generate(
    stars: int,
    seed: int,
    out: Path,
    contract: TableContract,
    files: int | None = None,
    processes: int | None = None,
    progress: bool = True,
) -> GenerationReport:
    """Write a ``stars``-row synthetic DR3 catalogue to ``out`` plus ``out/truth/source_truth-<seed>.parquet``.

    ``contract`` (the ``gaia_source`` contract) gives the files' column order, types and units.

    Positions are drawn for the whole catalogue first (about 50 bytes a star), sorted by their
    level-12 pixel to fix source_ids, random_index and the file ranges; then each file's sources
    are simulated and written by a pool of processes, each with its own random stream keyed on
    the seed and the file's first pixel, so the bytes do not depend on ``processes``.
    """
    if stars < 1:
        raise ValueError(f"stars must be positive, got {stars}")
    began = time.perf_counter()
    out = Path(out)
    files = DEFAULT_FILES if files is None else files
    if files < 1:
        raise ValueError(f"files must be positive, got {files}")
    processes = processes or len(os.sched_getaffinity(0))

    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(_SKY_STREAM,)))
    sky = sample_sky(rng, stars)
    hpx12 = healpix.radec_to_healpix(sky.ra, sky.dec, healpix.SOURCE_ID_LEVEL)
    order = np.argsort(hpx12, kind="stable")
    sky, hpx12 = sky.take(order), hpx12[order]
    source_id = assign_source_ids(hpx12)
    random_index = rng.permutation(stars)
    level8 = healpix.degrade(hpx12, healpix.SOURCE_ID_LEVEL, healpix.FILE_LEVEL)
    ranges = plan_files(level8, files)
    paths = [out / healpix.file_name(start, end) for start, end in ranges]
    truth = truth_path(out, seed)
    _refuse_stale(out, [*paths, truth])
    truth.parent.mkdir(parents=True, exist_ok=True)

    bounds = np.searchsorted(level8, [start for start, _ in ranges] + [healpix.npix(healpix.FILE_LEVEL)])
    tasks = [
        _FileTask(path, seed, start, sky.take(slice(lo, hi)), source_id[lo:hi], random_index[lo:hi], contract)
        for path, (start, _), lo, hi in zip(paths, ranges, bounds[:-1], bounds[1:])
    ]
    processes = max(1, min(processes, len(tasks)))
    written: Iterator[tuple[int, np.ndarray]]
    with contextlib.ExitStack() as stack:
        if processes == 1:
            written = map(_write_file, tasks)
        else:
            written = stack.enter_context(multiprocessing.get_context("spawn").Pool(processes)).imap(
                _write_file, tasks
            )
        results = list(
            tqdm(
                written,
                total=len(tasks),
                unit="file",
                desc="synthetic gaia",
                disable=None if progress else True,
            )
        )

    spurious = np.concatenate([flags for _, flags in results])
    truth_table = pa.table(
        {
            "source_id": pa.array(source_id),
            "spurious": pa.array(spurious),
            "population": pa.array(np.array(POPULATIONS)[sky.population]),
        }
    )
    sink = pa.BufferOutputStream()
    pq.write_table(truth_table, sink)
    write_atomic(truth, sink.getvalue().to_pybytes())
    counts = np.bincount(sky.population, minlength=len(POPULATIONS))
    return GenerationReport(
        stars=stars,
        seed=seed,
        populations={name: int(c) for name, c in zip(POPULATIONS, counts)},
        spurious=int(spurious.sum()),
        files=paths,
        truth=truth,
        bytes=sum(size for size, _ in results),
        seconds=time.perf_counter() - began,
        processes=processes,
    )
