"""A small stateful OpenStack on 127.0.0.1: Keystone v3, Nova, Glance v2 and the Neutron bits
libcloud's OpenStack 2.0 driver uses for networks and security groups.

Response shapes follow libcloud's own fixtures (``libcloud/test/compute/fixtures/openstack*``):
a server carries ``links`` with ``rel: self`` (libcloud reads its URI from it), key pairs
are listed as ``{"keypairs": [{"keypair": {...}}]}``, Glance lists ``{"images": [...]}``.
It behaves like a cloud where it matters to provisioning: tokens are checked, servers go
BUILD -> ACTIVE after ``--build-seconds``, quotas (instances/cores/RAM) are enforced with
Nova's 403 "Quota exceeded" and read through ``os-quota-sets/<project>/detail``, ``os-stop``
leaves a server SHUTOFF (as a guest's own power-off does), a security group in use cannot be deleted (409), and faults
can be injected through ``/_fake/faults`` (see ``fakehttp``).

Run: ``python openstack_fake.py --port-file F``; the password comes from ``FAKE_OS_PASSWORD``
(environment, not argv, so it is not visible in ``ps``).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import ipaddress
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fakehttp import FakeApp, serve  # noqa: E402

PROJECT = "9c4693dce56b493b9b83197d900f7fba"
FLAVORS = [
    # name, vcpus, ram MiB, disk GiB: shaped like a research cloud's general/memory families
    ("general.v1.tiny", 1, 2048, 20),
    ("general.v1.small", 2, 4096, 20),
    ("general.v1.medium", 4, 8192, 40),
    ("general.v1.large", 8, 16384, 80),
    ("general.v1.xlarge", 16, 32768, 80),
    ("memory.v1.large", 8, 65536, 80),
    ("memory.v1.xlarge", 16, 131072, 80),
]
IMAGES = [
    ("ubuntu-24.04", "active"),
    ("ubuntu-22.04", "active"),
    ("fedora-38", "active"),
    ("broken-image", "queued"),
]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class OpenStackFake(FakeApp):
    def __init__(
        self,
        base: str,
        user: str,
        password: str,
        build_seconds: float,
        quota: dict,
        subnet: str = "10.0.0.0/24",
    ):
        super().__init__()
        self.base = base
        self.user = user
        self.password = password
        self.build_seconds = build_seconds
        self.quota = quota
        self.subnet = ipaddress.ip_network(subnet)
        self.tokens: set[str] = set()
        self.flavors = {
            str(i + 1): dict(id=str(i + 1), name=n, vcpus=c, ram=r, disk=d)
            for i, (n, c, r, d) in enumerate(FLAVORS)
        }
        self.images = {
            str(uuid.uuid5(uuid.NAMESPACE_DNS, n)): dict(
                id=str(uuid.uuid5(uuid.NAMESPACE_DNS, n)), name=n, status=s
            )
            for n, s in IMAGES
        }
        self.networks = {
            "net-gaia": {
                "id": "5f3b9d5c-4a2e-4c1b-9a6e-1f2d3c4b5a60",
                "name": "gaia-net",
                "subnets": ["sub-1"],
                "status": "ACTIVE",
            }
        }
        self._init_state()

    def _init_state(self):
        self.servers: dict[str, dict] = {}
        self.keypairs: dict[str, dict] = {}
        self.groups: dict[str, dict] = {
            "default": {
                "id": str(uuid.uuid4()),
                "name": "default",
                "description": "default",
                "tenant_id": PROJECT,
                "security_group_rules": [],
            }
        }
        self.ip_counter = 10

    def reset(self):
        super().reset()
        with self.lock:
            self._init_state()

    def state(self) -> dict:
        with self.lock:
            return {
                "servers": [
                    {
                        **{
                            k: v
                            for k, v in self._server_view(s).items()
                            if k in ("id", "name", "status", "metadata", "security_groups", "key_name")
                        },
                        "user_data": s["_user_data"],
                        "address": s["_ip"],
                    }
                    for s in self.servers.values()
                ],
                "keypairs": sorted(self.keypairs),
                "security_groups": sorted(g["name"] for g in self.groups.values()),
                "security_group_details": [
                    {
                        "id": g["id"],
                        "name": g["name"],
                        "sources": sorted(
                            [r["protocol"], r["remote_group_id"] or r["remote_ip_prefix"]]
                            for r in g["security_group_rules"]
                        ),
                        "rules": sorted(
                            [
                                r["protocol"],
                                r["port_range_min"],
                                r["port_range_max"],
                                r["remote_group_id"] or r["remote_ip_prefix"],
                            ]
                            for r in g["security_group_rules"]
                        ),
                    }
                    for g in self.groups.values()
                ],
            }

    # --- helpers -------------------------------------------------------------------------
    def _json(self, status: int, obj, headers: dict | None = None):
        return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode()

    def _error(self, status: int, kind: str, message: str, headers: dict | None = None):
        return self._json(status, {kind: {"code": status, "message": message}}, headers)

    def fault_response(self, rule, key):
        kind = rule["kind"]
        if kind == "quota":
            used = sum(1 for s in self.servers.values())
            return self._error(
                403,
                "forbidden",
                f"Quota exceeded for instances: Requested 1, but already used {used} of {used} instances",
            )
        if kind == "throttle":
            return self._error(429, "overLimit", "This request was rate-limited.", {"Retry-After": "0"})
        status = int(rule.get("status", 500))
        return self._error(status, "computeFault", f"fake fault {status} on {key}")

    def _catalog(self):
        def svc(kind, name, path):
            return {
                "type": kind,
                "name": name,
                "id": uuid.uuid5(uuid.NAMESPACE_DNS, name).hex,
                "endpoints": [
                    {
                        "id": uuid.uuid5(uuid.NAMESPACE_DNS, name + i).hex,
                        "interface": i,
                        "region": "RegionOne",
                        "region_id": "RegionOne",
                        "url": f"{self.base}{path}",
                    }
                    for i in ("public", "internal")
                ],
            }

        return [
            svc("identity", "keystone", "/identity"),
            svc("compute", "nova", f"/compute/v2.1/{PROJECT}"),
            svc("image", "glance", "/image"),
            svc("network", "neutron", "/network"),
        ]

    def _server_view(self, s: dict) -> dict:
        if s["status"] == "BUILD" and time.monotonic() - s["_t0"] >= self.build_seconds:
            s["status"] = "ACTIVE"
            s["addresses"] = {
                "gaia-net": [
                    {
                        "version": 4,
                        "addr": s["_ip"],
                        "OS-EXT-IPS:type": "fixed",
                        "OS-EXT-IPS-MAC:mac_addr": "fa:16:3e:00:00:01",
                    }
                ]
            }
        view = {k: v for k, v in s.items() if not k.startswith("_")}
        return view

    # --- routing -------------------------------------------------------------------------
    def handle(self, method, path, headers, body):
        path = path.split("?", 1)[0]
        if path in ("/identity/v3/auth/tokens", "/v3/auth/tokens") and method == "POST":
            return self._auth(body)
        if path in ("/", "/identity", "/identity/v3"):
            return self._json(200, {"version": {"id": "v3.14", "status": "stable"}})
        token = headers.get("X-Auth-Token")
        if token not in self.tokens:
            return self._error(401, "error", "The request you have made requires authentication.")
        data = json.loads(body) if body else {}
        nova = f"/compute/v2.1/{PROJECT}"
        with self.lock:
            if path.startswith(nova):
                return self._nova(method, path[len(nova) :], data)
            if path.startswith("/image"):
                return self._glance(method, path[len("/image") :])
            if path.startswith("/network"):
                return self._neutron(method, path[len("/network") :], data)
        return self._error(404, "itemNotFound", f"no route {method} {path}")

    def _auth(self, body: bytes):
        try:
            ident = json.loads(body)["auth"]["identity"]["password"]["user"]
        except (ValueError, KeyError):
            return self._error(400, "error", "malformed auth request")
        if ident.get("name") != self.user or ident.get("password") != self.password:
            return self._error(401, "error", "The request you have made requires authentication.")
        token = uuid.uuid4().hex
        self.tokens.add(token)
        expires = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.000000Z")
        body = {
            "token": {
                "methods": ["password"],
                "expires_at": expires,
                "issued_at": _now(),
                "user": {
                    "id": "u-" + hashlib.md5(self.user.encode()).hexdigest()[:8],
                    "name": self.user,
                    "domain": {"id": "default", "name": "Default"},
                },
                "project": {"id": PROJECT, "name": "gaia", "domain": {"id": "default", "name": "Default"}},
                "roles": [{"id": "r1", "name": "member"}],
                "catalog": self._catalog(),
            }
        }
        return self._json(201, body, {"X-Subject-Token": token})

    def _nova(self, method, path, data):
        parts = [p for p in path.split("/") if p]
        if parts == ["flavors", "detail"] or parts == ["flavors"]:
            return self._json(200, {"flavors": [self._flavor_view(f) for f in self.flavors.values()]})
        if len(parts) == 2 and parts[0] == "flavors":
            f = self.flavors.get(parts[1])
            return (
                self._json(200, {"flavor": self._flavor_view(f)})
                if f
                else self._error(404, "itemNotFound", "flavor")
            )
        if parts == ["servers"] and method == "POST":
            return self._create_server(data.get("server", {}))
        if parts in (["servers", "detail"], ["servers"]) and method == "GET":
            return self._json(200, {"servers": [self._server_view(s) for s in self.servers.values()]})
        if len(parts) == 3 and parts[0] == "servers" and parts[2] == "action" and method == "POST":
            s = self.servers.get(parts[1])
            if s is None:
                return self._error(404, "itemNotFound", f"Instance {parts[1]} could not be found.")
            if "os-stop" in data:  # what a guest's own power-off leads to as well
                s["status"] = "SHUTOFF"
                return 202, {}, b""
            return self._error(400, "badRequest", f"unsupported action {sorted(data)}")
        if len(parts) == 2 and parts[0] == "servers":
            s = self.servers.get(parts[1])
            if s is None:
                return self._error(404, "itemNotFound", f"Instance {parts[1]} could not be found.")
            if method == "GET":
                return self._json(200, {"server": self._server_view(s)})
            if method == "DELETE":
                del self.servers[parts[1]]
                return 204, {}, b""
        if parts == ["os-quota-sets", PROJECT, "detail"] and method == "GET":
            return self._json(200, {"quota_set": self._quota_detail()})
        if parts == ["os-keypairs"]:
            if method == "GET":
                return self._json(200, {"keypairs": [{"keypair": k} for k in self.keypairs.values()]})
            if method == "POST":
                return self._create_keypair(data.get("keypair", {}))
        if len(parts) == 2 and parts[0] == "os-keypairs":
            k = self.keypairs.get(parts[1])
            if k is None:
                return self._error(404, "itemNotFound", f"Keypair {parts[1]} not found for user")
            if method == "GET":
                return self._json(200, {"keypair": k})
            if method == "DELETE":
                del self.keypairs[parts[1]]
                return 202, {}, b""
        return self._error(404, "itemNotFound", f"no nova route {method} {path}")

    def _quota_detail(self) -> dict:
        """Nova's quota detail: limit and in_use of what the fake enforces (others unlimited)."""
        used = {
            "instances": len(self.servers),
            "cores": sum(self.flavors[s["flavor"]["id"]]["vcpus"] for s in self.servers.values()),
            "ram": sum(self.flavors[s["flavor"]["id"]]["ram"] for s in self.servers.values()),
            "key_pairs": len(self.keypairs),
        }
        keys = (
            "instances",
            "cores",
            "ram",
            "key_pairs",
            "metadata_items",
            "server_groups",
            "server_group_members",
        )
        detail = {k: {"limit": self.quota.get(k, -1), "in_use": used.get(k, 0), "reserved": 0} for k in keys}
        return {"id": PROJECT, **detail}

    def _flavor_view(self, f):
        return {
            **f,
            "links": [{"rel": "self", "href": f"{self.base}/compute/v2.1/{PROJECT}/flavors/{f['id']}"}],
            "swap": "",
            "rxtx_factor": 1.0,
        }

    def _create_server(self, req: dict):
        flavor = self.flavors.get(str(req.get("flavorRef")))
        if flavor is None:
            return self._error(400, "badRequest", f"Flavor {req.get('flavorRef')} could not be found.")
        image = self.images.get(str(req.get("imageRef")))
        if image is None or image["status"] != "active":
            return self._error(400, "badRequest", f"Image {req.get('imageRef')} could not be found.")
        if req.get("key_name") and req["key_name"] not in self.keypairs:
            return self._error(400, "badRequest", "Invalid key_name provided.")
        names = [g["name"] for g in req.get("security_groups") or [{"name": "default"}]]
        known = {g["name"] for g in self.groups.values()}
        missing = [n for n in names if n not in known]
        if missing:
            return self._error(400, "badRequest", f"Security group {missing[0]} not found.")
        usage = self._quota_detail()
        for what, need in (("instances", 1), ("cores", flavor["vcpus"]), ("ram", flavor["ram"])):
            used, limit = usage[what]["in_use"], usage[what]["limit"]
            if used + need > limit:
                return self._error(
                    403,
                    "forbidden",
                    f"Quota exceeded for {what}: Requested {need}, but already used {used} of {limit} {what}",
                )
        sid = str(uuid.uuid4())
        self.ip_counter += 1
        server = {
            "id": sid,
            "name": req.get("name", sid),
            "status": "BUILD",
            "tenant_id": PROJECT,
            "user_id": "u-gaia",
            "hostId": hashlib.sha224(sid.encode()).hexdigest(),
            "created": _now(),
            "updated": _now(),
            "addresses": {},
            "accessIPv4": "",
            "accessIPv6": "",
            "image": {"id": image["id"], "links": []},
            "flavor": {"id": flavor["id"], "links": []},
            "metadata": {str(k): str(v) for k, v in (req.get("metadata") or {}).items()},
            "key_name": req.get("key_name"),
            "security_groups": [{"name": n} for n in names],
            "OS-EXT-AZ:availability_zone": req.get("availability_zone", "nova"),
            "OS-EXT-STS:vm_state": "building",
            "config_drive": "",
            "links": [
                {"rel": "self", "href": f"{self.base}/compute/v2.1/{PROJECT}/servers/{sid}"},
                {"rel": "bookmark", "href": f"{self.base}/compute/{PROJECT}/servers/{sid}"},
            ],
            "_t0": time.monotonic(),
            "_ip": str(self.subnet.network_address + self.ip_counter),
            "_user_data": base64.b64decode(req.get("user_data", "") or b"").decode(),
        }
        self.servers[sid] = server
        return self._json(
            202, {"server": {"id": sid, "links": server["links"], "adminPass": uuid.uuid4().hex[:12]}}
        )

    def _create_keypair(self, req: dict):
        name = req.get("name")
        if not name:
            return self._error(400, "badRequest", "Keypair data is invalid: name required")
        if name in self.keypairs:
            return self._error(409, "conflictingRequest", f"Key pair '{name}' already exists.")
        public = req.get("public_key") or f"ssh-rsa AAAAB3Nza{uuid.uuid4().hex} Generated-by-Nova"
        kp = {
            "name": name,
            "public_key": public,
            "fingerprint": ":".join(
                hashlib.md5(public.encode()).hexdigest()[i : i + 2] for i in range(0, 32, 2)
            ),
            "user_id": "u-gaia",
        }
        self.keypairs[name] = kp
        out = dict(kp)
        if not req.get("public_key"):
            out["private_key"] = f"fake-private-key-{uuid.uuid4().hex}\n"
        return self._json(200, {"keypair": out})

    def _glance(self, method, path):
        parts = [p for p in path.split("/") if p]
        if parts == ["v2", "images"]:
            return self._json(
                200,
                {
                    "images": [self._image_view(i) for i in self.images.values()],
                    "schema": "/v2/schemas/images",
                    "first": "/v2/images",
                },
            )
        if len(parts) == 3 and parts[:2] == ["v2", "images"]:
            i = self.images.get(parts[2])
            return self._json(200, self._image_view(i)) if i else self._error(404, "itemNotFound", "image")
        return self._error(404, "itemNotFound", f"no glance route {path}")

    def _image_view(self, i):
        return {
            "id": i["id"],
            "name": i["name"],
            "status": i["status"],
            "visibility": "public",
            "min_ram": 0,
            "min_disk": 10,
            "created_at": "2025-01-01T00:00:00Z",
            "updated_at": "2025-01-01T00:00:00Z",
            "tags": [],
            "self": f"/v2/images/{i['id']}",
        }

    def _neutron(self, method, path, data):
        parts = [p for p in path.split("/") if p]
        if parts == ["v2.0", "networks"]:
            return self._json(200, {"networks": list(self.networks.values())})
        if parts == ["v2.0", "security-groups"]:
            if method == "GET":
                return self._json(200, {"security_groups": list(self.groups.values())})
            if method == "POST":
                req = data.get("security_group", {})
                gid = str(uuid.uuid4())
                group = {
                    "id": gid,
                    "name": req.get("name"),
                    "description": req.get("description", ""),
                    "tenant_id": PROJECT,
                    "project_id": PROJECT,
                    "security_group_rules": [],
                }
                self.groups[gid] = group
                return self._json(201, {"security_group": group})
        if len(parts) == 3 and parts[:2] == ["v2.0", "security-groups"] and method == "DELETE":
            group = self.groups.get(parts[2])
            if group is None:
                return self._error(404, "NeutronError", "Security group not found")
            users = [
                s["name"]
                for s in self.servers.values()
                if any(g["name"] == group["name"] for g in s["security_groups"])
            ]
            if users:
                return self._error(409, "NeutronError", f"Security Group {group['id']} in use by {users}.")
            del self.groups[parts[2]]
            return 204, {}, b""
        if parts == ["v2.0", "security-group-rules"] and method == "POST":
            req = data.get("security_group_rule", {})
            group = self.groups.get(req.get("security_group_id"))
            if group is None:
                return self._error(404, "NeutronError", "Security group not found")
            rule = {
                "id": str(uuid.uuid4()),
                "direction": req.get("direction", "ingress"),
                "protocol": req.get("protocol"),
                "port_range_min": req.get("port_range_min"),
                "port_range_max": req.get("port_range_max"),
                "remote_ip_prefix": req.get("remote_ip_prefix"),
                "remote_group_id": req.get("remote_group_id"),
                "security_group_id": group["id"],
                "tenant_id": PROJECT,
            }
            group["security_group_rules"].append(rule)
            return self._json(201, {"security_group_rule": rule})
        return self._error(404, "NeutronError", f"no neutron route {method} {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--port", type=int, default=0, help="0: any free port (written to --port-file)")
    parser.add_argument("--user", default="gaia")
    parser.add_argument("--build-seconds", type=float, default=0.2)
    parser.add_argument("--max-instances", type=int, default=20)
    parser.add_argument("--max-cores", type=int, default=128)
    parser.add_argument("--max-ram-mb", type=int, default=512 * 1024)
    parser.add_argument(
        "--subnet", default="10.0.0.0/24", help="fixed addresses of servers: .11, .12, ... of this network"
    )
    args = parser.parse_args(argv)
    password = os.environ.get("FAKE_OS_PASSWORD", "")
    quota = {"instances": args.max_instances, "cores": args.max_cores, "ram": args.max_ram_mb}
    app = OpenStackFake("", args.user, password, args.build_seconds, quota, subnet=args.subnet)
    serve(app, args.port_file, args.port)


if __name__ == "__main__":
    main()
