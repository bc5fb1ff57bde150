"""Deployment profiles: the YAML files in the top-level ``resources/`` folder.

A profile says *where* the asset graph runs (Spark master and settings, cloud driver,
storage); the graph itself never changes. Profiles hold no secrets, only the names of the
environment variables that carry them. ``GAIA_FLOWS_PROFILE`` picks one (default ``local``).

Every profile is checked against ``resources/profile.schema.json`` when loaded, so a typo in
a key fails at start-up with the dotted key in the message rather than as a ``KeyError``
deep inside a run.
"""

from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import yaml

from gaia_flows.layout import PROFILES_PACKAGE_DIR, package_data

PROFILES_DIR = package_data(PROFILES_PACKAGE_DIR)
SCHEMA_PATH = PROFILES_DIR / "profile.schema.json"
DEFAULT_PROFILE = "local"
FROM_CLUSTER = "from-cluster"


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    spark_master: str
    spark_conf: dict[str, str]
    cloud: dict | None = None
    storage: dict = field(default_factory=dict)
    source: Path | None = None
    kubernetes: dict | None = None
    spark_version: str | None = None

    @property
    def has_cloud(self) -> bool:
        return self.cloud is not None

    @property
    def directory(self) -> Path | None:
        return self.source.parent if self.source else None


def profile_name() -> str:
    return os.environ.get("GAIA_FLOWS_PROFILE", DEFAULT_PROFILE)


@functools.cache
def schema() -> dict:
    return json.loads(SCHEMA_PATH.read_text())


def _key_of(error: jsonschema.ValidationError) -> str:
    """The dotted key a person has to fix, including the one a 'required'/'additional' error names."""
    parts = [str(p) for p in error.absolute_path]
    if error.validator == "required":
        missing = re.search(r"'([^']+)' is a required property", error.message)
        if missing:
            parts.append(missing.group(1))
    elif error.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)'", error.message.split("(")[-1])
        if extra:
            parts.append(extra[0])
    elif error.validator == "propertyNames" or "propertyNames" in error.absolute_schema_path:
        parts.append(str(error.instance))
    return ".".join(parts) or "<root>"


def _most_specific(errors: list[jsonschema.ValidationError]) -> list[jsonschema.ValidationError]:
    """Unwrap oneOf/anyOf: report the branch that got furthest, not 'is not valid under any'."""
    out = []
    for error in errors:
        if error.context:
            deepest = max(error.context, key=lambda e: (len(e.absolute_path), e.validator != "type"))
            out.extend(_most_specific([deepest]))
        else:
            out.append(error)
    return out


def validate_profile(spec: object, source: str | os.PathLike = "<profile>") -> dict:
    """Raise ``ProfileError`` naming every offending key; return the spec unchanged if valid."""
    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(spec), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        lines = [f"key '{_key_of(e)}': {e.message}" for e in _most_specific(errors)]
        raise ProfileError(f"{source}: invalid profile:\n  " + "\n  ".join(dict.fromkeys(lines)))
    return spec  # type: ignore[return-value]


def list_profiles(directory: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.yaml"))


def load_profile(name: str | None = None, directory: Path = PROFILES_DIR) -> Profile:
    """The named profile, else the one ``GAIA_FLOWS_PROFILE`` names (read now, not cached)."""
    return _load_profile(name or profile_name(), Path(directory))


@functools.cache
def _load_profile(name: str, directory: Path) -> Profile:
    path = directory / f"{name}.yaml"
    if not path.exists():
        raise ProfileError(
            f"unknown profile {name!r}: no {path} (known: {', '.join(list_profiles(directory))})"
        )
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ProfileError(f"{path}: not valid YAML: {exc}") from exc
    validate_profile(spec, path)
    spark = spec["spark"]
    return Profile(
        name=spec.get("name", name),
        description=spec.get("description", ""),
        spark_master=str(spark["master"]),
        spark_conf={k: _conf_value(v) for k, v in (spark.get("conf") or {}).items()},
        cloud=spec.get("cloud"),
        storage=spec.get("storage") or {},
        source=path,
        kubernetes=spec.get("kubernetes"),
        spark_version=spark.get("version"),
    )


def _conf_value(value: object) -> str:
    # YAML booleans would otherwise become "True", which Spark rejects.
    return str(value).lower() if isinstance(value, bool) else str(value)
