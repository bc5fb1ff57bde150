"""Real server processes for tests and benchmarks: started on 127.0.0.1, awaited until they
answer HTTP, stopped by PID (with their children) whatever the outcome."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil


class ServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A child process serving HTTP on 127.0.0.1; ``stop()`` kills exactly this PID."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        env: dict | None = None,
        log_dir: str | Path | None = None,
        cwd: str | Path | None = None,
    ):
        self.name = name
        self.cwd = cwd
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

    def launch(self) -> ServerProcess:
        """Start the process without waiting for it to serve (a daemon serves no HTTP)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.cwd,
            )
        return self

    def start(
        self,
        port_file: Path | None = None,
        port: int | None = None,
        ready_path: str = "/",
        timeout: float = 60.0,
    ) -> ServerProcess:
        self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(
                    f"{self.name} exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}"
                )
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
