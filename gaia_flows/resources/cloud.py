"""The cloud (libcloud driver + provisioner) as a Dagster resource.

The resource holds only the profile's *name* and where to find it. The driver - and with it
the secret values from the environment variables the profile names - is built inside the run
that needs it and dropped afterwards, so no secret is ever part of resource config, the
Dagster UI, run storage or a pickled output.
"""

# No ``from __future__ import annotations``: Dagster reads the ``storage`` annotation at class
# creation to know it is a nested resource, which a string annotation hides.
import logging
from pathlib import Path

from dagster import ConfigurableResource

from gaia_flows.layout import StateLayout
from gaia_flows.profiles import PROFILES_DIR, Profile, load_profile
from gaia_flows.resources.storage import StorageResource


class CloudResource(ConfigurableResource):
    """Where clusters are provisioned: a profile from ``resources/`` (e.g. ``aws``, ``local-cluster``).

    Cluster manifests and the local driver's PIDs live in the state folder of ``storage``.
    A profile with ``cloud: null`` (``local``,
    ``kubernetes``) is valid: ``spark_cluster`` then reports that no cluster is needed.
    """

    storage: StorageResource
    profile: str = "local"
    profiles_dir: str | None = None

    def load(self) -> Profile:
        return load_profile(self.profile, Path(self.profiles_dir) if self.profiles_dir else PROFILES_DIR)

    @property
    def layout(self) -> StateLayout:
        return self.storage.paths

    @property
    def enabled(self) -> bool:
        return self.load().cloud is not None

    def settings(self):
        from gaia_flows.cloud.settings import CloudSettings

        return CloudSettings.from_profile(self.load(), self.layout)

    def driver(self):
        from gaia_flows.cloud.drivers import build_driver

        return build_driver(self.settings())

    def provisioner(self, logger: logging.Logger | None = None, **kwargs):
        """A provisioner with a fresh driver; secrets are read from the environment here."""
        from gaia_flows.cloud.drivers import build_driver
        from gaia_flows.cloud.provision import Provisioner

        settings = self.settings()
        return Provisioner(build_driver(settings), settings, logger=logger, **kwargs)

    def manifest_path(self) -> str | None:
        from gaia_flows.cloud.settings import cluster_name_of, manifest_path

        name = cluster_name_of(self.load())
        return str(manifest_path(self.layout.clusters, name)) if name else None
