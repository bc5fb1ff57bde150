"""How the engine splits work: input files into balanced task groups, a region into Parquet files.

Pure arithmetic (no Spark), shared by the engine and by the cluster planner, which sizes the
files a region is written as from the memory of the workers it plans.
"""

from __future__ import annotations

import math


def balanced_groups(weights: dict[str, int], groups: int) -> list[list[str]]:
    """Keys in at most ``groups`` groups of similar total weight (bytes of input, say): largest
    first into the lightest group, how Spark tasks that each take a group finish together."""
    bins: list[list[str]] = [[] for _ in range(max(1, min(groups, len(weights))))]
    load = [0] * len(bins)
    for key in sorted(weights, key=weights.get, reverse=True):
        lightest = load.index(min(load))
        bins[lightest].append(key)
        load[lightest] += weights[key]
    return bins


def files_per_region(region_bytes: int, bucket_bytes: int) -> int:
    """Number of Parquet files for one sky region, each at most ``bucket_bytes`` (input bytes).

    A bucket no larger than the memory a task has means a region file is read in one
    sequential pass and can be held whole, so neighbours on the sky stay in one file.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    if region_bytes < 0:
        raise ValueError(f"region_bytes must not be negative, got {region_bytes}")
    return max(1, math.ceil(region_bytes / bucket_bytes))
