"""Deployment profiles: every shipped one is valid, a broken one fails naming the key, and
secrets are only ever names of environment variables."""

import uuid

import pytest
import yaml

from gaia_flows.cloud.drivers import build_driver
from gaia_flows.cloud.settings import CloudConfigError, CloudSettings
from gaia_flows.layout import StateLayout
from gaia_flows.profiles import PROFILES_DIR, ProfileError, list_profiles, load_profile, validate_profile


def _shipped(name):
    return yaml.safe_load((PROFILES_DIR / f"{name}.yaml").read_text())


def test_every_target_has_a_valid_profile():
    names = list_profiles()
    assert {"local", "local-cluster", "openstack", "aws", "gce", "azure", "kubernetes"} <= set(names)
    for name in names:
        profile = load_profile(name)
        assert profile.name == name
    assert load_profile("local").cloud is None and load_profile("local").spark_master.startswith("local[")
    assert load_profile("local-cluster").cloud["provider"] == "local-spark"
    assert {load_profile(n).cloud["provider"] for n in ("openstack", "aws", "gce", "azure")} == {
        "openstack",
        "ec2",
        "gce",
        "azure_arm",
    }


def test_the_environment_variable_picks_the_profile(monkeypatch):
    monkeypatch.setenv("GAIA_FLOWS_PROFILE", "local-cluster")
    assert load_profile().name == "local-cluster"
    monkeypatch.delenv("GAIA_FLOWS_PROFILE")
    assert load_profile().name == "local"


@pytest.mark.parametrize(
    "base, edit, key",
    [
        ("openstack", lambda p: p["cloud"]["limits"].update(max_worker=4), "cloud.limits.max_worker"),
        ("aws", lambda p: p["cloud"]["cluster"].pop("name"), "cloud.cluster.name"),
        ("aws", lambda p: p["cloud"]["limits"].update(max_workers="lots"), "cloud.limits.max_workers"),
        (
            "openstack",
            lambda p: p["cloud"]["driver_options"].update(password=uuid.uuid4().hex),
            "cloud.driver_options.password",
        ),
        (
            "aws",
            lambda p: p["cloud"]["credentials"].update(
                secret_env=f"{uuid.uuid4().hex[:12]}/{uuid.uuid4().hex[:8]}"
            ),
            "cloud.credentials.secret_env",
        ),
        ("gce", lambda p: p["cloud"].update(provider="digitalocean"), "cloud.provider"),
        ("local", lambda p: p["spark"].update(master="yarn"), "spark.master"),
        (
            "openstack",
            lambda p: p["cloud"]["network"].update(orchestrator_cidr="0.0.0.0"),
            "cloud.network.orchestrator_cidr",
        ),
        (
            "local-cluster",
            lambda p: p["cloud"]["sizes"]["local"][0].pop("ram_mb"),
            "cloud.sizes.local.0.ram_mb",
        ),
    ],
)
def test_an_invalid_profile_fails_naming_the_key(tmp_path, base, edit, key):
    spec = _shipped(base)
    edit(spec)
    spec["name"] = f"broken-{base}"
    (tmp_path / f"broken-{base}.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(ProfileError) as err:
        load_profile(f"broken-{base}", tmp_path)
    assert f"key '{key}'" in str(err.value)
    assert str(tmp_path / f"broken-{base}.yaml") in str(err.value)
    if key.endswith("password"):
        assert spec["cloud"]["driver_options"]["password"] not in str(err.value), (
            "the message must not echo the secret"
        )


def test_unknown_profile_lists_the_known_ones(tmp_path):
    with pytest.raises(ProfileError, match=r"unknown profile 'nope'.*known: .*aws.*local"):
        load_profile("nope")


def test_not_yaml_is_reported_with_the_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("spark: [unclosed\n")
    with pytest.raises(ProfileError, match=r"bad\.yaml: not valid YAML"):
        load_profile("bad", tmp_path)


def test_no_shipped_profile_holds_a_secret_value():
    for name in list_profiles():
        cloud = _shipped(name).get("cloud") or {}
        for key, value in (cloud.get("credentials") or {}).items():
            assert key.endswith("_env") and value.isupper(), (name, key)
        validate_profile(_shipped(name), name)


def test_a_missing_credential_variable_is_named_and_no_value_is_shown(monkeypatch, layout):
    monkeypatch.delenv("OS_PASSWORD", raising=False)
    monkeypatch.setenv("OS_USERNAME", "someone")
    settings = CloudSettings.from_profile(load_profile("openstack"), layout)
    with pytest.raises(
        CloudConfigError,
        match=r"environment variable OS_PASSWORD \(named by cloud.credentials.secret_env\) is not set",
    ):
        build_driver(settings)


def test_settings_fill_defaults_and_derive_names(layout):
    settings = CloudSettings.from_profile(load_profile("aws"), layout)
    assert settings.group_name == "gaia-aws-sg" and settings.key_name == "gaia-aws-key"
    assert settings.limits.allowed_sizes[0] == "c5.large" and settings.limits.max_total_vcpus == 128
    assert settings.manifest_path == StateLayout.from_env().clusters / "gaia-aws.json"
    assert settings.secret_env_names() == ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]
    with pytest.raises(CloudConfigError, match="has no cloud section"):
        CloudSettings.from_profile(load_profile("local"), layout)
