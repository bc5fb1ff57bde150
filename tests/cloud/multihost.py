"""Test support: separate network hosts on one machine, and a test hypervisor that boots the
servers an emulated cloud runs as such hosts.

A :class:`Lab` is a bridge in its own "switch" network namespace plus one namespace per host,
each joined to the bridge by a veth pair and given one address of a private test range. Those
addresses exist only inside the namespaces the lab creates, and every name starts with
``gfmh-`` so a leak check (and a person) can find them. Nothing here touches the machine's own
network namespace beyond creating and deleting namespaces.

The :class:`Hypervisor` watches the cloud emulator (the OpenStack fake, moto) like a compute
host would: every server the cloud reports running becomes a lab host with the private address
the cloud reports, its security group becomes nftables rules inside the host, and the *start*
part of its rendered user data runs there - on software already installed on this machine,
which is exactly the contract of a baked node image: the worktree's virtualenv is bind-mounted
at the image's stack path (``/opt/gaia-flows/venv``) in the host's own mount namespace, and the
cluster's shared directory at the profile's mount path. ``/tmp`` is hidden on nodes, so a path
that exists only on the orchestrator fails loudly there. A server the cloud no longer lists is
powered off: its processes are killed and its namespace removed.

Root only (CI runs as root); tests skip otherwise.
"""

from __future__ import annotations

import base64
import ctypes
import ipaddress
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

import gaia_flows

PREFIX = "gfmh-"
NETNS_RUN = Path("/run/netns")
CLONE_NEWNET = 0x40000000
NODE_ROOT = "/opt/gaia-flows"  # the node image's prefix: stack, configuration, start script
NODE_VENV = f"{NODE_ROOT}/venv"
VENV = Path(sys.executable).parent.parent
# The image installs gaia-flows into its venv; the test's venv holds it as an editable install,
# so its source folder is part of the "image" and stays visible on a node even under ``hide``.
PACKAGE = Path(gaia_flows.__file__).parent
_libc = ctypes.CDLL(None, use_errno=True)


class LabError(RuntimeError):
    pass


def run(*argv: str, check: bool = True, input: str | None = None) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, input=input)
    if check and proc.returncode != 0:
        raise LabError(f"{shlex.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def lab_namespaces() -> list[str]:
    """Every namespace of any lab (the leak check's view)."""
    return sorted(
        line.split()[0] for line in run("ip", "netns", "list").splitlines() if line.startswith(PREFIX)
    )


def netns_pids(namespace: str) -> list[int]:
    return [int(p) for p in run("ip", "netns", "pids", namespace, check=False).split()]


class InNamespace:
    """Calls run on one thread that has entered a network namespace (``setns`` is per thread),
    so the test reaches an emulator listening on that namespace's loopback."""

    def __init__(self, namespace: str):
        self.pool = ThreadPoolExecutor(
            max_workers=1, initializer=self._enter, initargs=(NETNS_RUN / namespace,)
        )

    @staticmethod
    def _enter(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"setns({path}): {os.strerror(errno)}")
        finally:
            os.close(fd)

    def __call__(self, fn: Callable, *args, **kwargs):
        return self.pool.submit(fn, *args, **kwargs).result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


@dataclass
class Host:
    name: str
    namespace: str
    address: str
    port: str  # the veth end on the bridge, in the switch namespace
    processes: list[subprocess.Popen] = field(default_factory=list)


class Lab:
    """A bridge and hosts on ``network``; :meth:`close` removes every namespace and process."""

    def __init__(self, network: str):
        self.network = ipaddress.ip_network(network)
        self.tag = uuid.uuid4().hex[:6]
        self.switch = f"{PREFIX}{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        self._ports = 0
        self._lock = threading.Lock()

    def start(self) -> Lab:
        run("ip", "netns", "add", self.switch)
        run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", self.switch, "link", "set", "br0", "up")
        return self

    def add_host(self, name: str, address: str) -> Host:
        if ipaddress.ip_address(address) not in self.network:
            raise LabError(f"{address} is outside the lab's network {self.network}")
        with self._lock:
            if name in self.hosts:
                raise LabError(f"host {name} exists")
            self._ports += 1
            host = Host(name, f"{PREFIX}{self.tag}-{name}"[:60], address, f"p{self._ports}")
            self.hosts[name] = host
        ns = host.namespace
        run("ip", "netns", "add", ns)
        run(
            "ip",
            "link",
            "add",
            host.port,
            "netns",
            self.switch,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns,
        )
        run("ip", "-n", self.switch, "link", "set", host.port, "master", "br0", "up")
        run("ip", "-n", ns, "addr", "add", f"{address}/{self.network.prefixlen}", "dev", "eth0")
        run("ip", "-n", ns, "link", "set", "eth0", "up")
        run("ip", "-n", ns, "link", "set", "lo", "up")
        return host

    def cut(self, name: str) -> None:
        """Pull the host's cable: its port on the bridge goes down."""
        run("ip", "-n", self.switch, "link", "set", self.hosts[name].port, "down")

    def mend(self, name: str) -> None:
        """Plug the host's cable back in."""
        run("ip", "-n", self.switch, "link", "set", self.hosts[name].port, "up")

    def spawn(self, name: str, script: str, log: Path, env: dict | None = None) -> subprocess.Popen:
        """Run a bash script in the host's network namespace and a private mount namespace
        (``ip netns exec`` makes one). The script goes through stdin, so nothing it carries
        (a secret) shows in the process list."""
        host = self.hosts[name]
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", host.namespace, "bash", "-s"],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        proc.stdin.write(script.encode())
        proc.stdin.close()
        host.processes.append(proc)
        return proc

    def remove_host(self, name: str) -> None:
        """Kill the host's processes and delete its namespace; it stays in ``hosts`` until both
        are done, so a caller that sees it gone can rely on that."""
        host = self.hosts.get(name)
        if host is None:
            return
        self._kill(host)
        run("ip", "netns", "del", host.namespace, check=False)
        with self._lock:
            self.hosts.pop(name, None)

    def _kill(self, host: Host) -> None:
        # Everything in the namespace is ours: the daemons, their executors, Python workers.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = netns_pids(host.namespace)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 10
            while netns_pids(host.namespace) and time.monotonic() < deadline:
                time.sleep(0.1)
        for proc in host.processes:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        for name in list(self.hosts):
            self.remove_host(name)
        run("ip", "netns", "del", self.switch, check=False)


# --- security groups as nftables rules ----------------------------------------------------


def nft_ruleset(rules: list[dict], members: list[str]) -> str:
    """An nftables input chain admitting exactly what the group's ingress rules allow.

    ``rules``: ``{protocol, from, to, source}`` where ``source`` is a CIDR or ``"group"`` (the
    group's own members, i.e. ``members``' addresses). Replies to connections the host opened
    itself are accepted, loopback too; everything else is dropped.
    """
    lines = [
        "table inet gaia_sg {",
        "  chain input {",
        "    type filter hook input priority 0; policy drop;",
        "    iif lo accept",
        "    ct state established,related accept",
    ]
    group = ", ".join(members) if members else None
    for r in rules:
        ports = f"{r['from']}-{r['to']}" if r["from"] != r["to"] else str(r["from"])
        if r["source"] == "group":
            if group is None:
                continue
            source = f"{{ {group} }}"
        else:
            source = r["source"]
        lines.append(f"    ip saddr {source} {r['protocol']} dport {ports} accept")
    lines += ["  }", "}"]
    return "\n".join(lines) + "\n"


# --- booting a server from its user data -----------------------------------------------------


def start_part(user_data: str) -> tuple[list[dict], str]:
    """(files under the node prefix, ExecStart of the Spark unit) from rendered cloud-config.

    The install part (``gaia-node-install``) and the share mount are what the image and
    cloud-init provide; a simulated host has both already, so only these run.
    """
    config = yaml.safe_load(user_data)
    files = [f for f in config.get("write_files", []) if f["path"].startswith(f"{NODE_ROOT}/")]
    (unit,) = [f for f in config.get("write_files", []) if f["path"].endswith("gaia-spark.service")]
    (exec_start,) = [
        line.split("=", 1)[1] for line in unit["content"].splitlines() if line.startswith("ExecStart=")
    ]
    return files, exec_start


POWEROFF_MARK = "poweroff"  # what a node's `systemctl poweroff` leaves in its work directory


def deadman_lines(every: float) -> list[str]:
    """The dead-man switch's timer on a node, every ``every`` seconds instead of a minute: the
    rendered ``gaia-deadman`` runs with ``systemctl`` and ``logger`` of the simulated host, whose
    ``poweroff`` leaves :data:`POWEROFF_MARK` for the hypervisor (a guest's power-off is
    something the hypervisor sees, not the guest) and whose log lines go to the node's log."""
    shims = f"{NODE_ROOT}/sim-bin"
    tools = {
        "systemctl": f'#!/bin/sh\n[ "$1" = poweroff ] && touch {NODE_ROOT}/work/{POWEROFF_MARK} && exec sleep infinity\n',
        "logger": '#!/bin/sh\nshift 2\necho "$(date -u +%FT%TZ) gaia-deadman: $*"\n',
    }
    lines = [f"mkdir -p {shims}"]
    for name, body in tools.items():
        data = base64.b64encode(body.encode()).decode()
        lines += [f"echo {data} | base64 -d > {shims}/{name}", f"chmod 0755 {shims}/{name}"]
    every_s = f"{every:g}"
    loop = f"PATH={shims}:$PATH {NODE_ROOT}/bin/gaia-deadman || true"
    return [*lines, f"( while sleep {every_s}; do {loop}; done ) &"]


def boot_script(
    user_data: str,
    *,
    mount: str,
    shared: Path,
    secret: str | None,
    work: Path,
    hide: str = "/tmp",
    deadman_every: float | None = None,
) -> str:
    """The host's boot: its own /opt with the image's stack, the share, the start part of its
    user data (with ``deadman_every``, its dead-man switch too). ``work`` (the Spark work
    directory: executor logs) is kept on the test's disk so a failing test can show it."""
    files, exec_start = start_part(user_data)
    work.mkdir(parents=True, exist_ok=True)
    lines = [
        "set -euo pipefail",
        "mount -t tmpfs -o mode=0755 gaia-node /opt",  # the node's own disk under /opt
        f"mkdir -p {NODE_VENV}",
        f"mount --bind {shlex.quote(str(VENV))} {NODE_VENV}",
        f"mount -t tmpfs -o mode=0755 gaia-mnt {shlex.quote(str(Path(mount).parent))}",
        f"mkdir -p {shlex.quote(mount)}",
        f"mount --bind {shlex.quote(str(shared))} {shlex.quote(mount)}",
        f"mkdir -p {NODE_ROOT}/work",
        f"mount --bind {shlex.quote(str(work))} {NODE_ROOT}/work",
    ]
    for f in files:
        path = shlex.quote(f["path"])
        data = base64.b64encode(f["content"].encode()).decode()
        lines += [
            f"mkdir -p $(dirname {path})",
            f"echo {data} | base64 -d > {path}",
            f"chmod {f.get('permissions', '0644')} {path}",
        ]
    if secret is not None:
        # What the cloud's secret store hands the node (deployments/README.md).
        lines += ["umask 077", f"printf %s {shlex.quote(secret)} > {NODE_ROOT}/etc/spark-secret", "umask 022"]
    lines += [f"mount -t tmpfs gaia-hide {shlex.quote(hide)}"]
    if PACKAGE.is_relative_to(hide):
        lines[2:2] = [
            f"mkdir -p {NODE_ROOT}/package",
            f"mount --bind {shlex.quote(str(PACKAGE))} {NODE_ROOT}/package",
        ]
        lines += [
            f"mkdir -p {shlex.quote(str(PACKAGE))}",
            f"mount --bind {NODE_ROOT}/package {shlex.quote(str(PACKAGE))}",
        ]
    if deadman_every is not None:
        lines += deadman_lines(deadman_every)
    lines.append(f"exec {exec_start}")
    return "\n".join(lines) + "\n"


@dataclass
class Server:
    """A server as the cloud reports it."""

    id: str
    name: str
    running: bool
    address: str | None
    user_data: str
    group: str | None


class Hypervisor:
    """Boots the cloud's running servers as lab hosts, and powers off the ones it deleted.

    ``servers()`` lists what the cloud holds; ``group_rules(name)`` gives a security group's
    ingress rules (``{protocol, from, to, source}``) as the cloud stores them; ``secret()``
    is what the cloud's secret store would hand a node (None: no secret). With
    ``deadman_every``, every node runs its dead-man switch that often, and a node that powers
    itself off is reported to the cloud through ``guest_shutdown(server_id)`` (the cloud then
    keeps it stopped or ends it, as its own rules say) and removed from the lab.
    """

    def __init__(
        self,
        lab: Lab,
        servers: Callable[[], list[Server]],
        group_rules: Callable[[str], list[dict]],
        *,
        mount: str,
        shared: Path,
        secret: Callable[[], str | None],
        log_dir: Path,
        interval: float = 0.2,
        deadman_every: float | None = None,
        guest_shutdown: Callable[[str], None] | None = None,
    ):
        self.lab = lab
        self.servers = servers
        self.group_rules = group_rules
        self.mount = mount
        self.shared = shared
        self.secret = secret
        self.log_dir = log_dir
        self.interval = interval
        self.deadman_every = deadman_every
        self.guest_shutdown = guest_shutdown
        self.booted: dict[str, Server] = {}
        self.errors: list[str] = []
        self._applied: frozenset[str] = frozenset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hypervisor", daemon=True)

    def start(self) -> Hypervisor:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        for server_id in list(self.booted):
            self._power_off(server_id)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as exc:  # reported by the test, which checks errors
                self.errors.append(f"{type(exc).__name__}: {exc}")
            self._stop.wait(self.interval)

    def poll(self) -> None:
        listed = {s.id: s for s in self.servers()}
        for server in list(self.booted.values()):
            if self._work(server).joinpath(POWEROFF_MARK).exists():
                if self.guest_shutdown is None:
                    raise LabError(f"{server.name} powered itself off, but this cloud has no guest_shutdown")
                # A guest may power off while the cloud deletes it (teardown removes the lease):
                # only a server the cloud still runs changes state.
                if server.id in listed and listed[server.id].running:
                    self.guest_shutdown(server.id)
                self._power_off(server.id)
        listed = {s.id: s for s in self.servers()}
        for server_id in [i for i in self.booted if i not in listed or not listed[i].running]:
            self._power_off(server_id)
        for server in listed.values():
            if server.running and server.address and server.id not in self.booted:
                self._boot(server)
        if frozenset(self.booted) != self._applied:
            self._apply_groups()

    def _work(self, server: Server) -> Path:
        return self.log_dir / f"{server.name}-work"

    def _boot(self, server: Server) -> None:
        self._work(server).joinpath(POWEROFF_MARK).unlink(missing_ok=True)  # a replacement's fresh disk
        self.lab.add_host(server.name, server.address)
        self.booted[server.id] = server
        self._apply_groups()
        script = boot_script(
            server.user_data,
            mount=self.mount,
            shared=self.shared,
            secret=self.secret(),
            work=self._work(server),
            deadman_every=self.deadman_every,
        )
        self.lab.spawn(server.name, script, self.log_dir / f"{server.name}.log")

    def _power_off(self, server_id: str) -> None:
        server = self.booted.pop(server_id)
        self.lab.remove_host(server.name)

    def _apply_groups(self) -> None:
        """Each host's firewall from its group's rules now: membership changes as hosts come and go."""
        self._applied = frozenset(self.booted)
        by_group: dict[str, list[Server]] = {}
        for server in self.booted.values():
            by_group.setdefault(server.group, []).append(server)
        for group, members in by_group.items():
            rules = self.group_rules(group) if group else []
            if not rules and not self._still_running(members):
                continue  # deleted with its servers (teardown): the next poll powers them off
            if not rules:
                raise LabError(
                    f"security group {group!r} has no rules in the cloud: its hosts would accept nothing"
                )
            ruleset = nft_ruleset(rules, sorted(s.address for s in members))
            for server in members:
                namespace = self.lab.hosts[server.name].namespace
                run("ip", "netns", "exec", namespace, "nft", "-f", "-", input=f"flush ruleset\n{ruleset}")

    def _still_running(self, members: list[Server]) -> bool:
        running = {s.id for s in self.servers() if s.running}
        return any(server.id in running for server in members)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""
