"""Dagster assets, one module per thing they hold."""

import warnings

from dagster import BetaWarning

# Single-run backfills are how 48 regions share one Spark application; the policy is marked
# beta, and its warning would otherwise repeat in every run's log.
warnings.filterwarnings("ignore", category=BetaWarning, message=".*backfill_policy.*")
