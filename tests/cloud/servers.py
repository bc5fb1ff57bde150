"""Start and stop the loopback API servers the cloud tests and the benchmark talk to.

Each server is a real process on 127.0.0.1 - ``moto_server`` for EC2, ``openstack_fake.py``
for Keystone/Nova/Glance/Neutron, ``fault_proxy.py`` in front of moto - started here and
stopped by its PID. Fakes bind port 0 and publish the port they got in a file, so parallel
runs never race for a port; moto cannot, so it gets a port probed free just before start
(retried if that race is lost).
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from pathlib import Path

from support.servers import ServerError, ServerProcess, free_port

HERE = Path(__file__).resolve().parent
PYTHON = sys.executable
MOTO_SERVER = str(Path(sys.executable).with_name("moto_server"))


class FakeServer(ServerProcess):
    """A loopback fake or proxy with our ``/_fake/`` control endpoints."""

    # --- /_fake/ control (fakes and proxy only) -------------------------------------------
    def _admin(self, path: str, payload=None):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method="POST" if data is not None or path.endswith("reset") else "GET"
        )
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


def start_openstack_fake(log_dir: str | Path, user: str, password: str, **options) -> FakeServer:
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port_file = log_dir / "openstack.port"
    port_file.unlink(missing_ok=True)
    argv = [PYTHON, str(HERE / "openstack_fake.py"), "--port-file", str(port_file), "--user", user]
    for key, value in options.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    server = FakeServer("openstack-fake", argv, env={"FAKE_OS_PASSWORD": password}, log_dir=log_dir)
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


def start_fault_proxy(upstream: str, log_dir: str | Path) -> FakeServer:
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    port_file = log_dir / "proxy.port"
    port_file.unlink(missing_ok=True)
    argv = [PYTHON, str(HERE / "fault_proxy.py"), "--upstream", upstream, "--port-file", str(port_file)]
    server = FakeServer("fault-proxy", argv, log_dir=log_dir)
    return server.start(port_file=port_file, ready_path="/_fake/stats")


def moto_reset(moto: ServerProcess) -> None:
    """moto's own reset endpoint: every test starts from an empty account."""
    req = urllib.request.Request(moto.url + "/moto-api/reset", data=b"", method="POST")
    urllib.request.urlopen(req, timeout=10).close()
