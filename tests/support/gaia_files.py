"""Write small Gaia bulk files by hand, for tests that need exact control of every row."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from gaia_flows.contracts import load_contract
from gaia_flows.science import healpix
from gaia_flows.science.ecsv import EcsvColumn, format_header

COLUMNS = [
    "solution_id",
    "designation",
    "source_id",
    "ref_epoch",
    "ra",
    "ra_error",
    "dec",
    "dec_error",
    "parallax",
    "pmra",
    "pmdec",
    "ruwe",
    "astrometric_params_solved",
]


def stars_in_region(region: str, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` valid rows whose positions (and so source_ids) fall inside ``region``."""
    rng = np.random.default_rng(seed)
    level, pixel = healpix.parse_region_key(region)
    lo, hi = healpix.children_range(pixel, level, healpix.SOURCE_ID_LEVEL)
    pix12 = np.sort(rng.integers(lo, hi + 1, n))
    ra, dec = healpix.healpix_centres(pix12, healpix.SOURCE_ID_LEVEL)
    source_id = (pix12 << 35) + np.arange(n)
    return {
        "solution_id": np.full(n, 375316653866487564),
        "designation": np.array([f'"Gaia DR3 {s}"' for s in source_id]),
        "source_id": source_id,
        "ref_epoch": np.full(n, 2016.0),
        "ra": ra,
        "ra_error": rng.uniform(0.01, 1.0, n),
        "dec": dec,
        "dec_error": rng.uniform(0.01, 1.0, n),
        "parallax": rng.normal(1.0, 1.0, n),
        "pmra": rng.normal(0.0, 5.0, n),
        "pmdec": rng.normal(0.0, 5.0, n),
        "ruwe": rng.uniform(0.8, 1.4, n),
        "astrometric_params_solved": np.full(n, 31),
    }


def render_rows(columns: dict[str, np.ndarray]) -> list[str]:
    names = list(columns)
    return [",".join(_token(columns[c][i]) for c in names) for i in range(len(columns[names[0]]))]


def set_token(row: str, column: str, token: str, names: list[str] = COLUMNS) -> str:
    """Replace one column's token in a rendered row (rows carry no quoted commas)."""
    parts = row.split(",")
    parts[names.index(column)] = token
    return ",".join(parts)


def _token(value) -> str:
    if isinstance(value, (float, np.floating)):
        return repr(float(value))
    return str(value)


def header_for(names: list[str]) -> str:
    contract = load_contract()
    return format_header(
        [EcsvColumn(n, contract.by_name[n].datatype, contract.by_name[n].unit) for n in names]
    )


def write_gaia_file(
    directory: Path,
    start: int,
    end: int,
    columns: dict[str, np.ndarray],
    rows: list[str] | None = None,
    header: str | None = None,
) -> Path:
    """A gzip Gaia file covering level-8 pixels ``start``..``end``; ``rows``/``header`` override
    the rendered text so a test can plant exactly the defect it is about."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / healpix.file_name(start, end)
    text = (
        (header if header is not None else header_for(list(columns)))
        + "\n".join(rows if rows is not None else render_rows(columns))
        + "\n"
    )
    with gzip.open(path, "wt") as handle:
        handle.write(text)
    return path


def region_file_range(region: str) -> tuple[int, int]:
    level, pixel = healpix.parse_region_key(region)
    return healpix.children_range(pixel, level, healpix.FILE_LEVEL)
