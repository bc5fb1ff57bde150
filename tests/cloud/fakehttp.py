"""Shared plumbing for the loopback fakes: a threaded HTTP server with fault injection.

A fake runs as its own process (started by ``servers.py``, stopped by PID) and is steered
over HTTP through ``/_fake/*``: ``POST /_fake/faults`` installs rules, ``GET /_fake/stats``
returns request counts, ``POST /_fake/reset`` clears both. A rule matches a request key
(``"POST /servers"`` or an EC2 ``Action``) by substring and fires after ``after`` matching
requests for ``times`` requests (-1 = forever):

    {"match": "POST /servers", "kind": "quota", "after": 2, "times": -1}
    {"match": "RunInstances", "kind": "error", "status": 500, "times": 2}
    {"match": "GET /servers/detail", "kind": "throttle", "times": 3}
    {"match": "POST /servers", "kind": "slow", "delay_s": 2.0, "times": 1}

``slow`` delays and then serves the request normally, like a cloud that is late to answer
but still does the work - the case where a client timeout must not produce a duplicate.
This module is imported by the fake scripts (run as files) and must stay stdlib-only.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_ID_RE = re.compile(
    r"/(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}|\d+)(?=/|$)"
)


def normalise(path: str) -> str:
    """``/compute/v2.1/<project>/servers/<uuid>`` -> ``/compute/v2.1/{id}/servers/{id}`` for stats."""
    return _ID_RE.sub("/{id}", urlsplit(path).path)


class Faults:
    def __init__(self):
        self.lock = threading.Lock()
        self.rules: list[dict] = []
        self.seen: Counter[int] = Counter()
        self.fired: Counter[str] = Counter()

    def set(self, rules: list[dict]) -> None:
        with self.lock:
            self.rules = [dict(r) for r in rules]
            self.seen = Counter()

    def clear(self) -> None:
        self.set([])
        with self.lock:
            self.fired = Counter()

    def check(self, key: str) -> dict | None:
        with self.lock:
            for i, rule in enumerate(self.rules):
                if rule["match"] not in key:
                    continue
                n = self.seen[i]
                self.seen[i] += 1
                after = int(rule.get("after", 0))
                times = int(rule.get("times", 1))
                if n < after or (times >= 0 and n >= after + times):
                    continue
                self.fired[f"{rule['kind']} {rule['match']}"] += 1
                return rule
        return None


class FakeApp:
    """Subclass and implement ``handle(method, path, headers, body) -> (status, headers, bytes)``."""

    base = ""

    def __init__(self):
        self.faults = Faults()
        self.requests: Counter[str] = Counter()
        self.lock = threading.RLock()

    def request_key(self, method: str, path: str, body: bytes) -> str:
        return f"{method} {normalise(path)}"

    def fault_response(self, rule: dict, key: str) -> tuple[int, dict, bytes]:
        raise NotImplementedError

    def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict, bytes]:
        raise NotImplementedError

    def stats(self) -> dict:
        return {
            "requests": dict(self.requests),
            "total": sum(self.requests.values()),
            "faults_fired": dict(self.faults.fired),
        }

    def reset(self) -> None:
        self.faults.clear()
        with self.lock:
            self.requests.clear()


def make_handler(app: FakeApp):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # request bodies carry credentials: log nothing
            pass

        def _send(self, status: int, headers: dict, body: bytes) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj) -> None:
            self._send(status, {"Content-Type": "application/json"}, json.dumps(obj).encode())

        def _dispatch(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = self.path
            if path.startswith("/_fake/"):
                if path == "/_fake/stats":
                    return self._json(200, app.stats())
                if path == "/_fake/faults" and self.command == "POST":
                    app.faults.set(json.loads(body or b"[]"))
                    return self._json(200, {"ok": True})
                if path == "/_fake/reset" and self.command == "POST":
                    app.reset()
                    return self._json(200, {"ok": True})
                if path == "/_fake/state":
                    return self._json(200, app.state() if hasattr(app, "state") else {})
                return self._json(404, {"error": path})
            key = app.request_key(self.command, path, body)
            with app.lock:
                app.requests[key] += 1
            rule = app.faults.check(key)
            if rule is not None:
                if rule["kind"] == "slow":
                    time.sleep(float(rule.get("delay_s", 1.0)))
                else:
                    return self._send(*app.fault_response(rule, key))
            try:
                status, headers, out = app.handle(self.command, path, self.headers, body)
            except Exception as exc:  # a bug in the fake must show up as a 500, not a hang
                status, headers, out = 500, {"Content-Type": "text/plain"}, f"fake error: {exc!r}".encode()
            self._send(status, headers, out)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch

    return Handler


def serve(app: FakeApp, port_file: str | None, port: int = 0) -> None:
    """Bind 127.0.0.1 (port 0 = any free port), publish the port atomically, serve forever."""
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(app))
    server.daemon_threads = True
    app.base = f"http://127.0.0.1:{server.server_address[1]}"  # fakes that hand out URLs need it
    if port_file:
        tmp = f"{port_file}.tmp"
        with open(tmp, "w") as fh:
            fh.write(str(server.server_address[1]))
        os.replace(tmp, port_file)
    print(f"listening on 127.0.0.1:{server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()
