"""deployments/: the instance files load in the real Dagster against the storage they name, the
image and Helm values agree with the profiles, and no deployment file carries a secret.

The PostgreSQL-backed instances (openstack, aws, kubernetes) are loaded against a real
PostgreSQL server started on 127.0.0.1 for this module, with TLS and password authentication,
so the ``DAGSTER_PG_*`` references and ``sslmode`` are exercised rather than just parsed."""

import os
import re
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml
from dagster import DagsterInstance
from support.servers import free_port

from gaia_flows import cli
from gaia_flows.layout import REPO_ROOT

DEPLOYMENTS = REPO_ROOT / "deployments"
PROFILES = REPO_ROOT / "resources"
DOCKERFILE = DEPLOYMENTS / "Dockerfile"
HELM_VALUES = DEPLOYMENTS / "helm" / "values-kubernetes.yaml"
SQLITE_TARGETS = ["local", "local-cluster"]
POSTGRES_TARGETS = ["openstack", "aws", "kubernetes"]
PG_PASSWORD = "only-for-this-test-server"


def _yaml(path: Path):
    return yaml.safe_load(path.read_text())


def _instance(home: Path, source: Path, monkeypatch, edit=None) -> DagsterInstance:
    """The instance Dagster builds from ``source`` as $DAGSTER_HOME/dagster.yaml."""
    home.mkdir(parents=True, exist_ok=True)
    config = _yaml(source)
    if edit:
        edit(config)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return DagsterInstance.get()


def test_every_target_has_an_instance_file_and_a_profile():
    targets = {p.parent.name for p in DEPLOYMENTS.glob("*/dagster.yaml")}
    assert targets == set(SQLITE_TARGETS + POSTGRES_TARGETS)
    for target in targets:
        assert (PROFILES / f"{target}.yaml").is_file(), f"deployments/{target} has no resources/{target}.yaml"
        config = _yaml(DEPLOYMENTS / target / "dagster.yaml")
        assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
        assert 1 <= config["concurrency"]["runs"]["max_concurrent_runs"] <= 4, (
            "a backfill must queue, not start 48 Spark apps"
        )
        assert config["concurrency"]["pools"]["default_limit"] == 1, "one writer per table"
        monitoring = config["run_monitoring"]
        assert monitoring["enabled"] and monitoring["poll_interval_seconds"] <= 30, (
            "a dead run worker is failed within a minute"
        )


@pytest.mark.parametrize("target", SQLITE_TARGETS)
def test_sqlite_instance_loads_under_its_dagster_home(target, tmp_path, monkeypatch):
    home = tmp_path / "state" / "dagster"
    instance = _instance(home, DEPLOYMENTS / target / "dagster.yaml", monkeypatch)
    try:
        assert type(instance.run_storage).__name__ == "SqliteRunStorage"
        assert type(instance.run_launcher).__name__ == "LocalRunLauncher"
        assert instance.run_launcher.supports_check_run_worker_health
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        expected = _yaml(DEPLOYMENTS / target / "dagster.yaml")["concurrency"]["runs"]["max_concurrent_runs"]
        assert instance.get_concurrency_config().run_queue_config.max_concurrent_runs == expected
        assert instance.run_monitoring_enabled and instance.run_monitoring_poll_interval_seconds <= 30
        assert instance.event_log_storage.supports_global_concurrency_limits, "pools are enforced on SQLite"
        assert instance.get_runs() == []
        assert (home / "history" / "runs.db").is_file(), "run storage is SQLite inside the state folder"
    finally:
        instance.dispose()


def test_misspelt_instance_setting_is_rejected(tmp_path, monkeypatch):
    """The loader these tests rely on does catch a wrong key, so a passing load means something."""

    def misspell(config):
        config["concurrency"]["runs"]["max_concurent_runs"] = config["concurrency"]["runs"].pop(
            "max_concurrent_runs"
        )

    with pytest.raises(Exception, match="max_concurent_runs"):
        _instance(tmp_path / "dagster", DEPLOYMENTS / "local" / "dagster.yaml", monkeypatch, edit=misspell)


def test_cli_seeds_the_state_folder_from_the_local_instance_file(layout):
    instance_yaml = layout.dagster_home / "dagster.yaml"
    instance_yaml.unlink(missing_ok=True)
    env = cli.dagster_env(layout)
    assert env["DAGSTER_HOME"] == str(layout.dagster_home)
    assert instance_yaml.read_text() == (DEPLOYMENTS / "local" / "dagster.yaml").read_text()
    instance_yaml.write_text("telemetry:\n  enabled: true\n")
    cli.dagster_env(layout)
    assert instance_yaml.read_text() == "telemetry:\n  enabled: true\n", "a user's edited instance is kept"


# --- PostgreSQL targets -----------------------------------------------------------------------


def _as_server_user(command: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root; CI containers often are root."""
    return ["runuser", "-u", "nobody", "--", *command] if os.geteuid() == 0 else command


@pytest.fixture(scope="module")
def postgres_server():
    """A throwaway PostgreSQL on 127.0.0.1 with TLS and scram passwords, stopped at the end.
    scram-sha-256 refuses a missing or wrong password, so a connection proves DAGSTER_PG_PASSWORD
    reached the driver."""
    if not shutil.which("initdb") or not shutil.which("pg_ctl"):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    root = Path(tempfile.mkdtemp(prefix="gaia-pg-"))
    data = root / "data"
    (root / "pw").write_text(PG_PASSWORD + "\n")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            str(root / "server.key"),
            "-out",
            str(root / "server.crt"),
        ],
        check=True,
        capture_output=True,
    )
    (root / "server.key").chmod(0o600)
    if os.geteuid() == 0:
        for path in [root, *root.iterdir()]:
            shutil.chown(path, "nobody")
    subprocess.run(
        _as_server_user(
            [
                "initdb",
                "-D",
                str(data),
                "-U",
                "gaia",
                "--pwfile",
                str(root / "pw"),
                "-A",
                "scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
            ]
        ),
        check=True,
        capture_output=True,
    )
    port = free_port()
    options = (
        f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off "
        f"-c ssl=on -c ssl_cert_file={root / 'server.crt'} -c ssl_key_file={root / 'server.key'}"
    )
    subprocess.run(
        _as_server_user(["pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-o", options, "start"]),
        check=True,
        capture_output=True,
    )
    try:
        yield {
            "DAGSTER_PG_HOST": "127.0.0.1",
            "DAGSTER_PG_DB": "postgres",
            "DAGSTER_PG_USERNAME": "gaia",
            "DAGSTER_PG_PASSWORD": PG_PASSWORD,
            "port": port,
        }
    finally:
        subprocess.run(
            _as_server_user(["pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"]), capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


def _point_at(server: dict, kubeconfig: Path | None = None):
    """Only what differs between the test server and production: its port, and for the K8s
    launcher a kubeconfig file instead of the in-cluster service account."""

    def edit(config):
        config["storage"]["postgres"]["postgres_db"]["port"] = server["port"]
        if kubeconfig is not None:
            launcher = config["run_launcher"]["config"]
            launcher["load_incluster_config"] = False
            launcher["kubeconfig_file"] = str(kubeconfig)

    return edit


@pytest.mark.parametrize("target", POSTGRES_TARGETS)
def test_postgres_instance_loads_against_a_real_server(target, postgres_server, tmp_path, monkeypatch):
    for name, value in postgres_server.items():
        if name.startswith("DAGSTER_PG_"):
            monkeypatch.setenv(name, value)
    kubeconfig = None
    if target == "kubernetes":
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "t",
                    "clusters": [{"name": "t", "cluster": {"server": "https://127.0.0.1:1"}}],
                    "users": [{"name": "t", "user": {}}],
                    "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t"}}],
                }
            )
        )
    instance = _instance(
        tmp_path / "dagster",
        DEPLOYMENTS / target / "dagster.yaml",
        monkeypatch,
        edit=_point_at(postgres_server, kubeconfig),
    )
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert instance.get_runs() == [], "tables were created and queried over the connection"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        launcher = instance.run_launcher
        if target == "kubernetes":
            assert type(launcher).__name__ == "K8sRunLauncher"
            assert launcher.job_namespace == "gaia-flows"
            assert (
                launcher.service_account_name
                == _yaml(PROFILES / "kubernetes.yaml")["kubernetes"]["service_account"]
            )
            assert launcher.instance_config_map == "gaia-flows-instance"
        else:
            assert type(launcher).__name__ == "LocalRunLauncher"
    finally:
        instance.dispose()


# --- image and Helm values ---------------------------------------------------------------------


def _dockerfile_cmd() -> list[str]:
    line = next(l for l in DOCKERFILE.read_text().splitlines() if l.startswith("CMD "))
    return yaml.safe_load(line[len("CMD ") :])


def test_dockerfile_builds_the_pinned_project_as_a_non_root_code_server():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M), (
        "the public base stays the default"
    )
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    assert "openjdk-17-jre-headless" in text
    assert re.search(r"uv pip install .*-c constraints\.txt \.", text), (
        "dependencies pinned by constraints.txt"
    )
    uv_pin = re.search(r"^UV_VERSION := (\S+)$", (REPO_ROOT / "Makefile").read_text(), re.M).group(1)
    assert f"uv=={uv_pin}" in text, "the image installs with the uv that make install uses"
    assert "GAIA_FLOWS_HOME=/var/lib/gaia-flows" in text
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in {"root", "0"}
    assert _dockerfile_cmd() == [
        "dagster",
        "api",
        "grpc",
        "-m",
        "gaia_flows.definitions",
        "-h",
        "0.0.0.0",
        "-p",
        "4000",
    ]
    assert re.search(r"^EXPOSE 4000$", text, re.M)
    for referenced in re.findall(r"\b(deployments/\S+?\.(?:sh|yaml))\b", text):
        assert (REPO_ROOT / referenced).is_file(), f"Dockerfile uses missing {referenced}"


def test_prometheus_reads_the_targets_files_the_cluster_asset_writes_in_the_image_state_folder():
    """The scrape config's file_sd glob matches the file ``spark_cluster`` writes for any cluster
    name, under the image's GAIA_FLOWS_HOME."""
    import fnmatch

    from gaia_flows.cloud.prometheus import targets_path
    from gaia_flows.cloud.settings import manifest_path

    config = yaml.safe_load((REPO_ROOT / "deployments/prometheus/prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    (discovery,) = job["file_sd_configs"]
    (pattern,) = discovery["files"]
    home = re.search(r"GAIA_FLOWS_HOME=(\S+)", DOCKERFILE.read_text()).group(1)
    for cluster in ("gaia-aws", "gaia-os-2"):
        written = targets_path(manifest_path(Path(home) / "clusters", cluster))
        assert fnmatch.fnmatch(str(written), pattern), (written, pattern)
    assert not fnmatch.fnmatch(str(manifest_path(Path(home) / "clusters", "gaia-aws")), pattern), (
        "the manifest itself is not a target list"
    )


def test_dockerignore_keeps_state_and_venv_out_but_the_project_in():
    patterns = [
        l.strip()
        for l in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if l.strip() and not l.startswith("#")
    ]
    for excluded in (".venv", ".gaia", ".git", "**/__pycache__"):
        assert excluded in patterns
    for needed in (
        "gaia_flows",
        "resources",
        "data_contracts",
        "deployments",
        "pyproject.toml",
        "constraints.txt",
    ):
        assert not any(p.strip("/") == needed for p in patterns), f"{needed} must reach the image"


def test_helm_values_run_our_image_with_the_k8s_run_launcher():
    values = _yaml(HELM_VALUES)
    profile = _yaml(PROFILES / "kubernetes.yaml")["kubernetes"]
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    image = deployment["image"]
    assert f"{image['repository']}:{image['tag']}" == profile["image"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "gaia_flows.definitions"]
    assert str(deployment["port"]) == _dockerfile_cmd()[-1]
    assert deployment["env"]["GAIA_FLOWS_PROFILE"] == "kubernetes"
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    assert "resources" not in deployment, "would override the run pod's driver sizing"
    assert values["dagster-user-deployments"]["serviceAccount"]["name"] == profile["service_account"]

    launcher = values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher"
    run_resources = launcher["config"]["k8sRunLauncher"]["runK8sConfig"]["containerConfig"]["resources"]
    assert run_resources == profile["run_pod_resources"]

    queue = values["dagsterDaemon"]["runCoordinator"]
    assert queue["type"] == "QueuedRunCoordinator"
    instance = _yaml(DEPLOYMENTS / "kubernetes" / "dagster.yaml")
    assert (
        queue["config"]["queuedRunCoordinator"]["maxConcurrentRuns"]
        == instance["concurrency"]["runs"]["max_concurrent_runs"]
    )

    assert values["generatePostgresqlPasswordSecret"] is False
    assert "postgresqlPassword" not in values["postgresql"], (
        "the password comes from global.postgresqlSecretName"
    )
    assert values["global"]["postgresqlSecretName"]


HELM_SCHEMA = REPO_ROOT / "tests" / "data" / "helm" / "dagster-values.schema.json"
HELM_SCHEMA_K8S_URI = "https://kubernetesjsonschema.dev/v1.18.0/_definitions.json"


def _helm_schema_errors(values: dict) -> list[str]:
    """What the chart's ``values.schema.json`` (tests/data/helm/README.md) says of ``values``, as
    Helm judges it: Helm validates the chart's defaults merged with the user's values. Maps merge,
    so a required key the defaults supply may be absent from ours; lists replace, so inside a
    list item every required key is ours to give. The schema's Kubernetes objects resolve to the
    strict definitions kubernetes-validate ships, so a misspelt field inside them is refused."""
    import importlib.resources
    import json

    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    definitions = json.loads(
        importlib.resources.files("kubernetes_validate")
        .joinpath(f"kubernetes-json-schema/v{KUBERNETES_VERSION}-local-strict/_definitions.json")
        .read_text()
    )["$defs"]
    kubernetes = Resource.from_contents(
        {"$defs": definitions, "definitions": definitions}, default_specification=DRAFT202012
    )
    validator = jsonschema.Draft202012Validator(
        json.loads(HELM_SCHEMA.read_text()),
        registry=Registry().with_resource(HELM_SCHEMA_K8S_URI, kubernetes),
    )
    return [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message[:200]}"
        for error in validator.iter_errors(values)
        if not _supplied_by_chart_defaults(error)
    ]


def _supplied_by_chart_defaults(error) -> bool:
    """A missing key outside any list item (the chart's defaults hold it), or an ``anyOf`` one of
    whose branches fails only for such keys."""
    if error.validator == "required":
        return not any(isinstance(step, int) for step in error.absolute_path)
    if error.validator in ("anyOf", "oneOf"):
        branches: dict = {}
        for sub in error.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        return any(all(_supplied_by_chart_defaults(e) for e in errors) for errors in branches.values())
    return False


def test_helm_values_validate_against_the_official_chart_schema():
    assert _helm_schema_errors(_yaml(HELM_VALUES)) == []


def _misspelt_launcher_key(values):
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    launcher["jobNamespce"] = launcher.pop("jobNamespace")


def _deployment_without_port(values):
    del values["dagster-user-deployments"]["deployments"][0]["port"]


def _misspelt_pod_security_field(values):
    values["dagsterDaemon"]["podSecurityContext"] = {"runAsNonroot": True}


def _unknown_pull_policy(values):
    values["runLauncher"]["config"]["k8sRunLauncher"]["imagePullPolicy"] = "IfMissing"


def _string_replica_count(values):
    values["dagsterWebserver"]["replicaCount"] = "2"


@pytest.mark.parametrize(
    "edit, where",
    [
        (_misspelt_launcher_key, "runLauncher.config.k8sRunLauncher"),
        (_deployment_without_port, "dagster-user-deployments.deployments.0"),
        (_misspelt_pod_security_field, "dagsterDaemon.podSecurityContext"),
        (_unknown_pull_policy, "runLauncher.config.k8sRunLauncher"),
        (_string_replica_count, "dagsterWebserver.replicaCount"),
    ],
    ids=["misspelt key", "list item lacks a required key", "misspelt kubernetes field", "enum", "type"],
)
def test_helm_schema_check_refuses_broken_values(edit, where):
    values = _yaml(HELM_VALUES)
    edit(values)
    errors = _helm_schema_errors(values)
    assert any(error.startswith(where) for error in errors), errors


def test_postgresql_and_mlflow_manifests_serve_the_names_the_profile_and_instance_use():
    """The in-cluster PostgreSQL and MLflow answer at the addresses the Helm values, the instance
    ConfigMap and the profile's tracking URI name, with the password Secret they all share."""
    from urllib.parse import urlsplit

    def docs(name):
        return {
            d["kind"] + "/" + d["metadata"]["name"]: d
            for d in yaml.safe_load_all((DEPLOYMENTS / "kubernetes" / name).read_text())
        }

    pg = docs("postgresql.yaml")
    mlflow = docs("mlflow.yaml")
    namespace = _yaml(DEPLOYMENTS / "kubernetes" / "namespace.yaml")["metadata"]["name"]
    values = _yaml(HELM_VALUES)
    instance_env = pg["ConfigMap/gaia-flows-pg"]["data"]
    service = pg["Service/gaia-flows-pg"]
    assert instance_env["DAGSTER_PG_HOST"] == f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
    assert values["postgresql"]["postgresqlHost"] == instance_env["DAGSTER_PG_HOST"]
    assert values["postgresql"]["service"]["port"] == service["spec"]["ports"][0]["port"]
    assert values["postgresql"]["postgresqlUsername"] == instance_env["DAGSTER_PG_USERNAME"]
    assert values["postgresql"]["postgresqlDatabase"] == instance_env["DAGSTER_PG_DB"]
    (server,) = pg["StatefulSet/gaia-flows-pg"]["spec"]["template"]["spec"]["containers"]
    password = next(e for e in server["env"] if e["name"] == "POSTGRES_PASSWORD")["valueFrom"]["secretKeyRef"]
    assert password == {"name": values["global"]["postgresqlSecretName"], "key": "postgresql-password"}
    assert "CREATE DATABASE mlflow" in pg["ConfigMap/gaia-flows-pg-init"]["data"]["10-mlflow.sql"]

    tracking = urlsplit(_yaml(PROFILES / "kubernetes.yaml")["storage"]["mlflow_tracking_uri"])
    mlflow_service = mlflow["Service/mlflow"]
    assert tracking.hostname == f"{mlflow_service['metadata']['name']}.{namespace}.svc"
    assert tracking.port == mlflow_service["spec"]["ports"][0]["port"]
    (container,) = mlflow["Deployment/mlflow"]["spec"]["template"]["spec"]["containers"]
    args = dict(zip(container["args"][::2], container["args"][1::2], strict=True))
    store = urlsplit(args["--backend-store-uri"])
    assert (store.hostname, store.port, store.path) == (instance_env["DAGSTER_PG_HOST"], 5432, "/mlflow")
    assert store.password == "$(PG_PASSWORD)", "the password is substituted from the Secret, never written"
    assert (
        next(e for e in container["env"] if e["name"] == "PG_PASSWORD")["valueFrom"]["secretKeyRef"]
        == password
    )
    assert tracking.netloc in args["--allowed-hosts"].split(","), (
        "MLflow refuses a Host header it does not list"
    )
    probe = container["readinessProbe"]["httpGet"]
    assert probe["httpHeaders"] == [{"name": "Host", "value": tracking.netloc}]
    assert container["image"] == _yaml(PROFILES / "kubernetes.yaml")["kubernetes"]["image"]


def test_kubernetes_profile_files_exist_in_the_image_layout():
    profile = _yaml(PROFILES / "kubernetes.yaml")
    template = profile["kubernetes"]["pod_template"]
    assert (REPO_ROOT / template).is_file()
    assert (
        profile["spark"]["conf"]["spark.kubernetes.executor.podTemplateFile"] == f"/opt/gaia-flows/{template}"
    )
    assert re.search(r"^WORKDIR /opt/gaia-flows$", DOCKERFILE.read_text(), re.M)
    pod = _yaml(REPO_ROOT / template)
    command = pod["spec"]["containers"][0]["command"][0]
    assert command.startswith("/opt/gaia-flows/")
    assert os.access(REPO_ROOT / command.removeprefix("/opt/gaia-flows/"), os.X_OK)


# --- no secrets in deployment files ----------------------------------------------------------

SECRET_KEY = re.compile(r"(?i)(passw|secret|token|private_?key|access_?key|api_?key|credential)")
ENV_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")
K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
TEXT_LEAKS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key block": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "literal password": re.compile(r"(?i)\bpassword\s*[:=]\s*(?![\s#]|$|\{\s*env\b|\$|~|null\b|\"\"|'')\S+"),
}


def _secret_like_values(node, path=""):
    """Values under secret-looking keys that are not references (env var or Secret names)."""
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{path}.{key}" if path else str(key)
            leaf = str(key).rsplit(".", 1)[
                -1
            ]  # Spark conf keys: judge `...credentials.provider` by `provider`
            if SECRET_KEY.search(leaf) and not _is_reference(leaf, value):
                yield here, value
            yield from _secret_like_values(value, here)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _secret_like_values(value, f"{path}[{i}]")


def _is_reference(key: str, value) -> bool:
    if value is None or isinstance(value, bool) or value == "":
        return True
    if isinstance(value, dict):
        return True  # `{env: NAME}`, or a group whose own keys are checked one by one
    if isinstance(value, list):  # envSecrets: [{name: ...}] / env_secrets: [name]: Secrets named, not inlined
        names = [v["name"] if isinstance(v, dict) and set(v) <= {"name", "optional"} else v for v in value]
        return key.lower().endswith("secrets") and all(
            isinstance(n, str) and K8S_NAME.match(n) for n in names
        )
    if isinstance(value, str):
        if key.lower().endswith("_env"):
            return bool(ENV_NAME.match(value))
        if re.search(r"(?i)secret_?name$|_secret$", key):
            return bool(K8S_NAME.match(value))
    return False


def _leaks(path: Path) -> list[str]:
    text = path.read_text(errors="replace")
    found = [f"{path.name}: {name}" for name, rx in TEXT_LEAKS.items() if rx.search(text)]
    if path.suffix in {".yaml", ".yml"}:
        for doc in yaml.safe_load_all(text):
            found += [f"{path.name}: {where}={value!r}" for where, value in _secret_like_values(doc)]
    return found


def _deployment_files() -> list[Path]:
    files = [p for root in (DEPLOYMENTS, PROFILES) for p in root.rglob("*") if p.is_file()]
    return files + [REPO_ROOT / ".dockerignore"]


def test_no_deployment_or_profile_file_holds_a_secret():
    files = _deployment_files()
    assert len(files) > 10
    leaks = [leak for path in files for leak in _leaks(path)]
    assert not leaks, leaks


def _token() -> str:
    return uuid.uuid4().hex


# Built at run time: a credential-shaped literal in this file would itself be a committed leak.
@pytest.mark.parametrize(
    "content",
    [
        lambda: f"storage:\n  postgres:\n    postgres_db:\n      password: {_token()}\n",
        lambda: f"cloud:\n  credentials:\n    secret_env: {_token()[:12]}/{_token()[:8]}\n",
        lambda: f"key: AKIA{_token()[:16].upper()}\n",
        lambda: f"postgresql:\n  postgresqlPassword: {_token()}\n",
        lambda: f"# note\nexport PASSWORD={_token()}\n",
    ],
    ids=["password", "secret_env value", "aws key id", "helm password", "shell password"],
)
def test_secret_scan_flags_literal_credentials(content, tmp_path):
    content = content()
    sample = tmp_path / ("sample.yaml" if "export" not in content else "sample.sh")
    sample.write_text(content)
    assert _leaks(sample)


# --- Pod Security Standard "restricted" ---------------------------------------------------------


RESTRICTED_VOLUME_TYPES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def _pod_specs() -> list[tuple[str, dict]]:
    """Every pod spec we ship: the pods and pod templates of the manifests (the run Job included),
    and the pods the Helm chart renders from our values. The chart sets a component's
    ``podSecurityContext`` on its pod and its ``securityContext`` on every container, the
    ``check-db-ready`` init container included; run pods come from ``runK8sConfig`` through
    dagster-k8s."""
    specs = []
    for name, manifest in _manifests():
        body = manifest.get("spec") or {}
        spec = body if manifest["kind"] == "Pod" else body.get("template", {}).get("spec")
        if spec is not None:
            specs.append((f"{name} {manifest['kind']}", spec))
    values = _yaml(HELM_VALUES)
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    for name, component in [
        ("webserver", values["dagsterWebserver"]),
        ("daemon", values["dagsterDaemon"]),
        ("user deployment", deployment),
    ]:
        container = {"securityContext": component.get("securityContext")}
        specs.append(
            (
                f"Helm {name}",
                {
                    "securityContext": component.get("podSecurityContext"),
                    "initContainers": [{"name": "check-db-ready", **container}],
                    "containers": [{"name": name, **container}],
                },
            )
        )
    run_config = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    helm_run_job = _run_job_manifest(
        {"container_config": run_config["containerConfig"], "pod_spec_config": run_config["podSpecConfig"]},
        values["imagePullSecrets"],
    )
    specs.append(("Helm run Job (dagster-k8s)", helm_run_job["spec"]["template"]["spec"]))
    return specs


def _restricted_violations(pod_spec: dict) -> list[str]:
    """The rules of the "restricted" Pod Security Standard (v1.30+) for one pod spec, pod-level
    settings inherited by containers where the standard allows it."""
    pod = pod_spec.get("securityContext") or {}
    found = []
    if pod_spec.get("hostNetwork") or pod_spec.get("hostPID") or pod_spec.get("hostIPC"):
        found.append("shares a host namespace")
    for volume in pod_spec.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            found.append(f"volume {volume.get('name')}: {sorted(kinds)} not allowed")
    for container in [*(pod_spec.get("initContainers") or []), *pod_spec.get("containers", [])]:
        ctx = container.get("securityContext") or {}
        name = container.get("name", "?")
        if ctx.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation must be false")
        if "ALL" not in ((ctx.get("capabilities") or {}).get("drop") or []):
            found.append(f"{name}: capabilities must drop ALL")
        if set((ctx.get("capabilities") or {}).get("add") or []) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: adds capabilities")
        if ctx.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            found.append(f"{name}: runAsNonRoot must be true")
        if ctx.get("runAsUser", pod.get("runAsUser")) == 0:
            found.append(f"{name}: runs as uid 0")
        seccomp = (ctx.get("seccompProfile") or pod.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{name}: seccompProfile must be RuntimeDefault or Localhost")
        if ctx.get("privileged"):
            found.append(f"{name}: privileged")
        if any(port.get("hostPort") for port in container.get("ports") or []):
            found.append(f"{name}: hostPort")
    return found


def test_every_pod_we_ship_passes_the_restricted_pod_security_standard():
    specs = _pod_specs()
    kinds = {name.rsplit(" ", 1)[-1] for name, _ in specs}
    assert {"Pod", "Deployment", "StatefulSet", "(dagster-k8s)", "webserver", "daemon"} <= kinds, kinds
    violations = {name: found for name, spec in specs if (found := _restricted_violations(spec))}
    assert not violations, violations


@pytest.mark.parametrize(
    "pod_spec",
    [
        {"containers": [{"name": "bare"}]},
        {
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "c", "securityContext": {"allowPrivilegeEscalation": False}}],
        },
        {
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "Unconfined"}},
            "containers": [
                {
                    "name": "c",
                    "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
                }
            ],
        },
        {"volumes": [{"name": "v", "hostPath": {"path": "/"}}], "containers": []},
        {"initContainers": [{"name": "root-init"}], "containers": []},
    ],
    ids=["bare pod", "capabilities kept", "unconfined seccomp", "hostPath volume", "bare init container"],
)
def test_restricted_rules_catch_a_pod_that_breaks_them(pod_spec):
    assert _restricted_violations(pod_spec)


def test_every_pod_pulls_our_image_with_the_registry_secret():
    registry = [{"name": "gaia-flows-registry"}]
    namespace = _yaml(DEPLOYMENTS / "kubernetes" / "namespace.yaml")
    launcher = _yaml(DEPLOYMENTS / "kubernetes" / "dagster.yaml")["run_launcher"]["config"]
    assert launcher["job_namespace"] == namespace["metadata"]["name"]
    assert launcher["image_pull_secrets"] == registry
    values = _yaml(HELM_VALUES)
    assert values["imagePullSecrets"] == registry
    assert values["dagster-user-deployments"]["imagePullSecrets"] == registry
    image = _yaml(PROFILES / "kubernetes.yaml")["kubernetes"]["image"]
    ours = [
        (name, spec)
        for name, spec in _pod_specs()
        if any(c.get("image") == image for c in spec.get("containers", []))
    ]
    assert {name for name, _ in ours} >= {"mlflow.yaml Deployment", "run Job (dagster-k8s) Job"}
    for name, spec in ours:
        assert spec.get("imagePullSecrets") == registry, name


def _camel(node):
    """The Kubernetes client's snake_case dict as the API's camelCase (what a manifest holds)."""
    if isinstance(node, dict):
        return {
            re.sub(r"_([a-z])", lambda m: m.group(1).upper(), k): _camel(v)
            for k, v in node.items()
            if v is not None
        }
    if isinstance(node, list):
        return [_camel(v) for v in node]
    return node


KUBERNETES_VERSION = "1.34.0"  # a current release; kubernetes-validate ships its OpenAPI schemas


def _run_job_manifest(run_k8s_config: dict | None = None, image_pull_secrets: list | None = None) -> dict:
    """The Job dagster-k8s builds for a run from deployments/kubernetes/dagster.yaml, or with the
    given ``run_k8s_config`` and pull secrets (what the Helm chart renders from its values)."""
    from dagster_k8s.job import DagsterK8sJobConfig, UserDefinedDagsterK8sConfig, construct_dagster_k8s_job

    launcher = _yaml(DEPLOYMENTS / "kubernetes" / "dagster.yaml")["run_launcher"]["config"]
    job_config = DagsterK8sJobConfig(
        job_image=_yaml(PROFILES / "kubernetes.yaml")["kubernetes"]["image"],
        dagster_home=launcher["dagster_home"],
        instance_config_map=launcher["instance_config_map"],
        postgres_password_secret=launcher["postgres_password_secret"],
        image_pull_secrets=image_pull_secrets or launcher["image_pull_secrets"],
        service_account_name=launcher["service_account_name"],
        env_config_maps=launcher["env_config_maps"],
        env_secrets=launcher["env_secrets"],
        env_vars=launcher["env_vars"],
    )
    job = construct_dagster_k8s_job(
        job_config,
        args=["dagster", "api", "execute_run", "{}"],
        job_name="dagster-run-test",
        pod_name="dagster-run-test",
        user_defined_k8s_config=UserDefinedDagsterK8sConfig.from_dict(
            run_k8s_config or launcher["run_k8s_config"]
        ),
        component="run_worker",
    ).to_dict()
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        **_camel({k: v for k, v in job.items() if k not in ("api_version", "kind")}),
    }


def _manifests() -> list[tuple[str, dict]]:
    found = [("run Job (dagster-k8s)", _run_job_manifest())]
    for path in sorted(
        [*(DEPLOYMENTS / "kubernetes").glob("*.yaml"), *(DEPLOYMENTS / "spark").glob("*.yaml")]
    ):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                found.append((path.name, doc))
    return found


def test_every_kubernetes_manifest_and_the_run_job_validate_against_a_current_kubernetes():
    import kubernetes_validate

    manifests = _manifests()
    assert {m["kind"] for _, m in manifests} >= {
        "ConfigMap",
        "Deployment",
        "Job",
        "Namespace",
        "PersistentVolumeClaim",
        "Pod",
        "Role",
        "RoleBinding",
        "Service",
        "StatefulSet",
    }
    for _, manifest in manifests:
        kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)
    bad = {**manifests[0][1], "spec": {**manifests[0][1]["spec"], "backoffLimitt": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSION, strict=True)
