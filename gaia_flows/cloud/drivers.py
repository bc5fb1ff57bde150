"""libcloud ``NodeDriver`` construction from a profile, with secrets read from the environment.

Secrets are looked up by the *names* the profile gives, at the moment the driver is built
inside a run, and are handed straight to libcloud; they are never stored on a resource,
returned, logged or written. Every failure message names the variable, never its value.

The emulator shim (``cloud.emulator: moto``) lives here too: it is a property of how we talk
to one endpoint, not of the provisioning logic, and keeping it in one small subclass makes
clear that production EC2 goes through libcloud unmodified.
"""

from __future__ import annotations

import os

from libcloud.compute.base import NodeDriver, NodeSize
from libcloud.compute.drivers.ec2 import NAMESPACE as EC2_NAMESPACE
from libcloud.compute.drivers.ec2 import EC2Connection, EC2NodeDriver, EC2Response
from libcloud.compute.providers import DRIVERS, get_driver, set_driver
from libcloud.compute.types import Provider

from gaia_flows.cloud.planner import Size
from gaia_flows.cloud.retry import register_secret_env
from gaia_flows.cloud.settings import CloudConfigError, CloudSettings

LOCAL_PROVIDER = "gaia-local-spark"


def register_local_driver() -> None:
    """Make ``get_driver("gaia-local-spark")`` work, so the local driver is built like any other."""
    if LOCAL_PROVIDER not in DRIVERS:
        set_driver(LOCAL_PROVIDER, "gaia_flows.cloud.local_driver", "LocalSparkNodeDriver")


# --- moto 5.2 compatibility (EC2 emulator only) -------------------------------------------
# Adapter, not test setup: the benchmark and a developer's "aws on moto" profile need it too.
# 1. moto answers with xmlns "http://ec2.amazonaws.com/doc/2016-11-15" (no trailing slash);
#    libcloud looks every element up under ".../2016-11-15/", so without this each parse
#    silently finds nothing.
# 2. libcloud's ex_create_tags/ex_delete_tags number Tag.N/ResourceId.N from 0; moto (like the
#    EC2 query API docs) counts from 1, and answers without <return>. Provisioning passes tags
#    through create_node's ex_metadata (TagSpecification, numbered correctly), so this only
#    matters for tags added later.
# 3. signature_version must be "4": with "2" moto routes the request to its S3 backend and
#    every list comes back empty without an error. build_driver forces it for moto.
MOTO_EC2_NAMESPACE = EC2_NAMESPACE.rstrip("/")


class _MotoEC2Response(EC2Response):
    def parse_body(self):
        if self.body:
            self.body = self.body.replace(f'xmlns="{MOTO_EC2_NAMESPACE}"', f'xmlns="{EC2_NAMESPACE}"')
        return super().parse_body()


class _MotoEC2Connection(EC2Connection):
    responseCls = _MotoEC2Response


class MotoEC2NodeDriver(EC2NodeDriver):
    """libcloud's EC2 driver with the three moto 5.2 differences above patched."""

    connectionCls = _MotoEC2Connection

    def _tag_params(self, action: str, resource, tags: dict, with_values: bool = True) -> dict:
        params = {"Action": action, "ResourceId.1": resource.id}
        for i, key in enumerate(tags, start=1):
            params[f"Tag.{i}.Key"] = key
            if with_values and tags[key] is not None:
                params[f"Tag.{i}.Value"] = tags[key]
        return params

    # moto answers these two without EC2's <return>true</return>; an error would have raised.
    def ex_create_tags(self, resource, tags):
        if not tags:
            return None
        self.connection.request(self.path, params=self._tag_params("CreateTags", resource, tags))
        return True

    def ex_delete_tags(self, resource, tags):
        if not tags:
            return None
        self.connection.request(self.path, params=self._tag_params("DeleteTags", resource, tags))
        return True


# --- construction -------------------------------------------------------------------------


def _env(settings: CloudSettings, key: str, required: bool = True) -> str | None:
    name = settings.credentials.get(key)
    if not name:
        if required:
            raise CloudConfigError(
                f"profile {settings.profile!r}: key 'cloud.credentials.{key}' is required for provider {settings.provider}"
            )
        return None
    value = os.environ.get(name)
    if not value:
        if required:
            raise CloudConfigError(
                f"profile {settings.profile!r}: environment variable {name} (named by cloud.credentials.{key}) is not set"
            )
        return None
    return value


def build_driver(settings: CloudSettings) -> NodeDriver:
    """A ready libcloud driver for the profile's provider; reads secrets from the environment now."""
    register_secret_env(settings.secret_env_names())
    options = dict(settings.driver_options)
    provider = settings.provider
    if provider == "local-spark":
        register_local_driver()
        cls = get_driver(LOCAL_PROVIDER)
        return cls("local", state_dir=str(settings.state_dir), sizes=list(settings.local_sizes), **options)
    if provider == "ec2":
        cls = MotoEC2NodeDriver if settings.emulator == "moto" else get_driver(Provider.EC2)
        if settings.emulator == "moto":
            options["signature_version"] = "4"
        token = _env(settings, "token_env", required=False)
        if token:
            options["token"] = token
        return cls(
            _env(settings, "key_env"),
            _env(settings, "secret_env"),
            region=settings.region or "us-east-1",
            **options,
        )
    if provider == "openstack":
        cls = get_driver(Provider.OPENSTACK)
        if settings.region and "ex_force_service_region" not in options:
            options["ex_force_service_region"] = settings.region
        options.setdefault("ex_force_auth_version", "3.x_password")
        options.setdefault("api_version", "2.0")
        return cls(_env(settings, "key_env"), _env(settings, "secret_env"), **options)
    if provider == "gce":
        cls = get_driver(Provider.GCE)
        if settings.zone:
            options.setdefault("datacenter", settings.zone)
        return cls(_env(settings, "key_env"), _env(settings, "secret_env"), **options)
    if provider == "azure_arm":
        cls = get_driver(Provider.AZURE_ARM)
        return cls(
            _env(settings, "tenant_id_env"),
            _env(settings, "subscription_id_env"),
            _env(settings, "key_env"),
            _env(settings, "secret_env"),
            region=settings.region,
            **options,
        )
    raise CloudConfigError(f"profile {settings.profile!r}: unsupported provider {provider!r}")


# --- sizes for the planner ----------------------------------------------------------------

_VCPU_KEYS = ("vcpus", "vcpu", "cpu", "guestCpus", "numberOfCores", "cores")


def vcpus_of(size: NodeSize) -> int | None:
    """libcloud keeps vCPUs in a different place per driver; find them."""
    direct = getattr(size, "vcpus", None)
    if direct:
        return int(direct)
    extra = size.extra or {}
    for key in _VCPU_KEYS:
        value = extra.get(key)
        if value not in (None, "", "NA"):
            try:
                return int(float(str(value).split()[0]))
            except ValueError:
                continue
    return None


def planner_sizes(sizes: list[NodeSize], prices: dict[str, float] | None = None) -> list[Size]:
    """libcloud sizes as planner sizes; a profile price overrides the driver's (OpenStack has none)."""
    prices = prices or {}
    out = []
    for s in sizes:
        vcpus = vcpus_of(s)
        if not vcpus or not s.ram:
            continue  # bare-metal/odd entries without CPU or RAM figures cannot be planned for
        price = prices.get(s.name, prices.get(str(s.id)))
        if price is None and s.price:
            price = float(s.price)
        out.append(Size(id=str(s.id), name=str(s.name), vcpus=int(vcpus), ram_mb=int(s.ram), price=price))
    return out
