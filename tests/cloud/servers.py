"""Start and stop the loopback API servers the cloud tests and the benchmark talk to.

Each server is a real process on 127.0.0.1 - ``moto_server`` for EC2, ``openstack_fake.py``
for Keystone/Nova/Glance/Neutron, ``fault_proxy.py`` in front of moto - started here and
stopped by its PID. Fakes bind port 0 and publish the port they got in a file, so parallel
runs never race for a port; moto cannot, so it gets a port probed free just before start
(retried if that race is lost).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
MOTO_SERVER = str(Path(sys.executable).with_name("moto_server"))


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A child process serving HTTP on 127.0.0.1; ``stop()`` kills exactly this PID."""

    def __init__(self, name: str, argv: list[str], env: dict | None = None, log_dir: str | Path | None = None):
        self.name = name
        self.argv = argv
        self.env = {**os.environ, **(env or {})}
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix=f"gaia-{name}-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, port_file: Path | None = None, port: int | None = None, ready_path: str = "/", timeout: float = 60.0) -> "ServerProcess":
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            if port is None and port_file is not None and port_file.exists():
                self.port = int(port_file.read_text())
            elif port is not None:
                self.port = port
            if self.port and self._answers(ready_path):
                return self
            time.sleep(0.05)
        self.stop()
        raise ServerError(f"{self.name} not answering after {timeout}s: {self.log_path.read_text()[-2000:]}")

    def _answers(self, path: str) -> bool:
        try:
            urllib.request.urlopen(self.url + path, timeout=2).close()
            return True
        except urllib.error.HTTPError:
            return True  # any HTTP answer means it is serving
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            proc = psutil.Process(self.proc.pid)
            children = proc.children(recursive=True)
            proc.terminate()
            _, alive = psutil.wait_procs([proc, *children], timeout=10)
            for p in alive:
                p.kill()
        except psutil.NoSuchProcess:
            pass
        self.proc.wait(timeout=10)

    # --- /_fake/ control (fakes and proxy only) -------------------------------------------
    def _admin(self, path: str, payload=None):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None or path.endswith("reset") else "GET")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def set_faults(self, rules: list[dict]) -> None:
        self._admin("/_fake/faults", rules)

    def clear_faults(self) -> None:
        self._admin("/_fake/faults", [])

    def stats(self) -> dict:
        return self._admin("/_fake/stats")

    def state(self) -> dict:
        return self._admin("/_fake/state")

    def reset(self) -> None:
        self._admin("/_fake/reset")


def start_openstack_fake(log_dir: str | Path, user: str, password: str, **options) -> ServerProcess:
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port_file = log_dir / "openstack.port"
    port_file.unlink(missing_ok=True)
    argv = [PYTHON, str(HERE / "openstack_fake.py"), "--port-file", str(port_file), "--user", user]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    server = ServerProcess("openstack-fake", argv, env={"FAKE_OS_PASSWORD": password}, log_dir=log_dir)
    return server.start(port_file=port_file, ready_path="/identity/v3")


def start_moto(log_dir: str | Path, attempts: int = 3) -> ServerProcess:
    last: Exception | None = None
    for _ in range(attempts):
        port = free_port()
        server = ServerProcess("moto", [MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)], log_dir=log_dir)
        try:
            return server.start(port=port, ready_path="/moto-api/")
        except ServerError as exc:  # lost the port race: try another
            last = exc
    raise ServerError(f"moto_server did not start: {last}")


def start_fault_proxy(upstream: str, log_dir: str | Path) -> ServerProcess:
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port_file = log_dir / "proxy.port"
    port_file.unlink(missing_ok=True)
    argv = [PYTHON, str(HERE / "fault_proxy.py"), "--upstream", upstream, "--port-file", str(port_file)]
    server = ServerProcess("fault-proxy", argv, log_dir=log_dir)
    return server.start(port_file=port_file, ready_path="/_fake/stats")


def moto_reset(moto: ServerProcess) -> None:
    """moto's own reset endpoint: every test starts from an empty account."""
    req = urllib.request.Request(moto.url + "/moto-api/reset", data=b"", method="POST")
    urllib.request.urlopen(req, timeout=10).close()
