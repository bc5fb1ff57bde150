"""Proper-motion statistics without Spark: the numpy path, merging, degrading, finalising and
the stored-map readers, each against DuckDB SQL on the same Parquet files (a different engine
and a different formula: DuckDB's avg/stddev_samp, not our sums)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from dagster import materialize
from PIL import Image
from support.spark import TEST_SPARK_CONF

from gaia_flows import maps
from gaia_flows import spark as spark_factory
from gaia_flows.assets.catalogue import gaia_landing, gaia_source
from gaia_flows.assets.proper_motion import pm_stats, pm_stats_counts_match_gaia_source, pm_stats_current
from gaia_flows.assets.proper_motion_maps import maps_consistent, proper_motion_maps
from gaia_flows.contracts import load_contract
from gaia_flows.engine.pm_stats import (
    LISTING_THRESHOLD,
    InputColumnsError,
    StatsPublisher,
    choose_engine,
    compute_pm_stats,
    compute_region_stats,
    driver_listing,
    read_input,
    region_stats,
    stats_in_region_tasks,
)
from gaia_flows.engine.tables import read_regions
from gaia_flows.layout import REGION_MANIFEST, SOURCE_TABLE, StateLayout
from gaia_flows.maps import publish_pyramid
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource
from gaia_flows.science import healpix, synthetic
from gaia_flows.science import proper_motion as pm
from gaia_flows.warehouse import publish, write_region_arrow, write_table_files

RTOL = 1e-9
L_MAX = 8
REGIONS = ("hpx1-00", "hpx1-07", "hpx1-33")  # three regions, one of them made empty below


def make_rows(rng: np.random.Generator, region: str, n: int) -> pa.Table:
    """gaia_source-shaped rows inside ``region``, sorted by source_id, with the awkward cases:
    2-parameter solutions (null pm and errors), a pm with a null error, a zero error, a pixel
    holding one single star and a pixel holding only 2-parameter sources."""
    level, pixel = healpix.parse_region_key(region)
    lo, _ = healpix.children_range(pixel, level, L_MAX)
    # Crowd the stars into the first 40 level-8 pixels of the region (many stars each) and
    # leave the rest of the region empty; then add a lone star and a 2p-only pixel.
    pix8 = rng.integers(lo, lo + 40, n)
    pix8[-1] = lo + 100  # a single-star pixel
    pix8[-2:-5:-1] = lo + 200  # three sources, all without proper motion
    sid = np.sort(
        (pix8 << healpix.source_id_shift(L_MAX)) + rng.integers(0, 1 << healpix.source_id_shift(L_MAX), n)
    )
    order_pix = sid >> healpix.source_id_shift(L_MAX)
    two_param = rng.random(n) < 0.2
    two_param |= order_pix == lo + 200
    two_param[order_pix == lo + 100] = False
    pmra = rng.normal(-3.0, 4.0, n) + 10.0 * (order_pix % 3)
    pmdec = rng.normal(-5.0, 3.0, n)
    pmra_error = rng.lognormal(-1.0, 0.6, n).astype(np.float32)
    pmdec_error = rng.lognormal(-1.0, 0.6, n).astype(np.float32)
    null_error = (rng.random(n) < 0.03) & ~two_param
    zero_error = (rng.random(n) < 0.01) & ~two_param
    pmra_error[zero_error] = 0.0
    return pa.table(
        {
            "source_id": pa.array(sid, pa.int64()),
            "ra": pa.array(rng.uniform(0, 360, n)),
            "dec": pa.array(rng.uniform(-90, 90, n)),
            "pmra": pa.array(pmra, pa.float64(), mask=two_param),
            "pmra_error": pa.array(pmra_error, pa.float32(), mask=two_param | null_error),
            "pmdec": pa.array(pmdec, pa.float64(), mask=two_param),
            "pmdec_error": pa.array(pmdec_error, pa.float32(), mask=two_param),
            "astrometric_params_solved": pa.array(np.where(two_param, 3, 31).astype(np.int8)),
        }
    )


def publish_catalogue(layout: StateLayout, sizes: dict[str, int], seed: int = 7) -> dict[str, pa.Table]:
    rng = np.random.default_rng(seed)
    out = {}
    for region, n in sizes.items():
        rows = make_rows(rng, region, n) if n else make_rows(rng, region, 10).slice(0, 0)
        write_region_arrow(rows, layout, "gaia_source", region, manifest={"rows_accepted": rows.num_rows})
        out[region] = rows
    return out


def source_files(layout: StateLayout) -> list[str]:
    """The Parquet files of every published gaia_source region (never the .versions copies)."""
    files = []
    for region in layout.region_versions(SOURCE_TABLE):
        files += sorted(str(p) for p in layout.region_dir("gaia_source", region).glob("*.parquet"))
    return files


def duckdb_reference(files: list[str], level: int) -> dict[str, np.ndarray]:
    """Per-pixel counts and means by DuckDB SQL, dense over all pixels of ``level`` (NaN where a
    pixel has no proper motion, 0 counts where it has no source)."""
    shift = healpix.source_id_shift(level)
    has_pm = "pmra IS NOT NULL AND pmdec IS NOT NULL AND NOT isnan(pmra) AND NOT isnan(pmdec)"
    ok_ra = f"{has_pm} AND pmra_error IS NOT NULL AND pmra_error > 0"
    ok_dec = f"{has_pm} AND pmdec_error IS NOT NULL AND pmdec_error > 0"
    sql = f"""
        SELECT source_id >> {shift} AS pixel,
               count(*) AS n_sources,
               count(*) FILTER (WHERE {has_pm}) AS n_pm,
               avg(pmra) FILTER (WHERE {has_pm}) AS mean_pmra,
               avg(pmdec) FILTER (WHERE {has_pm}) AS mean_pmdec,
               stddev_samp(pmra) FILTER (WHERE {has_pm}) AS std_pmra,
               stddev_samp(pmdec) FILTER (WHERE {has_pm}) AS std_pmdec,
               sum(pmra / pow(pmra_error::DOUBLE, 2)) FILTER (WHERE {ok_ra})
                 / sum(1 / pow(pmra_error::DOUBLE, 2)) FILTER (WHERE {ok_ra}) AS wmean_pmra,
               sum(pmdec / pow(pmdec_error::DOUBLE, 2)) FILTER (WHERE {ok_dec})
                 / sum(1 / pow(pmdec_error::DOUBLE, 2)) FILTER (WHERE {ok_dec}) AS wmean_pmdec
        FROM read_parquet({files!r})
        GROUP BY 1 ORDER BY 1
    """
    got = duckdb.sql(sql).fetchnumpy()
    size = healpix.npix(level)
    dense = {}
    pixel = np.asarray(got["pixel"], dtype=np.int64)
    for name in ("n_sources", "n_pm"):
        dense[name] = np.zeros(size, dtype=np.int64)
        dense[name][pixel] = np.asarray(got[name])
    for name in ("mean_pmra", "mean_pmdec", "std_pmra", "std_pmdec", "wmean_pmra", "wmean_pmdec"):
        values = np.ma.filled(np.ma.asarray(got[name]).astype(float), np.nan)
        dense[name] = np.full(size, np.nan)
        dense[name][pixel] = values
    return dense


def assert_matches_reference(table: pa.Table, reference: dict[str, np.ndarray]) -> None:
    for name, expected in reference.items():
        actual = table.column(name).to_numpy(zero_copy_only=False)
        if expected.dtype.kind == "i":
            np.testing.assert_array_equal(actual, expected, err_msg=name)
        else:
            np.testing.assert_array_equal(
                np.isnan(actual), np.isnan(expected), err_msg=f"{name}: NaN pattern"
            )
            np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=0, equal_nan=True, err_msg=name)


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory):
    layout = StateLayout.from_env(tmp_path_factory.mktemp("pmhome")).ensure()
    rows = publish_catalogue(layout, {REGIONS[0]: 3000, REGIONS[1]: 2000, REGIONS[2]: 0})
    return layout, rows


# --- the numpy path against DuckDB ---------------------------------------------------------------


@pytest.mark.parametrize("level", [0, 6, L_MAX])
def test_numpy_statistics_match_duckdb(catalogue, level):
    layout, rows = catalogue
    stats = pm.stats_from_table(pa.concat_tables(rows.values()), level)
    table = pm.finalise(stats)
    assert table.num_rows == healpix.npix(level)
    assert_matches_reference(table, duckdb_reference(source_files(layout), level))


def test_single_star_empty_and_no_pm_pixels(catalogue):
    layout, rows = catalogue
    lo, _ = healpix.children_range(healpix.parse_region_key(REGIONS[0])[1], 1, L_MAX)
    table = pm.finalise(pm.stats_from_table(rows[REGIONS[0]], L_MAX))
    lone, no_pm, empty = lo + 100, lo + 200, lo + 300
    col = {name: table.column(name).to_numpy() for name in table.column_names}
    star = rows[REGIONS[0]].filter(
        pc.equal(pc.shift_right(rows[REGIONS[0]].column("source_id"), healpix.source_id_shift(L_MAX)), lone)
    )
    assert col["n_sources"][lone] == col["n_pm"][lone] == 1
    assert col["mean_pmra"][lone] == star.column("pmra")[0].as_py()
    assert np.isnan(col["std_pmra"][lone])  # one star has no sample dispersion
    assert col["n_sources"][no_pm] == 3 and col["n_pm"][no_pm] == 0 and col["n_no_pm"][no_pm] == 3
    assert np.isnan(col["mean_pmra"][no_pm]) and np.isnan(col["wmean_pmdec"][no_pm])
    assert col["n_sources"][empty] == 0
    for name in (
        "mean_pmra",
        "mean_pmdec",
        "std_pmra",
        "wmean_pmra",
        "wmean_pmra_measurement_error",
        "wmean_pmra_total_error",
        "neff_pmra",
        "wstd_pmdec",
    ):
        assert np.isnan(col[name][empty]), name
    # 2-parameter sources are counted, never averaged as zero
    assert int(col["n_no_pm"].sum()) == int(pc.sum(pc.is_null(rows[REGIONS[0]].column("pmra"))).as_py())


def test_merge_of_regions_equals_all_at_once(catalogue):
    _, rows = catalogue
    per_region = [pm.stats_from_table(t, L_MAX) for t in rows.values()]
    merged = pm.merge(per_region)
    direct = pm.stats_from_table(pa.concat_tables(rows.values()), L_MAX)
    assert merged.column("pixel").equals(direct.column("pixel"))
    for name in pm.STAT_COLUMNS:
        np.testing.assert_allclose(
            merged.column(name).to_numpy(), direct.column(name).to_numpy(), rtol=1e-12, err_msg=name
        )
    # and in any order, in pieces that share pixels
    whole = pa.concat_tables(rows.values())
    pieces = [pm.stats_from_table(whole.slice(i, 700), L_MAX) for i in range(0, whole.num_rows, 700)][::-1]
    np.testing.assert_allclose(
        pm.merge(pieces).column("sum_pmra2").to_numpy(), direct.column("sum_pmra2").to_numpy(), rtol=1e-12
    )


@pytest.mark.parametrize("level", [0, 3, 6])
def test_degrade_equals_direct_computation(catalogue, level):
    _, rows = catalogue
    whole = pa.concat_tables(rows.values())
    degraded = pm.degrade(pm.stats_from_table(whole, L_MAX), level)
    direct = pm.stats_from_table(whole, level)
    assert pm.stats_level(degraded) == level
    assert degraded.column("pixel").equals(direct.column("pixel"))
    for name in pm.STAT_COLUMNS:
        np.testing.assert_allclose(
            degraded.column(name).to_numpy(), direct.column(name).to_numpy(), rtol=1e-12, err_msg=name
        )


def test_merge_brings_mixed_levels_to_the_coarsest(catalogue):
    _, rows = catalogue
    a = pm.stats_from_table(rows[REGIONS[0]], 8)
    b = pm.stats_from_table(rows[REGIONS[1]], 5)
    merged = pm.merge([a, b])
    assert pm.stats_level(merged) == 5
    assert pm.totals(merged)["n_sources"] == rows[REGIONS[0]].num_rows + rows[REGIONS[1]].num_rows
    with pytest.raises(ValueError):
        pm.merge([a, b], level=6)
    with pytest.raises(ValueError):
        pm.degrade(b, 6)


def test_pyramid_holds_every_level(catalogue):
    _, rows = catalogue
    stats = pm.stats_from_table(pa.concat_tables(rows.values()), L_MAX)
    stacked = pm.pyramid(stats)
    assert sorted(set(stacked.column("level").to_pylist())) == list(range(L_MAX + 1))
    for level in (0, 4, L_MAX):
        cut, direct = pm.from_pyramid(stacked, level), pm.degrade(stats, level)
        assert cut.schema.equals(direct.schema, check_metadata=True)
        assert cut.column("pixel").equals(direct.column("pixel"))
        for name in pm.STAT_COLUMNS:  # summed in another order: equal to rounding
            np.testing.assert_allclose(
                cut.column(name).to_numpy(), direct.column(name).to_numpy(), rtol=1e-12, err_msg=name
            )
    with pytest.raises(ValueError):
        pm.from_pyramid(stacked, L_MAX + 1)


def test_empty_input_and_dense_map_are_nan_not_garbage():
    stats = pm.stats_from_columns(np.array([], np.int64), [], [], [], [], level=3)
    assert stats.num_rows == 0 and pm.stats_level(stats) == 3
    table = pm.finalise(stats)
    assert table.num_rows == healpix.npix(3)
    assert np.all(table.column("n_sources").to_numpy() == 0)
    assert np.all(np.isnan(table.column("mean_pmra").to_numpy()))
    assert pm.finalise(stats, dense=False).num_rows == 0


def test_constant_pixel_has_zero_dispersion_and_exact_weighted_mean():
    sid = np.full(5, 12345 << healpix.SOURCE_ID_SHIFT, dtype=np.int64) + np.arange(5)
    error = np.array([0.1, 0.2, 0.3, 0.4, np.nan])
    stats = pm.stats_from_columns(
        sid, np.full(5, 0.3), np.array([1.0, 2.0, 3.0, 4.0, 5.0]), error, error, level=6
    )
    row = pm.finalise(stats, dense=False).to_pylist()[0]
    assert row["std_pmra"] == 0.0
    w = 1 / error[:4] ** 2
    assert row["wmean_pmdec"] == pytest.approx(np.sum(w * np.arange(1, 5)) / w.sum(), rel=1e-12)
    assert row["wmean_pmdec_measurement_error"] == pytest.approx(1 / np.sqrt(w.sum()), rel=1e-12)
    assert row["mean_pmdec"] == 3.0  # the source without an error still counts in the plain mean


@pytest.mark.parametrize("block_rows", [1, 7, 1000])
def test_blocked_sums_equal_per_pixel_bincount(catalogue, block_rows):
    """Blocks that cut pixels' runs of rows, unsorted rows and unusable errors (NaN, null, 0,
    negative, infinite) against per-pixel sums by ``np.bincount``, term by term."""
    _, rows = catalogue
    whole = pa.concat_tables(rows.values())
    rng = np.random.default_rng(5)
    order = rng.permutation(whole.num_rows)
    error = whole.column("pmra_error").to_numpy(zero_copy_only=False).astype(np.float32)[order]
    error[rng.choice(error.size, 60, replace=False)] = rng.choice([np.nan, 0.0, -0.2, np.inf], 60)
    pmra_error = pa.array(error, mask=np.arange(error.size) % 97 == 0)
    sid = whole.column("source_id").to_numpy()[order]
    pmra, pmdec = (whole.column(c).to_numpy(zero_copy_only=False)[order] for c in ("pmra", "pmdec"))
    stats = pm.stats_from_columns(
        pa.array(sid),
        pa.array(pmra),
        pa.array(pmdec),
        pmra_error,
        pa.array(error),
        level=L_MAX,
        block_rows=block_rows,
    )

    pixel, index = np.unique(sid >> healpix.source_id_shift(L_MAX), return_inverse=True)
    has = ~np.isnan(pmra) & ~np.isnan(pmdec)
    err_ra = np.where(np.arange(error.size) % 97 == 0, np.nan, error).astype(np.float64)
    with np.errstate(divide="ignore"):
        w_ra = np.where(has & (err_ra > 0) & np.isfinite(err_ra), 1 / err_ra**2, 0.0)
        w_dec = np.where(has & (error > 0) & np.isfinite(error), 1 / error.astype(np.float64) ** 2, 0.0)
    x, y = np.where(has, pmra, 0.0), np.where(has, pmdec, 0.0)
    expected = {
        "n_sources": np.ones(sid.size),
        "n_pm": has,
        "sum_pmra": x,
        "sum_pmdec": y,
        "sum_pmra2": x * x,
        "sum_pmdec2": y * y,
        "sumw_pmra": w_ra,
        "sumw_pmdec": w_dec,
        "sumwx_pmra": w_ra * x,
        "sumwx_pmdec": w_dec * y,
        "sumwx2_pmra": w_ra * x * x,
        "sumwx2_pmdec": w_dec * y * y,
        "sumw2_pmra": w_ra * w_ra,
        "sumw2_pmdec": w_dec * w_dec,
    }
    assert stats.column("pixel").to_numpy().tolist() == pixel.tolist()
    for name, terms in expected.items():
        np.testing.assert_allclose(
            stats.column(name).to_numpy(),
            np.bincount(index, weights=terms.astype(np.float64)),
            rtol=1e-12,
            err_msg=name,
        )
    assert np.count_nonzero(w_ra == 0) > np.count_nonzero(~has)  # the unusable errors were there


def _pixels_with_intrinsic_spread(
    rng: np.random.Generator, pixels: int, stars: int, spread: float
) -> pa.Table:
    """``pixels`` pixels of ``stars`` stars each: true motions N(3, spread) mas/yr, DR3-like
    errors log-uniform in 0.02..1 mas/yr (bright stars precise, faint ones not), observed with
    those errors; every pixel an independent realisation of the same population."""
    n = pixels * stars
    sid = (
        np.repeat(np.arange(pixels, dtype=np.int64) * 7 + 1000, stars) << healpix.source_id_shift(6)
    ) + np.tile(np.arange(stars), pixels)
    error = np.exp(rng.uniform(np.log(0.02), np.log(1.0), (2, n)))
    true = rng.normal(3.0, spread, (2, n))
    observed = true + error * rng.standard_normal((2, n))
    return pm.finalise(
        pm.stats_from_columns(sid, observed[0], observed[1], error[0], error[1], level=6), dense=False
    )


def test_dispersion_aware_error_matches_the_scatter_of_the_weighted_mean():
    """Over 1,000 realisations of a pixel of 2,000 stars with a 6 mas/yr intrinsic spread, the
    weighted mean scatters as wmean_*_total_error says (within 10 %), the plain mean as
    sem_* says, while wmean_*_measurement_error is two orders of magnitude too small."""
    table = _pixels_with_intrinsic_spread(np.random.default_rng(2026), 1000, 2000, 6.0)
    col = {name: table.column(name).to_numpy() for name in table.column_names}
    for comp in ("pmra", "pmdec"):
        scatter = np.std(col[f"wmean_{comp}"], ddof=1)
        stated = np.sqrt(np.mean(col[f"wmean_{comp}_total_error"] ** 2))
        assert stated == pytest.approx(scatter, rel=0.10), comp
        assert np.sqrt(np.mean(col[f"sem_{comp}"] ** 2)) == pytest.approx(
            np.std(col[f"mean_{comp}"], ddof=1), rel=0.10
        ), comp
        assert np.max(col[f"wmean_{comp}_measurement_error"]) < scatter / 50
        # the weighted mean rests on far fewer stars than the pixel holds, and is the noisier mean
        assert np.all(col[f"neff_{comp}"] < 0.5 * 2000)
        assert scatter > np.std(col[f"mean_{comp}"], ddof=1)


def test_equal_weights_make_the_weighted_quantities_the_plain_ones():
    rng = np.random.default_rng(3)
    sid = np.full(50, 77 << healpix.source_id_shift(6), dtype=np.int64) + np.arange(50)
    stats = pm.stats_from_columns(
        sid, rng.normal(0, 4, 50), rng.normal(0, 4, 50), np.full(50, 0.5), np.full(50, 0.5), level=6
    )
    row = pm.finalise(stats, dense=False).to_pylist()[0]
    for comp in ("pmra", "pmdec"):
        assert row[f"neff_{comp}"] == pytest.approx(50.0, rel=1e-12)
        assert row[f"wmean_{comp}"] == pytest.approx(row[f"mean_{comp}"], rel=1e-12)
        assert row[f"wmean_{comp}_total_error"] == pytest.approx(row[f"sem_{comp}"], rel=1e-9)


def test_conform_accepts_engine_output_with_nulls_and_any_order():
    raw = pa.table({name: pa.array([2, 1], pa.int64()) for name in ("pixel", "n_sources", "n_pm")})
    for name in pm.SUM_COLUMNS:
        raw = raw.append_column(name, pa.array([None, 1.5], pa.float64()))
    stats = pm.conform(raw, 4)
    assert stats.column("pixel").to_pylist() == [1, 2]
    assert stats.column("sum_pmra").to_pylist() == [1.5, 0.0]
    assert stats.schema.equals(pm.stats_schema(4), check_metadata=True)


# --- stored statistics: map_table, staleness, PNG, CLI ----------------------------------------------


@pytest.fixture()
def stored(tmp_path):
    """A state folder with per-region statistics published like pm_stats does (no Spark)."""
    layout = StateLayout.from_env(tmp_path / "home").ensure()
    rows = publish_catalogue(layout, {REGIONS[0]: 3000, REGIONS[1]: 2000, REGIONS[2]: 0}, seed=11)
    for region, table in rows.items():
        write_region_arrow(
            pm.stats_from_table(table, L_MAX), layout, maps.STATS_TABLE, region, manifest={"level": L_MAX}
        )
    return layout, rows


@pytest.mark.parametrize("level", [0, 6, L_MAX])
def test_map_table_from_regions_and_from_pyramid_match_duckdb(stored, level):
    layout, _ = stored
    reference = duckdb_reference(source_files(layout), level)
    assert maps.pyramid_level(layout, level) is None
    assert_matches_reference(maps.map_table(level, layout), reference)  # merged from pm_stats
    publish_pyramid(layout, [])
    assert maps.pyramid_level(layout, level) is not None
    assert_matches_reference(maps.map_table(level, layout), reference)  # cut from the pyramid


def _assert_stats_equal(got: pa.Table, want: pa.Table, what) -> None:
    assert got.column("pixel").equals(want.column("pixel")), what
    for name in pm.STAT_COLUMNS:
        np.testing.assert_allclose(
            got.column(name).to_numpy(),
            want.column(name).to_numpy(),
            rtol=RTOL,
            atol=1e-9,
            err_msg=f"{what} {name}",
        )


@pytest.mark.parametrize("top", [L_MAX, 1, 0])
def test_pyramid_streamed_region_by_region_equals_the_merged_sky(stored, top):
    """The maps asset builds the pyramid one region at a time: every level 0..top as stored
    (the regions' own levels in their files, the coarser ones from 3 carried rows, or everything
    carried when top is coarser than the regions) and the kept levels equal the whole sky merged
    at once."""
    layout, _ = stored
    for region, stats in maps.read_region_stats(layout).items():
        write_region_arrow(pm.degrade(stats, top), layout, maps.STATS_TABLE, region, manifest={"level": top})
    merged = maps.merged_region_stats(layout, top)
    keep = sorted({0, min(6, top), top})
    _, pyramid = publish_pyramid(layout, keep)
    for level in range(top + 1):
        want = pm.degrade(merged, level)
        _assert_stats_equal(maps.pyramid_level(layout, level), want, level)
        if level in keep:
            _assert_stats_equal(pyramid.kept(level), want, f"kept {level}")
    assert pyramid.totals == pm.totals(merged)
    stored_files = sorted(p.name for p in layout.table(maps.MAPS_TABLE).glob("*.parquet"))
    assert stored_files == sorted(
        [maps.SKY_FILE] + ([maps.region_file(r) for r in REGIONS] if top > maps.HELD_LEVEL else [])
    )


def test_pyramid_is_stored_one_row_group_per_level(stored):
    """What lets a re-plot decode one level instead of the whole pyramid: the all-sky file
    holds levels 0-6, each region's file its levels 7..L_max, one row group each."""
    layout, rows = stored
    publish_pyramid(layout, [])
    root = layout.table(maps.MAPS_TABLE)
    regions = [
        (maps.region_file(r), range(maps.HELD_LEVEL + 1, L_MAX + 1) if rows[r].num_rows else [])
        for r in REGIONS
    ]
    for name, levels in [(maps.SKY_FILE, range(maps.HELD_LEVEL + 1)), *regions]:
        meta = pq.ParquetFile(root / name).metadata
        column = meta.schema.to_arrow_schema().get_field_index("level")
        groups = [
            (meta.row_group(i).column(column).statistics.min, meta.row_group(i).column(column).statistics.max)
            for i in range(meta.num_row_groups)
        ]
        assert groups == [(lv, lv) for lv in levels], name
    assert (
        maps._level_row_groups(root / maps.SKY_FILE, [6]).num_rows
        == pq.ParquetFile(root / maps.SKY_FILE).metadata.row_group(6).num_rows
    )


def test_pyramid_refresh_rewrites_only_the_changed_region(stored):
    """After one region's statistics are republished, the next build hard-links the other
    regions' files (same inode), rewrites the changed one, and stores what a build from
    scratch stores, level by level."""
    layout, rows = stored
    publish_pyramid(layout, [])
    root = layout.table(maps.MAPS_TABLE)
    inodes = {r: (root / maps.region_file(r)).stat().st_ino for r in REGIONS}
    changed = rows[REGIONS[1]].slice(0, 1500)  # the region's input lost rows
    write_region_arrow(changed, layout, "gaia_source", REGIONS[1])
    write_region_arrow(
        pm.stats_from_table(changed, L_MAX), layout, maps.STATS_TABLE, REGIONS[1], manifest={"level": L_MAX}
    )
    assert maps.pyramid_level(layout, 6) is None  # stale now: not used by readers

    _, pyramid = publish_pyramid(layout, [6, L_MAX])
    assert pyramid.reused == [REGIONS[0], REGIONS[2]]
    assert {r: (root / maps.region_file(r)).stat().st_ino for r in REGIONS} == {
        **inodes,
        REGIONS[1]: (root / maps.region_file(REGIONS[1])).stat().st_ino,
    }
    assert (root / maps.region_file(REGIONS[1])).stat().st_ino != inodes[REGIONS[1]]
    refreshed = {level: maps.pyramid_level(layout, level) for level in range(L_MAX + 1)}
    kept = {level: pyramid.kept(level) for level in (6, L_MAX)}
    assert pyramid.totals["n_sources"] == rows[REGIONS[0]].num_rows + 1500

    shutil.rmtree(root.resolve())
    root.unlink()
    _, scratch = publish_pyramid(layout, [6, L_MAX])
    assert scratch.reused == [] and scratch.totals == pyramid.totals
    for level, stats in refreshed.items():
        _assert_stats_equal(stats, maps.pyramid_level(layout, level), level)
    for level, stats in kept.items():
        _assert_stats_equal(stats, scratch.kept(level), f"kept {level}")
    assert_matches_reference(maps.map_table(L_MAX, layout), duckdb_reference(source_files(layout), L_MAX))


def test_a_table_that_fails_to_write_leaves_the_published_version_alone(stored):
    """Rows not grouped by the row-group key stop the publish: the maps readers keep the
    version they had, and no staging directory is left behind."""
    layout, _ = stored
    publish_pyramid(layout, [])
    before = os.readlink(layout.table(maps.MAPS_TABLE))
    sky = maps.pyramid_level(layout, 3)
    bad = pm.pyramid(maps.merged_region_stats(layout), [2, 3])
    bad = pa.concat_tables([bad, bad.slice(0, 1)])  # level 2 again after level 3
    with pytest.raises(ValueError, match="not grouped by 'level'"):
        write_table_files(
            [("sky.parquet", bad)], bad.schema, layout, maps.MAPS_TABLE, lambda: {}, row_group_key="level"
        )
    assert os.readlink(layout.table(maps.MAPS_TABLE)) == before
    assert maps.pyramid_level(layout, 3).equals(sky)
    assert not any(layout.staging_dir(maps.MAPS_TABLE).parent.glob(f"{maps.MAPS_TABLE}-*"))


def test_numpy_arrow_conversions_keep_nan_and_fall_back_on_nulls():
    values = np.array([1.5, np.nan, -2.0])
    arrow = pm.from_numpy(values, pa.float64())
    assert arrow.null_count == 0 and np.isnan(arrow.to_numpy()[1])
    np.testing.assert_array_equal(pm.as_numpy(arrow), values)
    chunked = pa.chunked_array([pa.array([1, 2], pa.int64()), pa.array([3], pa.int64())])
    np.testing.assert_array_equal(pm.as_numpy(chunked), [1, 2, 3])
    np.testing.assert_array_equal(pm.as_numpy(pa.array([1.0, None])), [1.0, np.nan])
    assert pm.as_numpy(pa.chunked_array([], pa.int64())).size == 0


@pytest.mark.parametrize("coord", [None, ["C", "G"]])
def test_projection_grid_samples_exactly_what_mollview_draws(tmp_path, coord):
    """The cached pixel-index grid behind render_map against healpy.mollview's own image of a
    map whose value is its nested pixel index (nest=True, astro flip, optional Galactic view)."""
    import healpy as hp
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    level = 3
    hp.mollview(np.arange(healpix.npix(level), dtype=float), nest=True, coord=coord, xsize=400)
    image = plt.gca().get_images()[0].get_array()
    plt.close("all")
    drawn = np.where(np.ma.getmaskarray(image), -1, np.ma.getdata(image)).astype(np.int64)
    grid = maps.projection_grid(level, 400, coord, cache_dir=tmp_path)
    np.testing.assert_array_equal(grid, drawn)
    assert len(list(tmp_path.glob("mollweide-nside8-x400-*.npy"))) == 1
    np.testing.assert_array_equal(
        maps.projection_grid(level, 400, coord, cache_dir=tmp_path), drawn
    )  # from the cache


def test_map_table_never_serves_a_stale_pyramid(stored):
    layout, rows = stored
    publish_pyramid(layout, [])
    before = maps.map_table(6, layout)
    # one region is recomputed after the maps were built: its new rows must show at once
    changed = make_rows(np.random.default_rng(99), REGIONS[1], 500)
    write_region_arrow(changed, layout, "gaia_source", REGIONS[1], manifest={"rows_accepted": 500})
    write_region_arrow(
        pm.stats_from_table(changed, L_MAX), layout, maps.STATS_TABLE, REGIONS[1], manifest={"level": L_MAX}
    )
    after = maps.map_table(6, layout)
    assert int(after.column("n_sources").to_numpy().sum()) == rows[REGIONS[0]].num_rows + 500
    assert not after.equals(before)
    assert_matches_reference(after, duckdb_reference(source_files(layout), 6))


def test_statistics_an_older_version_stored_are_refused_or_rebuilt(stored):
    """Stored statistics without Σw² cannot give the dispersion-aware errors: a pm_stats region
    stored so is refused by name, and a maps pyramid built so is never read or reused, only
    rebuilt from pm_stats (which then holds every column)."""
    layout, rows = stored
    publish_pyramid(layout, [])
    reference = duckdb_reference(source_files(layout), 6)
    manifest_path = layout.table(maps.MAPS_TABLE).resolve() / REGION_MANIFEST
    manifest = json.loads(manifest_path.read_text())
    assert manifest["stats_columns"] == list(pm.STAT_COLUMNS)
    del manifest["stats_columns"]  # what an older version wrote
    manifest_path.write_text(json.dumps(manifest))
    assert maps.pyramid_level(layout, 6) is None  # readers merge pm_stats instead
    assert_matches_reference(maps.map_table(6, layout), reference)
    with pytest.raises(
        pm.StaleStatisticsError, match="built by an older gaia-flows.*re-materialize proper_motion_maps"
    ):
        maps.pyramid_level(layout, 6, current_only=False)
    _, rebuilt = publish_pyramid(layout, [])
    assert rebuilt.reused == []  # no region file of the old pyramid is kept
    assert maps.pyramid_level(layout, 6) is not None

    old = pm.stats_from_table(rows[REGIONS[1]], L_MAX).drop_columns(["sumw2_pmra", "sumw2_pmdec"])
    write_region_arrow(old, layout, maps.STATS_TABLE, REGIONS[1], manifest={"level": L_MAX})
    with pytest.raises(
        pm.StaleStatisticsError,
        match=rf"pm_stats region {REGIONS[1]} .* has no sumw2_pmra, sumw2_pmdec.*re-materialize pm_stats",
    ):
        maps.map_table(6, layout)
    with pytest.raises(pm.StaleStatisticsError, match=REGIONS[1]):
        publish_pyramid(layout, [])


def test_map_table_rejects_levels_finer_than_stored(stored):
    layout, _ = stored
    publish_pyramid(layout, [])
    with pytest.raises(ValueError):
        maps.map_table(L_MAX + 1, layout)
    with pytest.raises(ValueError):
        maps.sky_stats(L_MAX + 1, StateLayout.from_env(layout.home))


def test_map_table_is_exported_for_notebooks():
    import gaia_flows

    assert gaia_flows.map_table is maps.map_table


def test_render_map_writes_pngs(stored, tmp_path):
    layout, _ = stored
    from PIL import Image

    table = maps.map_table(5, layout)
    cache = maps.projection_cache(layout)
    for quantity in ("pmra", "pmdec", "count"):
        out = maps.render_map(table, quantity, tmp_path / f"{quantity}.png", cache_dir=cache)
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = np.asarray(Image.open(out).convert("RGB")).reshape(-1, 3)
        grey = np.all(pixels == maps.BAD_RGBA[:3], axis=1)
        coloured = (pixels.max(axis=1) - pixels.min(axis=1)) > 40
        # two of the three regions are empty: most of the sky is grey, the rest coloured
        assert grey.sum() > 10 * coloured.sum() > 0
    maps.render_map(table, "pmra", tmp_path / "w.png", weighted=True, cache_dir=cache)
    assert not list(tmp_path.glob(".*png"))  # atomic write left no temporary files
    with pytest.raises(ValueError):
        maps.render_map(
            pm.finalise(pm.stats_from_columns([1 << 40], [1.0], [1.0], [1.0], [1.0], 5), dense=False),
            "pmra",
            tmp_path / "x.png",
        )


def test_drawing_a_map_keeps_no_reference_to_the_callers_data(stored, tmp_path):
    """A map is drawn in the middle of an asset that holds a copy of the per-pixel statistics.
    Nothing the drawing leaves behind (matplotlib's mathtext parser cached exceptions whose
    tracebacks held every calling frame) may keep that copy alive until the cyclic GC runs."""
    import gc
    import weakref

    layout, _ = stored
    table = maps.map_table(5, layout)

    class Statistics:  # stands in for the caller's tables; weakly referenceable, unlike pa.Table
        pass

    def draw(quantity: str):
        held = Statistics()
        maps.render_map(
            table, quantity, tmp_path / f"{quantity}.png", cache_dir=maps.projection_cache(layout)
        )
        return weakref.ref(held)

    gc.collect()
    gc.disable()
    try:
        alive = [q for q in ("count", "pmra", "pmdec") if draw(q)() is not None]
    finally:
        gc.enable()
    assert alive == []


def test_colour_limits_are_symmetric_and_robust():
    values = np.r_[np.linspace(-2, 3, 1000), 500.0, np.nan]
    lo, hi = maps.colour_limits(values, "pmra")
    assert lo == -hi and 2.5 < hi < 10
    assert maps.colour_limits(np.array([np.nan, 0.0, 7.0]), "count") == (1.0, 7.0)
    assert maps.colour_limits(np.array([np.nan]), "pmdec") == (-1.0, 1.0)


def test_cli_map_replots_without_pyspark(stored, tmp_path):
    """A fresh ``gaia-flows map`` process never loads Spark; once the projection grids are cached
    (the maps asset warms them) it loads neither healpy nor pandas nor pyarrow.dataset either:
    those imports would cost a re-plot more than reading and drawing the map."""
    layout, _ = stored
    publish_pyramid(layout, [])
    out = tmp_path / "pmra.png"

    def replot(heavy: tuple[str, ...]) -> None:
        script = (
            "import sys\n"
            "from gaia_flows.cli import main\n"
            f"code = main(['map', '--level', '6', '--quantity', 'pmra', '--out', {str(out)!r}])\n"
            "assert code == 0\n"
            f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r} or m == 'pyarrow.dataset')\n"
            "assert not loaded, loaded\n"
        )
        env = {**os.environ, "GAIA_FLOWS_HOME": str(layout.home)}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert "wrote" in done.stdout and "level 6" in done.stdout
        assert out.read_bytes()[:4] == b"\x89PNG"

    replot(("pyspark", "py4j"))  # no cached grid yet: healpy computes it
    assert list(maps.projection_cache(layout).glob("mollweide-nside64-x*.npy"))
    out.unlink()
    replot(("pyspark", "py4j", "healpy", "pandas", "astropy"))


def test_maps_name_their_frame_and_the_cli_draws_galactic(stored, tmp_path, capsys, monkeypatch):
    layout, _ = stored
    assert "— ICRS, HEALPix level 6 (nside 64), 5,000 sources" in maps.map_title(6, "pmra", 5000)
    assert maps.map_title(6, "pmdec", 5000, weighted=True, coord="G").startswith(
        "weighted mean μδ (pmdec) (ICRS components) — Galactic,"
    )
    assert "— Galactic," in maps.map_title(3, "count", 10, coord="G")
    with pytest.raises(ValueError, match="coord must be one of C, G"):
        maps.render_map(maps.map_table(3, layout), "pmra", tmp_path / "x.png", coord="E")
    from gaia_flows.cli import main

    monkeypatch.setenv("GAIA_FLOWS_HOME", str(layout.home))
    pngs = {}
    for coord in ("C", "G"):
        pngs[coord] = tmp_path / f"pmra-{coord}.png"
        assert (
            main(["map", "--level", "4", "--quantity", "pmra", "--coord", coord, "--out", str(pngs[coord])])
            == 0
        )
        assert {"C": "ICRS", "G": "Galactic"}[coord] in capsys.readouterr().out
    icrs, galactic = (np.asarray(Image.open(pngs[c]).convert("RGB")) for c in ("C", "G"))
    assert icrs.shape == galactic.shape and not np.array_equal(
        icrs, galactic
    )  # the sky is drawn in another frame


def test_cli_map_rejects_bad_arguments():
    import argparse

    from gaia_flows.cli_map import add_map_command

    parser = argparse.ArgumentParser()
    add_map_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["map", "--level", "6", "--quantity", "count", "--out", "x.png", "--weighted"])
    assert (args.level, args.quantity, args.weighted, args.out) == (6, "count", True, Path("x.png"))
    assert args.coord == "C"
    for bad in (
        ["map", "--level", "13", "--out", "x.png"],
        ["map", "--level", "6", "--quantity", "parallax", "--out", "x.png"],
        ["map", "--level", "6", "--coord", "E", "--out", "x.png"],
    ):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


# --- the Spark engine against DuckDB, and the same statistics on a standalone cluster -----------


@pytest.mark.parametrize("level", [0, 6, L_MAX])
def test_spark_statistics_match_duckdb(catalogue, spark, level):
    """The Spark aggregation the asset runs, against DuckDB SQL on the same files."""
    layout, _ = catalogue
    stats = compute_pm_stats(read_regions(spark, layout, "gaia_source"), level)
    assert_matches_reference(pm.finalise(stats), duckdb_reference(source_files(layout), level))


def test_read_input_lists_on_the_driver_and_restores_the_setting(stored, spark):
    layout, rows = stored
    before = spark.conf.get(LISTING_THRESHOLD, None)
    with driver_listing(spark, 5000):
        assert spark.conf.get(LISTING_THRESHOLD) == "5000"
    assert spark.conf.get(LISTING_THRESHOLD, None) == before
    df = read_input(spark, layout, "gaia_source", [REGIONS[0], REGIONS[1]])
    assert df.columns == list(pm.INPUT_COLUMNS)
    assert df.count() == rows[REGIONS[0]].num_rows + rows[REGIONS[1]].num_rows
    assert spark.conf.get(LISTING_THRESHOLD, None) == before


def test_regions_without_error_columns_count_unweighted_and_without_proper_motions_fail_by_name(
    stored, spark
):
    """The contract only requires source_id, ra and dec, so an archive extract may lack columns.
    Without pmra_error/pmdec_error a region's sources are still counted and averaged, with no
    weight; without pmra/pmdec the run fails naming the region, the file and the columns."""
    layout, rows = stored
    plain, bare = REGIONS[0], REGIONS[1]
    write_region_arrow(rows[plain].drop_columns(["pmra_error", "pmdec_error"]), layout, "gaia_source", plain)
    per_region = compute_region_stats(
        read_input(spark, layout, "gaia_source", [plain, bare]), [plain, bare], L_MAX
    )
    nulls = {
        name: pa.nulls(rows[plain].num_rows, rows[plain].schema.field(name).type)
        for name in ("pmra_error", "pmdec_error")
    }
    without_errors = rows[plain]
    for name, column in nulls.items():
        without_errors = without_errors.set_column(without_errors.schema.get_field_index(name), name, column)
    for region, source in ((plain, without_errors), (bare, rows[bare])):
        expected = pm.stats_from_table(source, L_MAX)
        assert per_region[region].column("pixel").equals(expected.column("pixel"))
        for name in pm.STAT_COLUMNS:
            np.testing.assert_allclose(
                per_region[region].column(name).to_numpy(),
                expected.column(name).to_numpy(),
                rtol=RTOL,
                atol=0,
                err_msg=f"{region} {name}",
            )
    assert pm.totals(per_region[plain])["n_pm"] > 0
    assert not np.any(per_region[plain].column("sumw_pmra").to_numpy())

    write_region_arrow(rows[bare].drop_columns(["pmra", "pmdec"]), layout, "gaia_source", bare)
    with pytest.raises(InputColumnsError, match=rf"{bare}: [^;]+\.parquet has no pmra, pmdec"):
        read_input(spark, layout, "gaia_source", [plain, bare])
    resources = {
        "spark": SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF),
        "storage": StorageResource(home=str(layout.home)),
    }
    result = materialize(
        [pm_stats], selection=[pm_stats.key], resources=resources, partition_key=bare, raise_on_error=False
    )
    [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert (
        f"{bare}: " in failure.event_specific_data.error.message
        and "has no pmra, pmdec" in failure.event_specific_data.error.message
    )


def test_spark_region_split_and_coarser_than_regions(catalogue, spark):
    """Per-region tables of one run merge to the all-at-once statistics, also at level 0 where
    four regions share one pixel; the empty region gets an empty table, not a missing one."""
    layout, rows = catalogue
    df = read_regions(spark, layout, "gaia_source")
    for level in (0, L_MAX):
        per_region = compute_region_stats(df, list(REGIONS), level)
        assert set(per_region) == set(REGIONS)
        assert per_region[REGIONS[2]].num_rows == 0
        for region in REGIONS:
            assert pm.totals(per_region[region])["n_sources"] == rows[region].num_rows
            assert pm.stats_level(per_region[region]) == level
        merged = pm.merge(per_region.values())
        assert_matches_reference(pm.finalise(merged), duckdb_reference(source_files(layout), level))
    with pytest.raises(ValueError, match="outside the run's regions"):
        compute_region_stats(df, [REGIONS[0]], L_MAX)


def _publish_in_files(layout: StateLayout, region: str, rows: pa.Table, cuts: list[int]) -> None:
    """A gaia_source region written as several files, cut at the given row numbers."""
    staging = layout.staging_dir("gaia_source")
    staging.mkdir(parents=True)
    for i, (lo, hi) in enumerate(zip([0, *cuts], [*cuts, rows.num_rows])):
        pq.write_table(rows.slice(lo, hi - lo), staging / f"part-{i:05d}.parquet")
    publish(staging, layout.region_dir("gaia_source", region))


def test_region_tasks_publish_what_the_groupby_computes_and_duckdb_agrees(tmp_path, spark):
    """The region-task engine, with a region cut into three files mid-pixel (so one pixel's
    stars sit in two files) and an empty region: every published table equals the groupBy's
    for that region, their merge matches DuckDB at L_max and at level 0 (coarser than the
    regions), and the records the driver gets back count what was published."""
    layout = StateLayout.from_env(tmp_path / "home").ensure()
    rows = publish_catalogue(layout, {REGIONS[0]: 3000, REGIONS[1]: 2000, REGIONS[2]: 0}, seed=13)
    pixels = rows[REGIONS[0]].column("source_id").to_numpy() >> healpix.source_id_shift(L_MAX)
    assert pixels[999] == pixels[1000] and pixels[1999] == pixels[2000]  # both cuts split a pixel
    _publish_in_files(layout, REGIONS[0], rows[REGIONS[0]], [1000, 2000])
    assert len(layout.region_files("gaia_source", REGIONS[0])) == 3
    for level in (L_MAX, 0):
        publisher = StatsPublisher(layout, maps.STATS_TABLE, level, {}, "now")
        records = stats_in_region_tasks(spark, layout, "gaia_source", list(REGIONS), level, publisher)
        assert sorted(r["region"] for r in records) == sorted(REGIONS)
        expected = compute_region_stats(
            read_input(spark, layout, "gaia_source", list(REGIONS)), list(REGIONS), level
        )
        published = maps.read_region_stats(layout, list(REGIONS))
        for record in records:
            region = record["region"]
            assert record["n_sources"] == rows[region].num_rows == pm.totals(published[region])["n_sources"]
            assert (
                record["pixels"] == expected[region].num_rows and pm.stats_level(published[region]) == level
            )
            assert published[region].column("pixel").equals(expected[region].column("pixel"))
            for name in pm.STAT_COLUMNS:
                np.testing.assert_allclose(
                    published[region].column(name).to_numpy(),
                    expected[region].column(name).to_numpy(),
                    rtol=RTOL,
                    atol=1e-9,
                    err_msg=f"{region} {name}",
                )
        assert_matches_reference(
            pm.finalise(pm.merge(published.values())), duckdb_reference(source_files(layout), level)
        )


def test_region_stats_reads_missing_error_columns_as_unweighted_and_names_the_file_of_stray_rows(stored):
    layout, rows = stored
    plain = REGIONS[0]
    write_region_arrow(rows[plain].drop_columns(["pmra_error", "pmdec_error"]), layout, "gaia_source", plain)
    files = [str(p) for p in layout.region_files("gaia_source", plain)]
    unweighted = region_stats(files, plain, L_MAX)
    assert pm.totals(unweighted)["n_pm"] == pm.totals(pm.stats_from_table(rows[plain], L_MAX))["n_pm"] > 0
    assert not np.any(unweighted.column("sumw_pmra").to_numpy())
    with pytest.raises(
        ValueError,
        match=rf"{files[0]}: rows fall in region pixel\(s\) \[0\] .* outside the run's region {REGIONS[1]}",
    ):
        region_stats(files, REGIONS[1], L_MAX)


def test_engine_rule_splits_only_big_regions_that_exceed_one_cores_share():
    mib = 2**20
    sizes = {"hpx1-00": 800 * mib, "hpx1-01": 600 * mib, "hpx1-02": 600 * mib}
    assert choose_engine(sizes, 2).engine == "region-tasks"
    assert choose_engine(sizes, 3).engine == "groupby"  # 800 MiB > 2000 / 3 and > SMALL_REGION_BYTES
    assert choose_engine({k: v // 10 for k, v in sizes.items()}, 64).engine == "region-tasks"  # small regions
    assert choose_engine({"hpx1-05": 10 * mib}, 2).engine == "region-tasks"  # one small region's refresh
    assert choose_engine({"hpx1-05": 300 * mib}, 2).engine == "region-tasks"
    assert choose_engine({"hpx1-05": 600 * mib}, 2).engine == "groupby"
    assert choose_engine(sizes, 64, requested="region-tasks").engine == "region-tasks"
    with pytest.raises(ValueError, match="engine must be one of"):
        choose_engine(sizes, 2, requested="duckdb")


@pytest.mark.cluster
def test_standalone_cluster_gives_the_same_statistics_as_local_mode(catalogue, cluster_spark, tmp_path):
    """The same aggregation on a real standalone master with two workers on loopback, then in
    local mode: identical counts and pixels, sums equal to rounding (partial sums may be added
    in another order), both equal to DuckDB; and the region tasks on the cluster publish the same."""
    layout, _ = catalogue
    assert cluster_spark.sparkContext.master.startswith("spark://127.0.0.1:")
    on_cluster = compute_pm_stats(read_regions(cluster_spark, layout, "gaia_source"), 6)
    executors = cluster_spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size()
    assert executors >= 2, "the driver plus at least one worker's executor"
    # The region tasks on the cluster's executors (before the switch to local mode stops it):
    # Python workers of the worker processes read the region files and publish (here into
    # another state folder) what the groupBy computed.
    out = StateLayout.from_env(tmp_path / "out").ensure()
    records = stats_in_region_tasks(
        cluster_spark,
        layout,
        "gaia_source",
        list(REGIONS),
        6,
        StatsPublisher(out, maps.STATS_TABLE, 6, {}, "now"),
    )
    assert sorted(r["region"] for r in records) == sorted(REGIONS)
    by_tasks = pm.merge(maps.read_region_stats(out, list(REGIONS)).values())
    assert by_tasks.column("pixel").equals(on_cluster.column("pixel"))
    for name in pm.STAT_COLUMNS:
        np.testing.assert_allclose(
            by_tasks.column(name).to_numpy(),
            on_cluster.column(name).to_numpy(),
            rtol=1e-12,
            atol=1e-12,
            err_msg=name,
        )

    local = spark_factory.session("local[2]", TEST_SPARK_CONF)
    assert local.sparkContext.master == "local[2]"
    in_local = compute_pm_stats(read_regions(local, layout, "gaia_source"), 6)
    assert on_cluster.column("pixel").equals(in_local.column("pixel"))
    for name in pm.STAT_COLUMNS:
        np.testing.assert_allclose(
            on_cluster.column(name).to_numpy(),
            in_local.column(name).to_numpy(),
            rtol=1e-12,
            atol=0,
            err_msg=name,
        )
    assert_matches_reference(pm.finalise(on_cluster), duckdb_reference(source_files(layout), 6))


# --- science on the synthetic catalogue ----------------------------------------------------------


def _simulated(rng: np.random.Generator, sky) -> pa.Table:
    """Synthetic DR3 rows for ``sky`` from the generator's own per-source simulation (what
    ``generate`` writes to the bulk files, without the CSV round trip)."""
    columns, _ = synthetic.simulate_sources(rng, sky)
    pixel12 = healpix.radec_to_healpix(sky.ra, sky.dec, healpix.SOURCE_ID_LEVEL).astype(np.int64)
    return pa.table(
        {
            "source_id": pixel12 << healpix.SOURCE_ID_SHIFT,
            **{
                name: pa.array(columns[name], from_pandas=True)
                for name in ("pmra", "pmdec", "pmra_error", "pmdec_error")
            },
        }
    )


def _aperture_sums(table: pa.Table, centre, radius: float, ring: tuple[float, float]) -> dict[str, float]:
    """Counts and Σpm of the level-``table`` pixels whose centres lie within ``radius`` degrees of
    ``centre``, minus the field expected there: the sums of a ring of pixels further out, scaled
    by the pixel count (all pixels of a level have the same area). Plain sums, so this is an
    exact merge of map pixels."""
    level = pm.stats_level(table)
    ra, dec = healpix.healpix_centres(table.column("pixel").to_numpy(), level)
    distance = synthetic.angular_distance(ra, dec, centre)
    inner, outer = distance < radius, (distance >= ring[0]) & (distance < ring[1])
    out = {}
    for name in ("n_pm", "sum_pmra", "sum_pmdec"):
        values = table.column(name).to_numpy().astype(float)
        out[name] = values[inner].sum() - values[outer].sum() * inner.sum() / outer.sum()
    return out


def test_magellanic_clouds_show_their_injected_mean_motions():
    """Measure: merge the level-6 map pixels within 4° (LMC) / 2° (SMC) of each Cloud's centre,
    subtract the foreground estimated from a ring 9–13° (LMC) / 5–9° (SMC) out, and divide:
    mean pmra and pmdec must lie within 0.1 mas/yr of ``synthetic.LMC_PM`` / ``SMC_PM``.

    The foreground subtraction is needed because the sky in front of the Clouds is real in the
    generator: halo stars with ~10 mas/yr of solar reflex and nearby stars with tens of mas/yr
    bias a plain pixel mean by 0.1–0.5 mas/yr. The catalogue is the generator's 3M-star sky
    restricted to 16° caps around the Clouds (sources are simulated independently given their
    position, so the cut changes nothing inside the caps); ~90k LMC and ~23k SMC stars keep the
    spurious-solution noise at 0.01–0.03 mas/yr.
    """
    rng = np.random.default_rng(2024)
    sky = synthetic.sample_sky(rng, 3_000_000)
    caps = (synthetic.angular_distance(sky.ra, sky.dec, synthetic.LMC_CENTRE) < 16) | (
        synthetic.angular_distance(sky.ra, sky.dec, synthetic.SMC_CENTRE) < 16
    )
    rows = _simulated(rng, sky.take(np.flatnonzero(caps)))
    stats = pm.stats_from_table(rows, L_MAX)
    level6 = pm.finalise(pm.degrade(stats, 6), dense=False)
    for centre, radius, ring, truth in (
        (synthetic.LMC_CENTRE, 4.0, (9.0, 13.0), synthetic.LMC_PM),
        (synthetic.SMC_CENTRE, 2.0, (5.0, 9.0), synthetic.SMC_PM),
    ):
        sums = _aperture_sums(pm.degrade(stats, 6), centre, radius, ring)
        assert sums["n_pm"] > 15_000
        assert abs(sums["sum_pmra"] / sums["n_pm"] - truth[0]) < 0.1
        assert abs(sums["sum_pmdec"] / sums["n_pm"] - truth[1]) < 0.1
        # and the map itself: the Cloud's central pixel is dominated by the Cloud's motion
        central = int(healpix.radec_to_healpix(np.array([centre[0]]), np.array([centre[1]]), 6)[0])
        row = level6.filter(pc.equal(level6.column("pixel"), central)).to_pylist()[0]
        assert abs(row["mean_pmra"] - truth[0]) < 0.5 and abs(row["mean_pmdec"] - truth[1]) < 0.5


def _fit_glide(table: pa.Table) -> np.ndarray:
    """Least-squares fit of the l=1 vector spherical harmonics to a map of mean proper motions:
    pm(n) = −(g − (g·n) n) + ω × n. The glide ``g`` is the solar-reflex dipole (a uniform
    velocity of the observer seen against distant stars), ω a rigid rotation; on the full sky
    the two are orthogonal, so rotation (Galactic rotation's Oort B term) cannot leak into g.
    Returns g in Galactic Cartesian axes [mas/yr]."""
    level = pm.stats_level(table)
    has = table.column("n_pm").to_numpy() > 0
    ra, dec = healpix.healpix_centres(table.column("pixel").to_numpy()[has], level)
    ra, dec = np.radians(ra), np.radians(dec)
    east = np.stack([-np.sin(ra), np.cos(ra), np.zeros_like(ra)], axis=1)
    north = np.stack([-np.sin(dec) * np.cos(ra), -np.sin(dec) * np.sin(ra), np.cos(dec)], axis=1)
    normal = np.cross(east, north)
    design, observed = [], []
    for basis, column in ((east, "mean_pmra"), (north, "mean_pmdec")):
        rotation = [np.einsum("ij,ij->i", np.cross(np.eye(3)[k], normal), basis) for k in range(3)]
        design.append(np.column_stack([-basis, *rotation]))
        observed.append(table.column(column).to_numpy()[has])
    solution, *_ = np.linalg.lstsq(np.vstack(design), np.concatenate(observed), rcond=None)
    return synthetic.ICRS_TO_GALACTIC @ solution[:3]


def test_solar_reflex_is_recovered_from_the_halo_map():
    """Measure: the glide (l=1 dipole, see ``_fit_glide``) of the level-2 mean proper-motion map
    of the generator's halo must point to the Sun's direction of motion, within 2°, with the
    amplitude |V_sun|·E[1/d]/4.74 = 12.8 mas/yr within 5% (seeds tried: 0.3–0.4°, < 1%).

    The halo is the generator's non-rotating population, so its mean proper motion is pure
    reflex, −(V_sun)⊥ / (4.74 d). The disc co-rotates with the Sun and nearby stars mostly show
    its peculiar motion, so an all-population map has its apex pulled toward (l, b) ≈ (67°, 11°),
    between the two, and has no closed-form expectation. Rows carry the generator's errors,
    2-parameter solutions (nulls) and spurious solutions, and are summed in chunks and merged.
    """
    rng = np.random.default_rng(7)
    sky = synthetic.sample_sky(rng, 400_000)
    rows = _simulated(rng, sky.take(np.flatnonzero(sky.is_population("halo"))))
    per_chunk = [pm.stats_from_table(rows.slice(i, 20_000), L_MAX) for i in range(0, rows.num_rows, 20_000)]
    glide = _fit_glide(pm.finalise(pm.merge(per_chunk, level=2), dense=False))
    sun = synthetic.SUN_VELOCITY
    angle = np.degrees(np.arccos(glide @ sun / np.linalg.norm(glide) / np.linalg.norm(sun)))
    assert angle < 2.0, f"apex {angle:.2f}° away from the solar motion"
    mean_inverse_distance = np.exp(-np.log(5.0) + 0.6**2 / 2)  # lognormal(ln 5 kpc, 0.6)
    expected = np.linalg.norm(sun) * mean_inverse_distance / synthetic.KM_S_PER_MAS_YR_KPC
    assert np.linalg.norm(glide) == pytest.approx(expected, rel=0.05)


def test_metadata_images_above_the_budget_are_embedded_as_previews():
    small = io.BytesIO()
    Image.new("RGB", (200, 100), "red").save(small, "PNG")
    kept = maps.preview_markdown(small.getvalue(), "small figure")
    assert _image_of(kept).format == "PNG" and base64.b64encode(small.getvalue()).decode() in kept
    assert kept.endswith("\n\nsmall figure")

    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (1000, 2000, 4), dtype=np.uint8)
    noise[:, :500, 3] = 0  # transparent left quarter, as outside a Mollweide ellipse
    big = io.BytesIO()
    Image.fromarray(noise, "RGBA").save(big, "PNG")
    assert len(big.getvalue()) > maps.PREVIEW_MAX_BYTES
    preview = _image_of(maps.preview_markdown(big.getvalue(), "big map"))
    assert preview.format == "JPEG" and preview.size == (maps.PREVIEW_WIDTH, maps.PREVIEW_WIDTH // 2)
    assert np.asarray(preview)[:, : maps.PREVIEW_WIDTH // 4 - 2].min() > 240, (
        "transparent pixels turn white, not black"
    )


# --- the assets in process: two regions, maps, and a one-region refresh ----------------------------

MAT_REGIONS = ("hpx1-31", "hpx1-32")  # adjacent, so one partition range; hpx1-32 holds the Clouds


def _mat_resources():
    return {
        "spark": SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF),
        "storage": StorageResource(),
    }


def _region_rows(table: pa.Table, region: str) -> pa.Table:
    """Rows of a map table (at any level >= 1) whose pixels lie in ``region``."""
    level, pixel = healpix.parse_region_key(region)
    owner = healpix.degrade(table.column("pixel").to_numpy(), pm.stats_level(table), level)
    return table.filter(pa.array(owner == pixel))


def _image_of(markdown: str) -> Image.Image:
    """The image embedded in a metadata markdown entry."""
    assert markdown.startswith("![") and ";base64," in markdown
    encoded = markdown.split("base64,", 1)[1].split(")", 1)[0]
    return Image.open(io.BytesIO(base64.b64decode(encoded)))


def test_assets_two_regions_maps_and_one_region_refresh(layout, spark):
    """gaia_source + pm_stats for two regions in one run, then proper_motion_maps; then one
    region's input changes and only that region is rerun. The other region's raw rows are
    deleted before the refresh, so the refreshed maps can only have come from stored statistics.
    The first run is forced to the groupBy and the refresh takes the region tasks (auto), so the
    asset's two engines both publish here."""
    synthetic.generate(
        stars=20_000,
        seed=5,
        out=layout.landing,
        contract=load_contract(),
        files=48,
        processes=1,
        progress=False,
    )
    tags = {
        "dagster/asset_partition_range_start": MAT_REGIONS[0],
        "dagster/asset_partition_range_end": MAT_REGIONS[1],
    }
    first = materialize(
        [gaia_landing, gaia_source, pm_stats, pm_stats_counts_match_gaia_source, pm_stats_current],
        selection=[gaia_source.key, pm_stats.key],
        resources=_mat_resources(),
        tags=tags,
        run_config={"ops": {"pm_stats": {"config": {"engine": "groupby"}}}},
    )
    assert first.success
    assert first.asset_materializations_for_node("pm_stats")[0].metadata["engine"].value == "groupby"
    assert all(check.passed for check in first.get_asset_check_evaluations())
    per_partition = {m.partition: m.metadata for m in first.asset_materializations_for_node("pm_stats")}
    assert set(per_partition) == set(MAT_REGIONS)
    for region in MAT_REGIONS:
        files = sorted(str(p) for p in layout.region_dir("gaia_source", region).glob("*.parquet"))
        rows = duckdb.sql(f"SELECT count(*) FROM read_parquet({files!r})").fetchall()[0][0]
        assert per_partition[region]["rows"].value == rows > 0

    def run_maps():
        result = materialize(
            [pm_stats, proper_motion_maps, maps_consistent],
            selection=[proper_motion_maps.key],
            resources=_mat_resources(),
        )
        assert result.success and all(check.passed for check in result.get_asset_check_evaluations())
        (materialization,) = result.asset_materializations_for_node("proper_motion_maps")
        return materialization.metadata

    meta = run_maps()
    for quantity in ("pmra", "pmdec", "count"):
        full = maps.png_path(layout, 6, quantity)
        assert full.read_bytes()[:4] == b"\x89PNG"
        # The UI gets the same picture, as a preview if the file is over the metadata budget.
        shown, on_disk = _image_of(meta[f"map_{quantity}_level_6"].value), Image.open(full)
        assert abs(shown.width / shown.height - on_disk.width / on_disk.height) < 0.01
        assert (shown.width < on_disk.width) == (full.stat().st_size > maps.PREVIEW_MAX_BYTES)
        assert len(meta[f"map_{quantity}_level_6"].value) < 2 * maps.PREVIEW_MAX_BYTES
    assert (
        meta["regions_merged"].value == 2
        and meta["regions_reused"].value == 0
        and meta["level_max"].value == pm.DEFAULT_LEVEL
    )
    before = maps.map_table(pm.DEFAULT_LEVEL, layout, dense=False)
    assert_matches_reference(maps.map_table(6, layout), duckdb_reference(source_files(layout), 6))
    stats31_version = os.readlink(layout.region_dir("pm_stats", MAT_REGIONS[0]))

    # hpx1-32's input changes: its biggest landing file is withdrawn
    files32 = healpix.files_for_region(sorted(layout.landing.glob("GaiaSource_*.csv.gz")), MAT_REGIONS[1])
    os.remove(max(files32, key=lambda p: p.stat().st_size))
    for raw in layout.region_dir("gaia_source", MAT_REGIONS[0]).glob("*.parquet"):
        raw.unlink()  # the other region's raw rows are gone: a refresh that read them would fail or miscount
    refresh = materialize(
        [gaia_landing, gaia_source, pm_stats],
        selection=[gaia_source.key, pm_stats.key],
        resources=_mat_resources(),
        partition_key=MAT_REGIONS[1],
    )
    assert refresh.success
    assert (
        refresh.asset_materializations_for_node("pm_stats")[0].metadata["engine"].value == "region-tasks"
    )  # a small region
    # Python tasks report what they read with pyarrow (Spark's stage metrics see none of it).
    refreshed = refresh.asset_materializations_for_node("pm_stats")[0].metadata
    read = layout.region_files("gaia_source", MAT_REGIONS[1])
    assert refreshed["python_read_bytes"].value == sum(p.stat().st_size for p in read) > 0
    assert refreshed["python_read_files"].value == len(read)
    assert refreshed["python_read_rows"].value == refreshed["rows"].value
    assert refreshed["task_wall_seconds"].value > 0 and 0 < refreshed["task_cpu_seconds"].value
    assert list(refreshed["python_per_host"].value) == [socket.gethostname()]
    assert os.readlink(layout.region_dir("pm_stats", MAT_REGIONS[0])) == stats31_version
    png_before = maps.png_path(layout, 6, "pmra").read_bytes()
    meta = run_maps()

    files = sorted(str(p) for p in layout.region_dir("gaia_source", MAT_REGIONS[1]).glob("*.parquet"))
    rows32 = duckdb.sql(f"SELECT count(*) FROM read_parquet({files!r})").fetchall()[0][0]
    rows31 = int(pc.sum(_region_rows(before, MAT_REGIONS[0]).column("n_sources")).as_py())
    assert 0 < rows32 < per_partition[MAT_REGIONS[1]]["rows"].value
    assert meta["rows"].value == rows31 + rows32
    assert meta["regions_merged"].value == 2 and meta["regions_reused"].value == 1  # hpx1-31's file was kept
    after = maps.map_table(pm.DEFAULT_LEVEL, layout, dense=False)
    unchanged, kept = _region_rows(after, MAT_REGIONS[0]), _region_rows(before, MAT_REGIONS[0])
    for name in unchanged.column_names:  # bit for bit, NaN where there was NaN
        np.testing.assert_array_equal(
            unchanged.column(name).to_numpy(), kept.column(name).to_numpy(), err_msg=name
        )
    reference = duckdb_reference(files, pm.DEFAULT_LEVEL)
    fresh = _region_rows(after, MAT_REGIONS[1])
    pixels = fresh.column("pixel").to_numpy()
    for name in ("n_sources", "n_pm", "mean_pmra", "mean_pmdec"):
        np.testing.assert_allclose(
            fresh.column(name).to_numpy(), reference[name][pixels], rtol=RTOL, err_msg=name
        )
    assert int(reference["n_sources"].sum()) == rows32
    assert maps.png_path(layout, 6, "pmra").read_bytes() != png_before
