"""A loopback reverse proxy that injects EC2-shaped faults in front of ``moto_server``.

moto emulates EC2 faithfully but never fails on purpose, so the retry and no-leak paths
against the AWS driver would otherwise go untested. The proxy forwards every request
unchanged and, per the rules in ``/_fake/faults`` (see ``fakehttp``), answers instead with
what EC2 sends: 500 ``InternalError``, 503 ``RequestLimitExceeded`` (``throttle``), 400
``InstanceLimitExceeded`` (``quota``), or forwards late (``slow``). Rules match the EC2
``Action`` (e.g. ``RunInstances``). Stats count requests per Action, which is what the
benchmark reports as HTTP calls.

Run: ``python fault_proxy.py --upstream http://127.0.0.1:PORT --port-file F``.
"""

from __future__ import annotations

import argparse
import http.client
import os
import sys
import uuid
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fakehttp import FakeApp, serve  # noqa: E402

EC2_ERRORS = {
    "error": (500, "InternalError", "An internal error has occurred (injected)."),
    "throttle": (503, "RequestLimitExceeded", "Request limit exceeded. (injected)"),
    "quota": (
        400,
        "InstanceLimitExceeded",
        "You have requested more instances than your current instance limit allows for the specified instance type. (injected)",
    ),
}
HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class FaultProxy(FakeApp):
    def __init__(self, upstream: str):
        super().__init__()
        parts = urlsplit(upstream)
        self.host, self.port = parts.hostname, parts.port

    def request_key(self, method, path, body):
        query = urlsplit(path).query
        fields = parse_qs(body.decode("utf-8", "replace")) if body else {}
        fields.update(parse_qs(query))
        action = (fields.get("Action") or ["?"])[0]
        return f"Action={action}"

    def fault_response(self, rule, key):
        status, code, message = EC2_ERRORS[rule["kind"]]
        status = int(rule.get("status", status))
        body = (
            f"<?xml version='1.0' encoding='UTF-8'?>\n<Response><Errors><Error><Code>{code}</Code>"
            f"<Message>{message}</Message></Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>"
        ).encode()
        return status, {"Content-Type": "text/xml"}, body

    def handle(self, method, path, headers, body):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            forward = {k: v for k, v in headers.items() if k.lower() not in HOP_HEADERS}
            # SigV4 signs the Host header: keep the client's, so moto verifies what was signed.
            forward["Host"] = headers.get("Host", f"{self.host}:{self.port}")
            conn.request(method, path, body=body or None, headers=forward)
            response = conn.getresponse()
            data = response.read()
            out = {k: v for k, v in response.getheaders() if k.lower() not in HOP_HEADERS}
            return response.status, out, data
        finally:
            conn.close()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream", required=True)
    parser.add_argument("--port-file", required=True)
    args = parser.parse_args(argv)
    serve(FaultProxy(args.upstream), args.port_file)


if __name__ == "__main__":
    main()
