"""HEALPix arithmetic for Gaia: pure numpy, no Spark, no Dagster.

Gaia's ``source_id`` carries the level-12 *nested* HEALPix pixel of the position where the
source was first catalogued in its top bits (``source_id // 2**35``). In the nested scheme a
pixel at a coarser level is a right shift by two bits per level, so sky regions, file ranges
and map pixels all follow from integer shifts. healpy does the spherical geometry.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

# healpy (which imports astropy and matplotlib, ~1 s) is imported inside the functions that
# do spherical geometry, so region keys and shifts stay cheap for the CLI and re-plots.

SOURCE_ID_LEVEL = 12
SOURCE_ID_SHIFT = 35
REGION_LEVEL = 1
FILE_LEVEL = 8
MAX_LEVEL = 12

_REGION_RE = re.compile(r"^hpx(\d+)-(\d+)$")
_FILE_RE = re.compile(r"^GaiaSource_(\d{6})-(\d{6})\.csv(\.gz)?$")
FILE_GLOB = "GaiaSource_*.csv*"
"""Gaia bulk files as the archive names them (``GaiaSource_<hpx8start>-<hpx8end>.csv.gz``)."""


def nside(level: int) -> int:
    _check_level(level)
    return 1 << level


def npix(level: int) -> int:
    return 12 * 4**level


def _check_level(level: int) -> None:
    if not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"HEALPix level must be between 0 and {MAX_LEVEL}, got {level}")


def source_id_to_healpix(source_id, level: int = SOURCE_ID_LEVEL) -> np.ndarray:
    """Nested pixel index at ``level`` encoded in ``source_id``."""
    _check_level(level)
    return np.asarray(source_id, dtype=np.int64) >> (SOURCE_ID_SHIFT + 2 * (SOURCE_ID_LEVEL - level))


def source_id_shift(level: int) -> int:
    """Bits to shift a source_id right to get its nested pixel at ``level`` (for Spark SQL)."""
    _check_level(level)
    return SOURCE_ID_SHIFT + 2 * (SOURCE_ID_LEVEL - level)


def degrade(pixels, from_level: int, to_level: int) -> np.ndarray:
    """Parent pixel at a coarser level (nested scheme)."""
    if to_level > from_level:
        raise ValueError(f"cannot degrade from level {from_level} to finer level {to_level}")
    return np.asarray(pixels, dtype=np.int64) >> (2 * (from_level - to_level))


def children_range(pixel: int, from_level: int, to_level: int) -> tuple[int, int]:
    """Inclusive range of nested pixels at ``to_level`` inside ``pixel`` at ``from_level``."""
    if to_level < from_level:
        raise ValueError(f"level {to_level} is coarser than {from_level}")
    shift = 2 * (to_level - from_level)
    return pixel << shift, ((pixel + 1) << shift) - 1


def radec_to_healpix(ra, dec, level: int) -> np.ndarray:
    """Nested pixel of positions in degrees (ICRS)."""
    import healpy as hp

    return hp.ang2pix(
        nside(level), np.asarray(ra, float), np.asarray(dec, float), nest=True, lonlat=True
    ).astype(np.int64)


def healpix_centres(pixels, level: int) -> tuple[np.ndarray, np.ndarray]:
    """(ra, dec) in degrees of nested pixel centres."""
    import healpy as hp

    return hp.pix2ang(nside(level), np.asarray(pixels, dtype=np.int64), nest=True, lonlat=True)


def max_pixel_radius(level: int) -> float:
    """Largest angular distance (degrees) from a pixel's centre to its edge at ``level``:
    53.8\" at level 12, the farthest a position can sit from the centre of its own pixel."""
    import healpy as hp

    return float(hp.max_pixrad(nside(level), degrees=True))


def distance_to_centre(pixels, level: int, ra, dec) -> np.ndarray:
    """Angular distance (degrees) from positions (degrees, ICRS) to the centres of nested
    ``pixels`` at ``level``."""
    import healpy as hp

    centre = hp.pix2vec(nside(level), np.asarray(pixels, dtype=np.int64), nest=True)
    where = hp.ang2vec(np.asarray(ra, float), np.asarray(dec, float), lonlat=True)
    cosine = np.clip(np.einsum("ij,ji->i", np.atleast_2d(where), np.atleast_2d(np.array(centre))), -1.0, 1.0)
    return np.degrees(np.arccos(cosine))


# --- sky regions: the partition key of every per-region table -------------------------------------


def region_key(pixel: int, level: int = REGION_LEVEL) -> str:
    width = len(str(npix(level) - 1))
    return f"hpx{level}-{int(pixel):0{width}d}"


def region_keys(level: int = REGION_LEVEL) -> list[str]:
    return [region_key(p, level) for p in range(npix(level))]


def parse_region_key(key: str) -> tuple[int, int]:
    """``"hpx1-07"`` -> ``(level, pixel)``; rejects keys that name no pixel."""
    match = _REGION_RE.match(key)
    if not match:
        raise ValueError(f"not a sky-region key: {key!r} (expected like 'hpx1-07')")
    level, pixel = int(match.group(1)), int(match.group(2))
    _check_level(level)
    if pixel >= npix(level):
        raise ValueError(f"sky-region key {key!r}: pixel {pixel} >= {npix(level)} pixels at level {level}")
    return level, pixel


def region_of_source_id(source_id, level: int = REGION_LEVEL) -> np.ndarray:
    return source_id_to_healpix(source_id, level)


def region_source_id_range(key: str) -> tuple[int, int]:
    """Inclusive source_id range of a region, for predicate push-down and range checks."""
    level, pixel = parse_region_key(key)
    shift = source_id_shift(level)
    return pixel << shift, ((pixel + 1) << shift) - 1


# --- Gaia bulk file names -------------------------------------------------------------------------


def parse_file_range(name: str | Path) -> tuple[int, int]:
    """Inclusive level-8 nested pixel range that a ``GaiaSource_<start>-<end>.csv.gz`` covers."""
    base = Path(name).name
    match = _FILE_RE.match(base)
    if not match:
        raise ValueError(f"{name}: not a Gaia bulk file name (expected GaiaSource_NNNNNN-NNNNNN.csv.gz)")
    start, end = int(match.group(1)), int(match.group(2))
    if start > end or end >= npix(FILE_LEVEL):
        raise ValueError(
            f"{name}: level-8 range {start}-{end} is not a valid range of {npix(FILE_LEVEL)} pixels"
        )
    return start, end


def file_name(start: int, end: int) -> str:
    return f"GaiaSource_{start:06d}-{end:06d}.csv.gz"


def is_gaia_file_name(name: str | Path) -> bool:
    return bool(_FILE_RE.match(Path(name).name))


def files_for_region(paths: Iterable[Path], key: str) -> list[Path]:
    """Landing files whose level-8 range overlaps the region: the only files its run reads."""
    level, pixel = parse_region_key(key)
    lo, hi = children_range(pixel, level, FILE_LEVEL)
    chosen = []
    for path in paths:
        start, end = parse_file_range(path)
        if start <= hi and end >= lo:
            chosen.append(Path(path))
    return sorted(chosen)


def home_region_of_file(path: Path | str, level: int = REGION_LEVEL) -> int:
    """Region that answers for rows of a file that cannot be placed by their own source_id."""
    start, _ = parse_file_range(path)
    return int(degrade(start, FILE_LEVEL, level))
