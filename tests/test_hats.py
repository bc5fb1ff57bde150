"""The HATS export read back by LSDB, as an astronomer would: same rows, exact cone searches,
cross-matches that find sources across partition borders, refreshes that touch only the
changed region.

One synthetic catalogue (20k sources) published as ``gaia_source``; the collection is exported
with a small partition threshold so the sky is cut into many partitions of several orders,
and so has many borders to cross.
"""

import os
import socket

import lsdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from dagster import materialize
from support.astrometric_data import publish_synthetic
from support.spark import TEST_SPARK_CONF

from gaia_flows.assets.hats_catalogue import hats_catalogue
from gaia_flows.engine.hats_export import EXPORT_MANIFEST, SPATIAL_INDEX
from gaia_flows.layout import StateLayout
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource
from gaia_flows.science.healpix import region_key
from gaia_flows.warehouse import write_region_arrow

STARS, SEED = 20_000, 11
THRESHOLD = 300  # rows per partition: ~100 partitions of orders 1-5 on this catalogue
MARGIN_ARCSEC = 10.0
SHIFT_ARCSEC = 6.0


def _export(layout: StateLayout):
    result = materialize(
        [hats_catalogue],
        resources={
            "spark": SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF),
            "storage": StorageResource(home=str(layout.home)),
        },
        run_config={
            "ops": {
                "hats_catalogue": {"config": {"pixel_threshold": THRESHOLD, "margin_arcsec": MARGIN_ARCSEC}}
            }
        },
    )
    [materialization] = result.asset_materializations_for_node("hats_catalogue")
    return {k: v.value for k, v in materialization.metadata.items()}


def _our_table(layout: StateLayout) -> pd.DataFrame:
    files = sorted(layout.table("gaia_source").glob("hpx*/*.parquet"))
    return pd.concat(
        [pq.read_table(f, columns=["source_id", "ra", "dec"]).to_pandas() for f in files], ignore_index=True
    )


def _partition_files(layout: StateLayout) -> dict[str, int]:
    """Every partition file of the published catalogue and its inode."""
    dataset = layout.hats_collection("gaia_source") / "gaia_source" / "dataset"
    return {
        str(p.relative_to(dataset)): p.stat().st_ino for p in dataset.glob("Norder=*/Dir=*/Npix=*.parquet")
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory, _spark_application):
    layout = StateLayout.from_env(tmp_path_factory.mktemp("hats") / "state").ensure()
    publish_synthetic(layout, STARS, SEED, files=4)
    metadata = _export(layout)
    return {"layout": layout, "metadata": metadata, "table": _our_table(layout)}


def test_lsdb_opens_the_collection_with_every_row(exported):
    layout, ours, metadata = exported["layout"], exported["table"], exported["metadata"]
    catalogue = lsdb.open_catalog(layout.hats_collection("gaia_source"))
    frame = catalogue.compute()
    assert len(frame) == len(ours) == metadata["rows"]
    assert set(frame["source_id"]) == set(ours["source_id"])
    assert frame.index.name == SPATIAL_INDEX
    orders = {p.order for p in catalogue.get_healpix_pixels()}
    print(
        f"\nHATS: {metadata['partitions']} partitions of orders {sorted(orders)}, margin {metadata['margin_rows']} rows"
    )
    assert len(orders) >= 3 and min(orders) >= 1, "adaptive tiling, no partition wider than a sky region"
    assert catalogue.margin is not None and len(catalogue.margin.compute()) == metadata["margin_rows"] > 0
    assert catalogue.hc_structure.catalog_info.hats_max_rows == THRESHOLD
    dataset = layout.hats_collection("gaia_source") / "gaia_source" / "dataset"
    assert max(pq.read_metadata(f).num_rows for f in dataset.glob("Norder=*/*/*.parquet")) <= THRESHOLD

    # Evidence: every region's files are read twice by Python tasks (its histogram, then its
    # partitions), and the tasks report what they wrote.
    sources = [
        p for r in layout.region_versions("gaia_source") for p in layout.region_files("gaia_source", r)
    ]
    assert metadata["python_read_bytes"] == 2 * sum(p.stat().st_size for p in sources) > 0
    assert metadata["python_read_rows"] == 2 * metadata["rows"]
    assert metadata["python_written_bytes"] == sum(
        f.stat().st_size for f in dataset.glob("Norder=*/*/*.parquet")
    )
    assert set(metadata["python_per_host"]) == {socket.gethostname()}


def test_cone_search_equals_an_angular_distance_filter(exported):
    layout, ours = exported["layout"], exported["table"]
    ra0, dec0, radius_deg = 266.4, -28.9, 4.0  # the Galactic centre: dense, several partitions
    found = (
        lsdb.open_catalog(layout.hats_collection("gaia_source"))
        .cone_search(ra=ra0, dec=dec0, radius_arcsec=radius_deg * 3600)
        .compute()
    )
    ra, dec = np.radians(ours["ra"].to_numpy()), np.radians(ours["dec"].to_numpy())
    cos_distance = np.sin(dec) * np.sin(np.radians(dec0)) + np.cos(dec) * np.cos(np.radians(dec0)) * np.cos(
        ra - np.radians(ra0)
    )
    inside = ours["source_id"][np.degrees(np.arccos(np.clip(cos_distance, -1, 1))) <= radius_deg]
    assert len(inside) > 100
    assert sorted(found["source_id"]) == sorted(inside)


def test_cross_match_with_a_shifted_copy_finds_every_source_thanks_to_the_margin(exported):
    """The copy, shifted north by 6", is partitioned by LSDB itself; near a border of our
    partitions a source and its shifted twin fall in different partitions, and only the
    margin cache (10") lets the cross-match see across."""
    layout, ours = exported["layout"], exported["table"]
    shifted = ours.assign(dec=np.clip(ours["dec"] + SHIFT_ARCSEC / 3600, -90, 90))
    left = lsdb.from_dataframe(shifted, ra_column="ra", dec_column="dec", catalog_name="shifted")
    collection = layout.hats_collection("gaia_source")
    radius = SHIFT_ARCSEC + 1

    def twins_found(right) -> set:
        """Sources whose shifted twin is among their matches (a crowded field may hold another
        star nearer than the twin, so several neighbours are asked for)."""
        matched = left.crossmatch(
            right, radius_arcsec=radius, n_neighbors=4, suffixes=("_shifted", "")
        ).compute()
        return set(
            matched["source_id"][matched["source_id_shifted"].to_numpy() == matched["source_id"].to_numpy()]
        )

    with_margin = twins_found(lsdb.open_catalog(collection))
    without = twins_found(lsdb.open_catalog(collection / "gaia_source"))
    assert with_margin == set(ours["source_id"]), "every source finds its twin"
    missed = len(ours) - len(without)
    print(
        f"\ncross-match: {len(with_margin)} of {len(ours)} twins found with the margin, {missed} missed without it"
    )
    assert missed > 0, "some twins straddle a partition border: the margin is what finds them"


def test_refresh_rewrites_only_the_changed_region_and_publishes_atomically(exported):
    layout, before_metadata = exported["layout"], exported["metadata"]
    collection = layout.hats_collection("gaia_source")
    before = _partition_files(layout)
    version_before = os.readlink(collection)
    region = "hpx1-05"
    table = pq.read_table(layout.region_dir("gaia_source", region))
    write_region_arrow(
        table.slice(0, table.num_rows - 10), layout, "gaia_source", region
    )  # a rerun that lost 10 rows

    metadata = _export(layout)
    after = _partition_files(layout)
    assert os.readlink(collection) != version_before and not (collection.parent / version_before).exists()
    assert metadata["source_regions_changed"] == [region]
    assert metadata["rows"] == before_metadata["rows"] - 10
    rewritten = set(metadata["regions_rewritten"])
    assert region in rewritten and len(rewritten) <= 3, (
        "its own region, and a neighbour only if a source sits across the border"
    )

    def region_of(name: str) -> str:
        order = int(name.split("/")[0].split("=")[1])
        pixel = int(name.split("/")[2].split("=")[1].split(".")[0])
        return region_key(pixel >> (2 * (order - 1)))

    for name, inode in after.items():
        if region_of(name) in rewritten:
            assert before.get(name) != inode, f"{name} should have been rewritten"
        else:
            assert before[name] == inode, (
                f"{name} lies outside the changed regions and must be carried over unchanged"
            )
    assert metadata["partitions_carried_over"] == sum(region_of(n) not in rewritten for n in after) > 0
    frame = lsdb.open_catalog(collection).compute()
    assert len(frame) == metadata["rows"] and set(frame["source_id"]) == set(_our_table(layout)["source_id"])
    assert (collection / EXPORT_MANIFEST).exists()

    again = _export(layout)  # nothing changed since: nothing is rewritten or republished
    assert (
        again["partitions_written"] == 0
        and again["source_regions_changed"] == []
        and again["rows"] == metadata["rows"]
    )
    assert _partition_files(layout) == after


def test_plan_keeps_partitions_inside_regions_and_under_the_threshold():
    """Pure: hats' alignment over a clumpy histogram, with our region floor."""
    from gaia_flows.engine.hats_export import (
        HatsSettings,
        partition_region,
        plan_partitions,
        sparse_histogram,
    )
    from gaia_flows.science.healpix import radec_to_healpix

    rng = np.random.default_rng(3)
    ra = np.concatenate(
        [rng.uniform(0, 360, 20_000), rng.normal(80.9, 2, 20_000) % 360]
    )  # a uniform sky and a dense clump
    dec = np.concatenate(
        [np.degrees(np.arcsin(rng.uniform(-1, 1, 20_000))), np.clip(rng.normal(-69.8, 2, 20_000), -90, 90)]
    )
    from hats.pixel_math.spatial_index import compute_spatial_index

    index = compute_spatial_index(ra, dec)
    assert (index >> (2 * (29 - 12)) == radec_to_healpix(ra, dec, 12)).all(), (
        "_healpix_29 nests into healpy's level-12 pixels"
    )
    settings = HatsSettings(pixel_threshold=500, highest_order=7)
    pixels, counts = sparse_histogram(index, settings.highest_order)
    dense = np.zeros(12 * 4**settings.highest_order, np.int64)
    dense[pixels] = counts
    plan = plan_partitions(dense, settings)
    assert sum(n for _, _, n in plan) == len(ra)
    assert all(order >= 1 and n <= 500 for order, _, n in plan)
    assert len({order for order, _, _ in plan}) >= 3
    for order, pixel, n in plan:  # each partition lies in the region its index range says
        lo, hi = pixel << (2 * (29 - order)), (pixel + 1) << (2 * (29 - order))
        inside = (index >= lo) & (index < hi)
        assert inside.sum() == n and (index[inside] >> (2 * 28) == partition_region(order, pixel)).all()
