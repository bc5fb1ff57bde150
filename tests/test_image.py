"""The container image (deployments/Dockerfile), built here with podman (``make image``) and run
the ways the Helm chart runs it: ``dagster asset materialize`` inside the container on a state
folder mounted from the host, and ``dagster api grpc`` in a container serving a webserver on
the host over gRPC. Containers use ``--network none`` or the host's loopback only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from dagster import materialize
from support.gaia_files import region_file_range, stars_in_region, write_gaia_file
from support.servers import ServerProcess, free_port
from support.spark import TEST_SPARK_CONF

from gaia_flows import definitions
from gaia_flows.assets.catalogue import gaia_landing, gaia_source
from gaia_flows.layout import REPO_ROOT, StateLayout
from gaia_flows.resources.spark import SparkResource
from gaia_flows.resources.storage import StorageResource

pytestmark = pytest.mark.image

IMAGE = "localhost/gaia-flows:test"
CONTAINER_UID = 10001  # the Dockerfile's USER
REGION = "hpx1-07"
BIN = Path(sys.executable).parent
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(REPO_ROOT / "deployments/podman/containers.conf")}


def _podman(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["podman", *args], env=PODMAN_ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


@pytest.fixture(scope="module")
def image():
    """``make image``'s build (layers and the debootstrap base are cached per machine)."""
    if os.geteuid() != 0 or not (shutil.which("podman") and shutil.which("debootstrap")):
        pytest.skip("needs root with podman and debootstrap (.ci/run installs them)")
    started = time.monotonic()
    build = subprocess.run(
        [str(REPO_ROOT / "deployments/podman/build-image.sh"), IMAGE],
        env=PODMAN_ENV,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    print(f"image build: {time.monotonic() - started:.0f} s")
    return IMAGE


def test_image_runs_as_a_non_root_user_with_the_pinned_stack_and_no_secret(image):
    inspect = json.loads(_podman("image", "inspect", image).stdout)[0]
    assert inspect["Config"]["User"].split(":")[0] not in {"", "0", "root"}
    env = dict(e.split("=", 1) for e in inspect["Config"]["Env"])
    assert not [
        k for k in env if any(word in k.upper() for word in ("PASSWORD", "SECRET", "TOKEN", "ACCESS_KEY"))
    ]
    frozen = _podman(
        "run", "--rm", "--network", "none", image, "uv", "pip", "freeze", "--python", "/opt/venv/bin/python"
    ).stdout
    pins = dict(
        line.split("==", 1)
        for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    installed = dict(line.split("==", 1) for line in frozen.splitlines() if "==" in line)
    assert installed, frozen
    seeds = {"pip", "setuptools"}  # what `python3 -m venv` puts in every virtualenv, not the project's stack
    differing = {
        name: (version, pins[name])
        for name, version in installed.items()
        if name in pins and name not in seeds and pins[name] != version
    }
    assert not differing, differing
    assert installed["dagster"] == pins["dagster"] and installed["pyspark"] == pins["pyspark"]


def _land(landing: Path) -> None:
    lo, hi = region_file_range(REGION)
    write_gaia_file(landing, lo, hi, stars_in_region(REGION, 800, seed=19))


def test_asset_materialize_inside_the_container_equals_a_host_run(image, _spark_application):
    state = Path(tempfile.mkdtemp(prefix="gaia-image-state-"))
    try:
        layout = StateLayout.from_env(state).ensure()
        _land(layout.landing)
        shutil.copy(REPO_ROOT / "deployments/local/dagster.yaml", layout.dagster_home / "dagster.yaml")
        host = StateLayout.from_env(state.with_name(state.name + "-host"), layout.landing).ensure()
        for path in [state, *state.rglob("*")]:
            os.chown(path, CONTAINER_UID, CONTAINER_UID, follow_symlinks=False)
        run = _podman(
            "run",
            "--rm",
            "--network",
            "none",
            "-v",
            f"{state}:/var/lib/gaia-flows",
            image,
            "dagster",
            "asset",
            "materialize",
            "-m",
            "gaia_flows.definitions",
            "--select",
            "gaia_source",
            "--partition",
            REGION,
            timeout=900,
            check=False,
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "RUN_SUCCESS" in run.stdout + run.stderr

        on_host = materialize(
            [gaia_landing, gaia_source],
            selection=[gaia_source.key],
            partition_key=REGION,
            resources={
                "spark": SparkResource(master="local[2]", spark_config=TEST_SPARK_CONF),
                "storage": StorageResource(home=str(host.home), landing=str(host.landing)),
            },
        )
        assert on_host.success
        in_container = pq.read_table(layout.region_dir("gaia_source", REGION)).sort_by("source_id")
        assert in_container.num_rows == 800
        assert in_container.equals(pq.read_table(host.region_dir("gaia_source", REGION)).sort_by("source_id"))
        assert {p.stat().st_uid for p in layout.region_files("gaia_source", REGION)} == {CONTAINER_UID}, (
            "written by the image's user"
        )
    finally:
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(state.with_name(state.name + "-host"), ignore_errors=True)


def _graphql(url: str, query: str) -> dict:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_code_server_in_a_container_serves_the_webserver_over_grpc(image, tmp_path):
    """The Helm chart's topology without Kubernetes: the user-code deployment (the image's
    default CMD, on the host's loopback) and dagster-webserver loading it through a workspace
    file that names only a gRPC host and port."""
    port = free_port()
    name = f"gaia-flows-grpc-{uuid.uuid4().hex[:8]}"
    _podman(
        "run",
        "-d",
        "--rm",
        "--name",
        name,
        "--network",
        "host",
        image,
        "dagster",
        "api",
        "grpc",
        "-m",
        "gaia_flows.definitions",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    )
    webserver = None
    try:
        deadline = time.monotonic() + 300
        while (
            subprocess.run(
                [str(BIN / "dagster"), "api", "grpc-health-check", "-p", str(port)], capture_output=True
            ).returncode
            != 0
        ):
            state = _podman("inspect", "-f", "{{.State.Running}}", name, check=False).stdout.strip()
            assert state == "true", _podman("logs", name, check=False).stderr[-3000:]
            assert time.monotonic() < deadline, "code server not serving"
            time.sleep(1)
        workspace = tmp_path / "workspace.yaml"
        workspace.write_text(
            f"load_from:\n  - grpc_server:\n      host: 127.0.0.1\n      port: {port}\n      location_name: gaia_flows\n"
        )
        (tmp_path / "dagster").mkdir()
        web_port = free_port()
        webserver = ServerProcess(
            "webserver",
            [str(BIN / "dagster-webserver"), "-w", str(workspace), "-h", "127.0.0.1", "-p", str(web_port)],
            env={"DAGSTER_HOME": str(tmp_path / "dagster")},
            log_dir=tmp_path,
        ).start(port=web_port, ready_path="/server_info", timeout=180)
        answer = _graphql(
            webserver.url,
            "{ workspaceOrError { ... on Workspace { locationEntries { name "
            "locationOrLoadError { __typename } } } } assetNodes { assetKey { path } } }",
        )
        (entry,) = answer["data"]["workspaceOrError"]["locationEntries"]
        assert (
            entry["name"] == "gaia_flows"
            and entry["locationOrLoadError"]["__typename"] == "RepositoryLocation"
        ), entry
        served = {"/".join(node["assetKey"]["path"]) for node in answer["data"]["assetNodes"]}
        expected = {"/".join(key.path) for key in definitions.defs.resolve_asset_graph().get_all_asset_keys()}
        assert "gaia_source" in served and served == expected
    finally:
        if webserver is not None:
            webserver.stop()
        _podman("rm", "-f", "-t", "5", name, check=False)
