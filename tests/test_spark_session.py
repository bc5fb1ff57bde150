"""The one Spark session factory: a reused application must not drop settings silently."""

import warnings

import pytest
from support.spark import TEST_SPARK_CONF

from gaia_flows import spark as spark_factory

SHUFFLE = "spark.sql.shuffle.partitions"


def test_a_reused_session_takes_new_runtime_settings_and_names_the_fixed_ones(spark):
    app = spark.sparkContext.applicationId
    changed = {**TEST_SPARK_CONF, SHUFFLE: "7", "spark.driver.memory": "3g"}
    try:
        with pytest.warns(RuntimeWarning) as caught:
            reused = spark_factory.session("local[2]", changed)
        assert reused.sparkContext.applicationId == app  # no restart: fixtures keep their session
        assert reused.conf.get(SHUFFLE) == "7"
        message = str(caught[0].message)
        assert "spark.driver.memory" in message and SHUFFLE not in message
        assert "3g" not in message and "2g" not in message  # keys only, never values
    finally:
        spark_factory.session("local[2]", TEST_SPARK_CONF)
    assert spark.conf.get(SHUFFLE) == TEST_SPARK_CONF[SHUFFLE]


def test_the_same_settings_again_reuse_the_session_without_a_warning(spark):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = spark_factory.session("local[2]", TEST_SPARK_CONF)
    assert again.sparkContext.applicationId == spark.sparkContext.applicationId
