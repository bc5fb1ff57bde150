"""The engine's work-splitting arithmetic, without Spark."""

import pytest

from gaia_flows.engine.sizing import balanced_groups, files_per_region


def test_balanced_groups_put_the_largest_first_into_the_lightest_group():
    groups = balanced_groups({"a": 10, "b": 7, "c": 5, "d": 3, "e": 2}, 2)
    assert groups == [["a", "d"], ["b", "c", "e"]]  # loads 13 and 14
    assert sorted(k for g in groups for k in g) == ["a", "b", "c", "d", "e"]


def test_balanced_groups_never_make_empty_groups():
    assert balanced_groups({"a": 1, "b": 1}, 8) == [["a"], ["b"]]
    assert balanced_groups({}, 4) == [[]]


def test_files_per_region_round_up_and_keep_one_file_for_an_empty_region():
    assert files_per_region(0, 100) == 1
    assert files_per_region(100, 100) == 1
    assert files_per_region(101, 100) == 2
    with pytest.raises(ValueError, match="bucket_bytes"):
        files_per_region(1, 0)
    with pytest.raises(ValueError, match="region_bytes"):
        files_per_region(-1, 10)
