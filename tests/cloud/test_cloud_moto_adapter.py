"""Why ``gaia_flows.cloud.drivers.MotoEC2NodeDriver`` exists: the three ways libcloud 3.9's
EC2 driver and moto 5.2 disagree, each shown against the real ``moto_server``."""

import boto3
import pytest
from libcloud.common.exceptions import BaseHTTPError
from libcloud.compute.base import NodeImage
from libcloud.compute.drivers.ec2 import EC2NodeDriver

from cloud import servers
from gaia_flows.cloud.drivers import MotoEC2NodeDriver


@pytest.fixture
def ec2(moto):
    servers.moto_reset(moto)
    client = boto3.client(
        "ec2",
        endpoint_url=moto.url,
        region_name="us-east-1",
        aws_access_key_id="k",
        aws_secret_access_key="s",
    )
    (instance,) = client.run_instances(
        ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType="t3.micro"
    )["Instances"]
    return client, instance["InstanceId"]


def _driver(cls, moto, **options):
    return cls("k", "s", region="us-east-1", host="127.0.0.1", port=moto.port, secure=False, **options)


def test_stock_driver_parses_nothing_from_moto_and_the_adapter_does(moto, ec2):
    _, instance_id = ec2
    stock = _driver(EC2NodeDriver, moto, signature_version="4")
    assert stock.list_nodes() == [], "namespace without the trailing slash: every element is missed"
    adapted = _driver(MotoEC2NodeDriver, moto, signature_version="4")
    assert [n.id for n in adapted.list_nodes()] == [instance_id]


def test_signature_version_2_is_answered_as_s3_and_lists_nothing(moto, ec2):
    v2 = _driver(MotoEC2NodeDriver, moto, signature_version="2")
    assert v2.list_nodes() == []
    assert len(_driver(MotoEC2NodeDriver, moto, signature_version="4").list_nodes()) == 1


def test_tags_are_numbered_from_one(moto, ec2):
    client, instance_id = ec2
    driver = _driver(MotoEC2NodeDriver, moto, signature_version="4")
    node = next(n for n in driver.list_nodes() if n.id == instance_id)
    stock = _driver(EC2NodeDriver, moto, signature_version="4")
    with pytest.raises(BaseHTTPError):  # moto rejects ResourceId.0 / Tag.0
        stock.ex_create_tags(node, {"stock": "numbered-from-0"})
    assert [t for t in client.describe_tags()["Tags"] if t["ResourceId"] == instance_id] == []
    assert driver.ex_create_tags(node, {"gaia-flows-cluster": "c1", "role": "worker"})
    tags = {t["Key"]: t["Value"] for t in client.describe_tags()["Tags"] if t["ResourceId"] == instance_id}
    assert tags == {"gaia-flows-cluster": "c1", "role": "worker"}
    assert driver.ex_delete_tags(node, {"role": "worker"})
    tags = {t["Key"] for t in client.describe_tags()["Tags"] if t["ResourceId"] == instance_id}
    assert tags == {"gaia-flows-cluster"}


def test_create_node_metadata_becomes_tags(moto, ec2):
    client, _ = ec2
    driver = _driver(MotoEC2NodeDriver, moto, signature_version="4")
    size = next(s for s in driver.list_sizes() if s.id == "c5.large")
    node = driver.create_node(
        name="n1",
        size=size,
        image=NodeImage("ami-12c6146b", None, driver),
        ex_metadata={"gaia-flows-cluster": "c2"},
    )
    tags = {t["Key"]: t["Value"] for t in client.describe_tags()["Tags"] if t["ResourceId"] == node.id}
    assert tags == {"Name": "n1", "gaia-flows-cluster": "c2"}
    assert node.extra["tags"]["gaia-flows-cluster"] == "c2"
