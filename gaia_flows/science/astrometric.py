"""Good vs spurious astrometric solutions: selection, features and metrics. Pure pandas/numpy.

The selection follows the Gaia Catalogue of Nearby Stars (Smart et al. 2021, A&A 649, A6):

- *candidates*: ``|parallax| > parallax_min`` (8 mas) with a 5- or 6-parameter solution;
- *good*: ``parallax > parallax_min``, ``|b| > abs_b_min`` (25 deg), outside the Large and
  Small Magellanic Clouds (:func:`magellanic_masks`), and a BP/RP flux excess consistent with
  a single point source:
  ``|C*| < n_sigma * sigma_C*(G)`` with the colour polynomial of Riello et al. 2021 (A&A 649,
  A3, Table 2 and Eq. 18);
- *bad*: ``parallax < -parallax_min`` -- a negative parallax that large is unphysical, so the
  solution is spurious -- subsampled by ``random_index`` (a random permutation in Gaia) to the
  size of the good set.

The engine (Spark here) only maps these functions over batches; nothing here imports Spark or
Dagster, so every cut is unit-tested in milliseconds.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from gaia_flows.science.healpix import npix, source_id_to_healpix

# --- the model's features --------------------------------------------------------------------------

FEATURES: tuple[str, ...] = (
    "parallax_error",
    "parallax_over_error",
    "astrometric_sigma5d_max",
    "pmra_error",
    "pmdec_error",
    "astrometric_excess_noise",
    "ipd_gof_harmonic_amplitude",
    "ruwe",
    "visibility_periods_used",
    "pmdec",
    "pmra",
    "ipd_frac_odd_win",
    "ipd_frac_multi_peak",
    "astrometric_gof_al",
    "parallax_pmdec_corr",
    "astrometric_excess_noise_sig",
)
# Used as absolute values: the sign of the parallax *is* the training label, so a model that saw
# it would learn the selection instead of the solution quality. The models apply |x| themselves
# (it is idempotent), so callers always pass raw Gaia columns.
ABS_FEATURES: tuple[str, ...] = ("parallax_over_error",)

GOOD = 1
BAD = 0
REJECTED = -1
FIVE_OR_SIX_PARAMETER = (31, 95)

# Columns the training-set selection needs besides the features.
SELECTION_COLUMNS: tuple[str, ...] = (
    "source_id",
    "ra",
    "dec",
    "l",
    "b",
    "parallax",
    "random_index",
    "astrometric_params_solved",
    "phot_g_mean_mag",
    "bp_rp",
    "phot_bp_rp_excess_factor",
)
TRAINING_COLUMNS: tuple[str, ...] = SELECTION_COLUMNS + tuple(
    f for f in FEATURES if f not in SELECTION_COLUMNS
)


class FeatureError(ValueError):
    """Model input that cannot be scored; the message names the offending column."""


def entirely_null(name: str, rows: int) -> FeatureError:
    """The error for a feature column with no value at all, worded the same on every path."""
    return FeatureError(f"feature column '{name}' is entirely null ({rows} rows): the model cannot score it")


# --- cuts ------------------------------------------------------------------------------------------


MAGELLANIC_REGIONS = ("seed_boxes", "circles")
"""How the training set excludes the Magellanic Clouds.

``seed_boxes`` (the default): the equatorial boxes of the ROE Gaia data mining platform's Random
Forest notebook, :data:`LMC_BOX` and :data:`SMC_BOX` (761 and 225 deg²), which take in the
Clouds' outskirts as well as their bars.
``circles``: cones around the Clouds' centres as SIMBAD gives them (LMC 05 23 34.6 −69 45 22,
SMC 00 52 44.8 −72 49 43) with radii of 9° and 5° (254 and 79 deg²), a tighter cut around
the bodies; the radii are this project's choice, not a published one."""

LMC_BOX = ((40.0, 120.0), (-80.0, -55.0))
"""LMC box, ((ra_min, ra_max), (dec_min, dec_max)) in degrees, bounds excluded: 40 < ra < 120
and −80 < dec < −55."""
SMC_BOX = ((350.0, 40.0), (-80.0, -65.0))
"""SMC box across ra = 0: (ra > 350 or ra < 40) and −80 < dec < −65."""


@dataclass(frozen=True)
class GcnsCuts:
    """Every threshold of the training-set selection (defaults: Smart et al. 2021, and the
    Magellanic boxes of :data:`MAGELLANIC_REGIONS`)."""

    parallax_min_mas: float = 8.0
    abs_b_min_deg: float = 25.0
    exclude_magellanic_clouds: bool = True
    magellanic_regions: str = "seed_boxes"
    lmc_ra_deg: float = 80.8942
    lmc_dec_deg: float = -69.7561
    lmc_radius_deg: float = 9.0
    smc_ra_deg: float = 13.1867
    smc_dec_deg: float = -72.8286
    smc_radius_deg: float = 5.0
    excess_n_sigma: float = 2.0
    bad_per_good: float = 1.0

    def __post_init__(self) -> None:
        if self.magellanic_regions not in MAGELLANIC_REGIONS:
            raise ValueError(
                f"magellanic_regions must be one of {', '.join(MAGELLANIC_REGIONS)}, got {self.magellanic_regions!r}"
            )

    def as_dict(self) -> dict:
        return asdict(self)


def _in_box(ra: np.ndarray, dec: np.ndarray, box) -> np.ndarray:
    (ra_lo, ra_hi), (dec_lo, dec_hi) = box
    in_ra = (ra > ra_lo) & (ra < ra_hi) if ra_lo < ra_hi else (ra > ra_lo) | (ra < ra_hi)
    return in_ra & (dec > dec_lo) & (dec < dec_hi)


def magellanic_masks(ra, dec, cuts: GcnsCuts = GcnsCuts()) -> tuple[np.ndarray, np.ndarray]:
    """(in LMC, in SMC) for positions in degrees, by ``cuts.magellanic_regions``
    (:data:`MAGELLANIC_REGIONS`); False where a position is unknown."""
    ra, dec = np.asarray(ra, dtype=float), np.asarray(dec, dtype=float)
    with np.errstate(invalid="ignore"):
        if cuts.magellanic_regions == "seed_boxes":
            return _in_box(ra, dec, LMC_BOX), _in_box(ra, dec, SMC_BOX)
        return (
            angular_separation_deg(ra, dec, cuts.lmc_ra_deg, cuts.lmc_dec_deg) < cuts.lmc_radius_deg,
            angular_separation_deg(ra, dec, cuts.smc_ra_deg, cuts.smc_dec_deg) < cuts.smc_radius_deg,
        )


# Reasons a candidate is not in the good set, in the order the cuts are applied.
SELECTION_REASONS: tuple[str, ...] = (
    "good",
    "bad",
    "not_candidate",
    "low_latitude",
    "in_lmc",
    "in_smc",
    "no_bp_rp_photometry",
    "bp_rp_excess_inconsistent",
)


def excess_factor_expected(bp_rp) -> np.ndarray:
    """Riello et al. 2021 Table 2: the BP/RP flux excess factor of an isolated source, f(BP-RP)."""
    x = np.asarray(bp_rp, dtype=float)
    return np.where(
        x < 0.5,
        1.154360 + 0.033772 * x + 0.032277 * x**2,
        np.where(
            x < 4.0,
            1.162004 + 0.011464 * x + 0.049255 * x**2 - 0.005879 * x**3,
            1.057572 + 0.140537 * x,
        ),
    )


def excess_factor_corrected(excess_factor, bp_rp) -> np.ndarray:
    """C* = C - f(BP-RP); about zero for a well-behaved single source (NaN where unknown)."""
    return np.asarray(excess_factor, dtype=float) - excess_factor_expected(bp_rp)


def excess_factor_sigma(g_mag) -> np.ndarray:
    """Riello et al. 2021 Eq. 18: 1-sigma scatter of C* as a function of G."""
    g = np.asarray(g_mag, dtype=float)
    return 0.0059898 + 8.817481e-12 * g**7.618399


def excess_consistent(excess_factor, bp_rp, g_mag, n_sigma: float = 2.0) -> np.ndarray:
    """True where |C*| < n_sigma * sigma_C*(G); False where any input is missing."""
    c_star = excess_factor_corrected(excess_factor, bp_rp)
    sigma = excess_factor_sigma(g_mag)
    with np.errstate(invalid="ignore"):
        ok = np.abs(c_star) < n_sigma * sigma
    return ok & np.isfinite(c_star) & np.isfinite(sigma)


def angular_separation_deg(ra1, dec1, ra2, dec2) -> np.ndarray:
    """Great-circle distance in degrees (haversine, stable at small angles)."""
    ra1, dec1, ra2, dec2 = (np.radians(np.asarray(v, dtype=float)) for v in (ra1, dec1, ra2, dec2))
    h = np.sin((dec2 - dec1) / 2) ** 2 + np.cos(dec1) * np.cos(dec2) * np.sin((ra2 - ra1) / 2) ** 2
    return np.degrees(2 * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0))))


def candidate_mask(frame: pd.DataFrame, parallax_min_mas: float) -> np.ndarray:
    """The population the training set is drawn from and the classifier is applied to."""
    parallax = frame["parallax"].to_numpy(dtype=float, na_value=np.nan)
    solved = frame["astrometric_params_solved"].to_numpy(dtype=float, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        return (np.abs(parallax) > parallax_min_mas) & np.isin(solved, FIVE_OR_SIX_PARAMETER)


def selection_reason(frame: pd.DataFrame, cuts: GcnsCuts = GcnsCuts()) -> np.ndarray:
    """Per row, the first cut that decides it (one of ``SELECTION_REASONS``)."""
    n = len(frame)
    reason = np.full(n, "not_candidate", dtype=object)
    if n == 0:
        return reason
    col = lambda name: frame[name].to_numpy(dtype=float, na_value=np.nan)  # noqa: E731
    parallax = col("parallax")
    candidate = candidate_mask(frame, cuts.parallax_min_mas)
    with np.errstate(invalid="ignore"):
        positive = candidate & (parallax > 0)
        negative = candidate & (parallax < 0)
        reason[negative] = "bad"
        undecided = positive.copy()

        low_b = undecided & ~(np.abs(col("b")) > cuts.abs_b_min_deg)
        reason[low_b] = "low_latitude"
        undecided &= ~low_b

    if cuts.exclude_magellanic_clouds:
        for name, region in zip(("in_lmc", "in_smc"), magellanic_masks(col("ra"), col("dec"), cuts)):
            inside = undecided & region
            reason[inside] = name
            undecided &= ~inside

    bp_rp, excess, g = col("bp_rp"), col("phot_bp_rp_excess_factor"), col("phot_g_mean_mag")
    no_phot = undecided & ~(np.isfinite(bp_rp) & np.isfinite(excess) & np.isfinite(g))
    reason[no_phot] = "no_bp_rp_photometry"
    undecided &= ~no_phot
    inconsistent = undecided & ~excess_consistent(excess, bp_rp, g, cuts.excess_n_sigma)
    reason[inconsistent] = "bp_rp_excess_inconsistent"
    undecided &= ~inconsistent
    reason[undecided] = "good"
    return reason


def label_from_reason(reason) -> np.ndarray:
    reason = np.asarray(reason, dtype=object)
    return np.where(reason == "good", GOOD, np.where(reason == "bad", BAD, REJECTED)).astype(np.int8)


def holdout_mask(source_id, fraction: float = 0.33, seed: int = 42) -> np.ndarray:
    """Deterministic hold-out membership from ``source_id`` alone (splitmix64 hash).

    A source is in the hold-out of *every* version of the training set or of none, so a new
    model and the registered champion are compared on rows neither was trained on, and the same
    seed gives the same split whatever the row order or the engine.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"hold-out fraction must be in [0, 1], got {fraction}")
    x = np.asarray(source_id, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x ^ np.uint64((seed * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF)
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    uniform = (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return uniform < fraction


def label_batch(
    frame: pd.DataFrame, cuts: GcnsCuts, holdout_fraction: float, split_seed: int
) -> pd.DataFrame:
    """One batch of candidates with ``selection`` (reason), ``label`` and ``holdout`` added."""
    out = frame.copy()
    reason = selection_reason(frame, cuts)
    out["selection"] = pd.Series(reason, index=frame.index, dtype=object).astype(str)
    out["label"] = label_from_reason(reason)
    out["holdout"] = holdout_mask(frame["source_id"].to_numpy(), holdout_fraction, split_seed)
    return out


def subsample_bad(bad: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` bad rows with the smallest ``random_index`` (a fixed random subset)."""
    return bad.sort_values(["random_index", "source_id"], kind="stable").head(max(0, int(n)))


def select_training_set(
    frame: pd.DataFrame, cuts: GcnsCuts = GcnsCuts(), holdout_fraction: float = 0.33, split_seed: int = 42
) -> pd.DataFrame:
    """The whole selection on one frame (reference implementation; Spark does it at scale)."""
    labelled = label_batch(frame, cuts, holdout_fraction, split_seed)
    good = labelled[labelled["label"] == GOOD]
    bad = subsample_bad(labelled[labelled["label"] == BAD], round(len(good) * cuts.bad_per_good))
    return (
        pd.concat([good, bad])
        .drop(columns=["selection"])
        .sort_values("source_id", kind="stable")
        .reset_index(drop=True)
    )


# --- model input -----------------------------------------------------------------------------------


def check_feature_columns(columns) -> None:
    """Raise :class:`FeatureError` naming every feature column the input lacks."""
    present = set(columns)
    missing = [f for f in FEATURES if f not in present]
    if missing:
        raise FeatureError(
            f"model input is missing feature column(s): {', '.join(missing)} (the model needs {', '.join(FEATURES)})"
        )


def feature_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The 16 features as float64 in model order, validated.

    Missing columns, non-numeric columns and columns that are entirely null raise
    :class:`FeatureError` naming the column; isolated nulls stay NaN (training drops those
    rows, scoring lets the forest route them).
    """
    check_feature_columns(frame.columns)
    n = len(frame)
    out = {}
    for name in FEATURES:
        column = frame[name]
        try:
            values = pd.to_numeric(column, errors="raise").astype("float64")
        except (TypeError, ValueError) as exc:
            raise FeatureError(
                f"feature column '{name}' is not numeric (dtype {column.dtype}): {exc}"
            ) from exc
        if n and values.isna().all():
            raise entirely_null(name, n)
        out[name] = values.to_numpy()
    return pd.DataFrame(out, index=frame.index)


def absolute_features(features: pd.DataFrame) -> pd.DataFrame:
    out = features.copy()
    for name in ABS_FEATURES:
        out[name] = out[name].abs()
    return out


def complete_rows(features: pd.DataFrame) -> np.ndarray:
    """Rows with every feature present (training uses only these)."""
    return features.notna().all(axis=1).to_numpy()


# --- metrics ---------------------------------------------------------------------------------------


def classification_metrics(label, probability_good, threshold: float = 0.5) -> dict[str, float]:
    """Hold-out metrics; precision/recall/F1 are for the *good* class (label 1)."""
    from sklearn import metrics as skm

    y = np.asarray(label).astype(int)
    p = np.asarray(probability_good, dtype=float)
    if len(y) == 0:
        raise ValueError("cannot compute metrics on an empty hold-out")
    predicted = (p >= threshold).astype(int)
    accuracy = float(skm.accuracy_score(y, predicted))
    both = len(np.unique(y)) == 2
    return {
        "accuracy": accuracy,
        "misclassification_rate": 1.0 - accuracy,
        "precision": float(skm.precision_score(y, predicted, pos_label=GOOD, zero_division=0)),
        "recall": float(skm.recall_score(y, predicted, pos_label=GOOD, zero_division=0)),
        "f1": float(skm.f1_score(y, predicted, pos_label=GOOD, zero_division=0)),
        "precision_bad": float(skm.precision_score(y, predicted, pos_label=BAD, zero_division=0)),
        "recall_bad": float(skm.recall_score(y, predicted, pos_label=BAD, zero_division=0)),
        "roc_auc": float(skm.roc_auc_score(y, p)) if both else float("nan"),
        "holdout_rows": float(len(y)),
    }


def confusion(label, probability_good, threshold: float = 0.5) -> np.ndarray:
    """2x2 counts, rows = truth (bad, good), columns = predicted (bad, good)."""
    y = np.asarray(label).astype(int)
    predicted = (np.asarray(probability_good, dtype=float) >= threshold).astype(int)
    out = np.zeros((2, 2), dtype=np.int64)
    np.add.at(out, (y, predicted), 1)
    return out


def sky_counts(source_id, level: int, weights=None) -> np.ndarray:
    """Counts (or weighted sums) per nested HEALPix pixel at ``level`` from ``source_id``."""
    pixels = source_id_to_healpix(np.asarray(source_id, dtype=np.int64), level)
    return np.bincount(pixels, weights=weights, minlength=npix(level)).astype(float)
