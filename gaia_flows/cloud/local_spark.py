"""A real Spark standalone cluster on 127.0.0.1, started from the pip pyspark.

The local node driver and the tests both need genuine master and worker JVMs (not
``local[*]``), so scheduling, executor launch and shuffle go through the same code paths as
on cloud VMs. Everything binds to loopback: ``SPARK_LOCAL_IP=127.0.0.1`` and ``-h 127.0.0.1``,
the master's REST submission server is switched off, and ports are chosen by the OS (``0``)
and read back from the daemon's log, so parallel clusters never race for a port.

Daemons run in their own session so they outlive the process that started them (a cluster
is a Dagster asset that later runs use) and are stopped by PID, checked against the
process start time so a recycled PID is never killed by mistake.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from gaia_flows.cloud import prometheus

LOOPBACK = "127.0.0.1"
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"

_MASTER_URL_RE = re.compile(r"Starting Spark master at (spark://[\w.\-]+:\d+)")
_MASTER_UI_RE = re.compile(r"Successfully started service 'MasterUI' on port (\d+)")
_MASTER_ALIVE_RE = re.compile(r"New state: ALIVE")
_WORKER_RE = re.compile(r"Starting Spark worker [\w.\-]+:(\d+) with")
_WORKER_UI_RE = re.compile(r"Successfully started service 'WorkerUI' on port (\d+)")
_WORKER_REGISTERED_RE = re.compile(r"Successfully registered with master")

# Popen handles of daemons started by this process, so exits are reaped (no zombies) and a
# JVM that dies during start-up is reported with its exit code.
_POPENS: dict[int, subprocess.Popen] = {}


class LocalSparkError(RuntimeError):
    """A daemon did not come up (the message carries the tail of its log)."""


def spark_home() -> Path:
    """SPARK_HOME of the pip-installed pyspark, so no separate Spark download is needed."""
    try:
        from pyspark.find_spark_home import _find_spark_home

        return Path(_find_spark_home())
    except Exception:  # pragma: no cover - older pyspark layouts
        import pyspark

        return Path(os.path.dirname(pyspark.__file__))


def spark_class() -> Path:
    path = spark_home() / "bin" / "spark-class"
    if not path.exists():
        raise LocalSparkError(f"spark-class not found at {path}; is pyspark installed in this interpreter?")
    return path


def daemon_env(log_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "SPARK_HOME": str(spark_home()),
            "SPARK_LOCAL_IP": LOOPBACK,
            "SPARK_LOCAL_HOSTNAME": LOOPBACK,
            "SPARK_LOG_DIR": str(log_dir),
            "SPARK_DAEMON_MEMORY": env.get("SPARK_DAEMON_MEMORY", "512m"),
            # The master's REST submission server listens on 6066 by default: off, it is
            # not needed and would be a second, unauthenticated way in. Metrics as on VMs.
            "SPARK_MASTER_OPTS": f"-Dspark.master.rest.enabled=false {prometheus.daemon_java_options('master')}",
            "SPARK_WORKER_OPTS": prometheus.daemon_java_options("worker"),
            "PYSPARK_PYTHON": env.get("PYSPARK_PYTHON", sys.executable),
        }
    )
    env.update(extra or {})
    return env


@dataclass
class SparkDaemon:
    """One master or worker JVM; serialisable so a node driver can find it again later."""

    role: str
    pid: int
    create_time: float
    log_path: str
    master_url: str
    port: int = 0
    webui_port: int = 0
    cores: int = 0
    memory_mb: int = 0
    work_dir: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def webui_url(self) -> str:
        return f"http://{LOOPBACK}:{self.webui_port}"

    def alive(self) -> bool:
        return pid_alive(self.pid, self.create_time)

    def stop(self, timeout: float = 20.0) -> bool:
        return stop_pid(self.pid, self.create_time, timeout=timeout)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SparkDaemon:
        return cls(**data)


def pid_alive(pid: int, create_time: float | None = None) -> bool:
    """True if ``pid`` runs and is the very process we started (same start time)."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return create_time is None or abs(proc.create_time() - create_time) < 0.5
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def stop_pid(pid: int, create_time: float | None = None, timeout: float = 20.0) -> bool:
    """SIGTERM the daemon (and its process group: executors, Python workers), then SIGKILL.

    Returns True if something was stopped, False if it was already gone.
    """
    if not pid_alive(pid, create_time):
        _reap(pid)
        return False
    proc = psutil.Process(pid)
    group = None
    try:
        if os.getpgid(pid) == pid:  # started with start_new_session: the group is ours alone
            group = pid
    except ProcessLookupError:
        return False
    members = [proc, *proc.children(recursive=True)]
    try:
        if group is not None:
            os.killpg(group, signal.SIGTERM)
        else:
            proc.terminate()
    except (ProcessLookupError, psutil.NoSuchProcess):
        return True
    _, still = psutil.wait_procs(members, timeout=timeout)
    for p in still:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(still, timeout=5)
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    proc = _POPENS.pop(pid, None)
    if proc is not None:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - killed above
            pass


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_for(
    what: str,
    check: Callable[[], object],
    proc: subprocess.Popen | None,
    log_path: Path,
    timeout: float,
    interval: float = 0.1,
):
    """Poll ``check`` until it returns something truthy; fail fast if the JVM died."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if proc is not None and proc.poll() is not None:
            raise LocalSparkError(
                f"{what}: process exited with code {proc.returncode}; log {log_path}:\n{_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise LocalSparkError(
                f"{what}: not ready after {timeout:.0f}s; log {log_path}:\n{_tail(log_path)}"
            )
        time.sleep(interval)


def _grep(path: Path, pattern: re.Pattern):
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return None
    found = pattern.findall(text)
    return found[-1] if found else None


def _launch(main_class: str, args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [str(spark_class()), main_class, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(log_path.parent),
            start_new_session=True,  # outlive the starter; stoppable as one process group
            close_fds=True,
        )


def _create_time(pid: int) -> float:
    return psutil.Process(pid).create_time()


def start_master(
    log_dir: str | os.PathLike,
    *,
    port: int = 0,
    webui_port: int = 0,
    timeout: float = 90.0,
    name: str = "master",
) -> SparkDaemon:
    """Start a master and return once it is ALIVE, with the ports it actually bound."""
    log_dir = Path(log_dir)
    log_path = log_dir / f"{name}.log"
    proc = _launch(
        MASTER_CLASS,
        ["-h", LOOPBACK, "-p", str(port), "--webui-port", str(webui_port)],
        log_path,
        daemon_env(log_dir),
    )
    _POPENS[proc.pid] = proc
    try:
        created = _create_time(proc.pid)
        _wait_for("spark master", lambda: _grep(log_path, _MASTER_ALIVE_RE), proc, log_path, timeout)
        master_url = _grep(log_path, _MASTER_URL_RE)
        ui = _grep(log_path, _MASTER_UI_RE)
        if not master_url or not ui:
            raise LocalSparkError(
                f"spark master is ALIVE but its URL/UI port is not in {log_path}:\n{_tail(log_path)}"
            )
    except BaseException:
        stop_pid(proc.pid)
        raise
    return SparkDaemon(
        role="master",
        pid=proc.pid,
        create_time=created,
        log_path=str(log_path),
        master_url=master_url,
        port=int(master_url.rsplit(":", 1)[1]),
        webui_port=int(ui),
    )


def spawn_worker(
    master_url: str,
    log_dir: str | os.PathLike,
    *,
    cores: int = 1,
    memory_mb: int = 1024,
    name: str = "worker",
) -> SparkDaemon:
    """Launch a worker JVM and return at once; ``refresh()``/``registered()`` tell when it is up.

    Non-blocking so a driver can start eight workers in the time one JVM takes to boot.
    """
    log_dir = Path(log_dir)
    log_path = log_dir / f"{name}.log"
    work_dir = log_dir / f"{name}-work"  # executors' stdout/stderr and app jars; default is inside SPARK_HOME
    work_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "-h",
        LOOPBACK,
        "-p",
        "0",
        "--webui-port",
        "0",
        "-c",
        str(cores),
        "-m",
        f"{memory_mb}m",
        "-d",
        str(work_dir),
        master_url,
    ]
    proc = _launch(WORKER_CLASS, args, log_path, daemon_env(log_dir, {"SPARK_WORKER_DIR": str(work_dir)}))
    try:
        created = _create_time(proc.pid)
    except psutil.NoSuchProcess as exc:
        raise LocalSparkError(f"spark worker exited at once; log {log_path}:\n{_tail(log_path)}") from exc
    daemon = SparkDaemon(
        role="worker",
        pid=proc.pid,
        create_time=created,
        log_path=str(log_path),
        master_url=master_url,
        cores=cores,
        memory_mb=memory_mb,
        work_dir=str(work_dir),
    )
    _POPENS[proc.pid] = proc
    return daemon


def refresh(daemon: SparkDaemon) -> SparkDaemon:
    """Fill in the ports a worker bound, from its log."""
    log_path = Path(daemon.log_path)
    if daemon.role == "worker":
        if not daemon.port:
            port = _grep(log_path, _WORKER_RE)
            daemon.port = int(port) if port else 0
        if not daemon.webui_port:
            ui = _grep(log_path, _WORKER_UI_RE)
            daemon.webui_port = int(ui) if ui else 0
    return daemon


def registered(daemon: SparkDaemon) -> bool:
    return daemon.role == "master" or worker_registered(daemon.log_path)


def start_worker(
    master_url: str,
    log_dir: str | os.PathLike,
    *,
    cores: int = 1,
    memory_mb: int = 1024,
    name: str = "worker",
    timeout: float = 90.0,
    wait_registered: bool = True,
) -> SparkDaemon:
    """Start a worker against ``master_url``; by default return once the master lists it."""
    daemon = spawn_worker(master_url, log_dir, cores=cores, memory_mb=memory_mb, name=name)
    proc = _POPENS.get(daemon.pid)
    log_path = Path(daemon.log_path)
    try:
        _wait_for("spark worker", lambda: refresh(daemon).port, proc, log_path, timeout)
        if wait_registered:
            _wait_for("spark worker registration", lambda: registered(daemon), proc, log_path, timeout)
            refresh(daemon)
    except BaseException:
        stop_pid(daemon.pid)
        raise
    return daemon


def worker_registered(log_path: str | os.PathLike) -> bool:
    return _grep(Path(log_path), _WORKER_REGISTERED_RE) is not None


def master_status(webui_port: int, timeout: float = 5.0) -> dict:
    """The master's own view (``/json/``): workers, their state, cores and memory."""
    with urllib.request.urlopen(f"http://{LOOPBACK}:{webui_port}/json/", timeout=timeout) as response:
        return json.loads(response.read().decode())


def alive_worker_ports(webui_port: int) -> set[int]:
    try:
        status = master_status(webui_port)
    except OSError:
        return set()
    return {int(w["port"]) for w in status.get("workers", []) if w.get("state") == "ALIVE"}


def wait_for_workers(webui_port: int, ports: set[int] | int, timeout: float = 90.0) -> dict:
    """Block until the master lists the given worker ports (or that many workers) as ALIVE."""

    def ready():
        alive = alive_worker_ports(webui_port)
        if isinstance(ports, int):
            return len(alive) >= ports
        return set(ports) <= alive

    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise LocalSparkError(
                f"master on UI port {webui_port}: workers {ports} not ALIVE after {timeout:.0f}s"
            )
        time.sleep(0.2)
    return master_status(webui_port)


class LocalSparkCluster:
    """A master plus ``workers`` workers on 127.0.0.1, as a context manager.

    >>> with LocalSparkCluster(workers=2, cores=1, memory_mb=1024) as cluster:
    ...     spark = gaia_flows.spark.session(cluster.master_url)

    ``log_dir`` defaults to a fresh temporary folder; every daemon logs there, so a failed
    test can point at the exact JVM log.
    """

    def __init__(
        self,
        workers: int = 2,
        cores: int = 1,
        memory_mb: int = 1024,
        log_dir: str | os.PathLike | None = None,
        timeout: float = 120.0,
    ):
        if workers < 0:
            raise ValueError("workers must be >= 0")
        self.n_workers = workers
        self.cores = cores
        self.memory_mb = memory_mb
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="gaia-spark-"))
        self.timeout = timeout
        self.master: SparkDaemon | None = None
        self.workers: list[SparkDaemon] = []

    @property
    def master_url(self) -> str:
        if self.master is None:
            raise LocalSparkError("cluster not started")
        return self.master.master_url

    @property
    def webui_url(self) -> str:
        if self.master is None:
            raise LocalSparkError("cluster not started")
        return self.master.webui_url

    @property
    def pids(self) -> list[int]:
        return [d.pid for d in ([self.master] if self.master else []) + self.workers]

    def start(self) -> LocalSparkCluster:
        try:
            self.master = start_master(self.log_dir, timeout=self.timeout)
            # JVM start-up dominates, so workers start concurrently and we wait once.
            with ThreadPoolExecutor(max_workers=max(1, self.n_workers)) as pool:
                futures = [
                    pool.submit(
                        start_worker,
                        self.master_url,
                        self.log_dir,
                        cores=self.cores,
                        memory_mb=self.memory_mb,
                        name=f"worker-{i}",
                        timeout=self.timeout,
                        wait_registered=False,
                    )
                    for i in range(self.n_workers)
                ]
                errors = []
                for future in futures:
                    try:
                        self.workers.append(future.result())
                    except Exception as exc:  # keep collecting so every started JVM is stopped
                        errors.append(exc)
                if errors:
                    raise errors[0]
            wait_for_workers(self.master.webui_port, {w.port for w in self.workers}, timeout=self.timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self) -> SparkDaemon:
        worker = start_worker(
            self.master_url,
            self.log_dir,
            cores=self.cores,
            memory_mb=self.memory_mb,
            name=f"worker-{len(self.workers)}",
            timeout=self.timeout,
        )
        self.workers.append(worker)
        return worker

    def status(self) -> dict:
        if self.master is None:
            raise LocalSparkError("cluster not started")
        return master_status(self.master.webui_port)

    def stop(self) -> None:
        for worker in reversed(self.workers):
            worker.stop()
        self.workers = []
        if self.master is not None:
            self.master.stop()
            self.master = None

    def __enter__(self) -> LocalSparkCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
