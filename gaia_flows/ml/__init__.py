"""The astrometric-quality classifier as library code: training-set selection, training and
MLflow logging, the model registry's champion, and the figures, each callable without Dagster.

The assets in :mod:`gaia_flows.assets.classifier` wire resources to these functions and turn
their results into metadata.
"""
