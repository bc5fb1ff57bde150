"""Dagster assets, one module per thing they hold."""
