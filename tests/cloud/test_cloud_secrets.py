"""A cloud secret set in the environment reaches the cloud (authentication succeeds) and
nothing else: no log line, no asset metadata, no file under the state folder - also when
provisioning fails and the error text is built from the cloud's answer."""

import logging

from dagster import DagsterInstance, materialize

from gaia_flows.assets.cluster import spark_cluster
from gaia_flows.jobs import teardown_cluster_job
from gaia_flows.resources.cloud import CloudResource
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource


def _all_text_of(value) -> str:
    return repr(value)


def test_secret_from_the_environment_appears_in_no_log_metadata_or_file(target, layout, caplog):
    caplog.set_level(logging.DEBUG)  # libcloud, urllib3, ours: everything Python logs
    storage = StorageResource()
    cloud = CloudResource(storage=storage, profile=target.profile, profiles_dir=str(target.profiles_dir))
    resources = {"cloud": cloud, "storage": storage, "spark": SparkResource()}
    config = {"ops": {"spark_cluster": {"config": {"workers": 1, "size": target.worker_size}}}}
    # The instance lives in the state folder, so its event log (SQLite) is among the files scanned.
    with DagsterInstance.local_temp(str(layout.dagster_home)) as instance:
        ok = materialize([spark_cluster], resources=resources, run_config=config, instance=instance)
        assert ok.success, "the secret was read from the environment and accepted by the cloud"
        target.api.set_faults([{"match": target.create_request, "kind": "quota", "after": 0, "times": -1}])
        failed = materialize(
            [spark_cluster],
            resources=resources,
            run_config={"ops": {"spark_cluster": {"config": {"workers": 3, "size": target.worker_size}}}},
            instance=instance,
            raise_on_error=False,
        )
        assert not failed.success
        target.api.clear_faults()
        assert teardown_cluster_job.execute_in_process(resources={"cloud": cloud}, instance=instance).success

        records = []
        for run in instance.get_runs():
            records += instance.all_logs(run.run_id)
        assert len(records) > 20
        for record in records:
            assert target.secret not in (record.user_message or "")
            assert target.secret not in _all_text_of(record.dagster_event), record.dagster_event_type
        for event in ok.asset_materializations_for_node("spark_cluster"):
            assert target.secret not in _all_text_of(event.metadata)
        assert target.secret not in repr(cloud), "resource config holds only the profile's name"

    assert caplog.records, "logging was captured"
    assert target.secret not in caplog.text
    scanned = 0
    for path in layout.home.rglob("*"):
        if path.is_file():
            scanned += 1
            assert target.secret.encode() not in path.read_bytes(), path
    assert scanned > 3, "the event log and the cluster folder were scanned"
