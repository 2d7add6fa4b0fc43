"""A fake Civo API v2 on 127.0.0.1: the endpoints ``homeport exit-node`` uses, and strict.

Like civogo's ``fake_client.go``, it keeps instances, firewalls, networks and
disk images in memory. Unlike a mock, it checks every request the way the
real API would have to: the bearer key, the region, JSON bodies with exactly
the known fields of the right types, firewall rules that make sense, ids
that exist. Anything else gets a 4xx with Civo's ``{"code", "reason"}`` body,
so a client that sends a malformed request fails the test.

Behaviour a test can set: how many polls until an instance is ACTIVE,
whether it ever gets a public IP (and which), an instance quota, a page size
that forces pagination, one-off failures (``fail_next``), and a hook run
when an instance is created (the tests boot a "VM" there).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

REGIONS = ("lon1", "nyc1")
SIZES = ("g3.xsmall", "g3.small")
FIREWALL_FIELDS = {
    "name": str,
    "region": str,
    "network_id": str,
    "create_rules": bool,
    "rules": list,
}
RULE_FIELDS = {
    "protocol": str,
    "start_port": str,
    "end_port": str,
    "cidr": list,
    "direction": str,
    "action": str,
    "label": str,
}
INSTANCE_FIELDS = {
    "hostname": str,
    "size": str,
    "region": str,
    "network_id": str,
    "template_id": str,
    "firewall_id": str,
    "public_ip": str,
    "initial_user": str,
    "count": int,
    "tags": str,
    "script": str,
    "ssh_key_id": str,
}
INSTANCE_REQUIRED = {"hostname", "size", "network_id", "template_id"}


class Reject(Exception):
    """Answer the request with this status and Civo-style error body."""

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    body: Any


@dataclass
class FakeCivo:
    api_key: str = "test-civo-key-0123456789"
    polls_until_active: int = 2
    public_ip: str | None = "203.0.113.10"
    max_instances: int = 10
    page_size: int = 100
    disk_images: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"id": "img-noble", "name": "ubuntu-noble", "version": "24.04", "state": "available"},
            {"id": "img-deb12", "name": "debian-12", "version": "12", "state": "available"},
        ]
    )
    networks: list[dict[str, Any]] = field(
        default_factory=lambda: [
            {"id": "net-other", "label": "other", "default": False},
            {"id": "net-default", "label": "default", "default": True},
        ]
    )
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    firewalls: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    #: (METHOD, path prefix) -> (status, code, reason), used once.
    fail_next: dict[tuple[str, str], tuple[int, str, str]] = field(default_factory=dict)
    on_instance_created: Callable[[dict[str, Any]], Awaitable[None]] | None = None
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    url: str = ""

    # -- plumbing ---------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app.router.add_get("/v2/networks", self._networks)
        app.router.add_get("/v2/disk_images", self._disk_images)
        app.router.add_get("/v2/firewalls", self._list_firewalls)
        app.router.add_post("/v2/firewalls", self._create_firewall)
        app.router.add_delete("/v2/firewalls/{id}", self._delete_firewall)
        app.router.add_get("/v2/instances", self._list_instances)
        app.router.add_post("/v2/instances", self._create_instance)
        app.router.add_get("/v2/instances/{id}", self._get_instance)
        app.router.add_delete("/v2/instances/{id}", self._delete_instance)
        return app

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw
        self.calls.append(Call(request.method, request.path, dict(request.query), body))
        try:
            self._check_common(request, body)
            for (method, prefix), failure in list(self.fail_next.items()):
                if request.method == method and request.path.startswith(prefix):
                    del self.fail_next[(method, prefix)]
                    raise Reject(*failure)
            return await handler(request)
        except Reject as exc:
            return web.json_response({"code": exc.code, "reason": exc.reason}, status=exc.status)

    def _check_common(self, request: web.Request, body: Any) -> None:
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or key != self.api_key:
            raise Reject(401, "authentication_invalid_key", "The API key provided is invalid")
        if request.query.get("region") not in REGIONS:
            raise Reject(400, "region_invalid", "region must be one of " + ", ".join(REGIONS))
        if request.method == "POST":
            if request.content_type != "application/json":
                raise Reject(400, "invalid_content_type", "send application/json")
            if not isinstance(body, dict):
                raise Reject(400, "invalid_json", "the body is not a JSON object")
            if body.get("region") != request.query["region"]:
                raise Reject(400, "region_mismatch", "region in body and query differ")
        elif body is not None:
            raise Reject(400, "unexpected_body", f"{request.method} takes no body")

    def _new_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids):04d}"

    # -- networks, images -------------------------------------------------------

    async def _networks(self, _request: web.Request) -> web.Response:
        return web.json_response(self.networks)

    async def _disk_images(self, _request: web.Request) -> web.Response:
        return web.json_response(self.disk_images)

    # -- firewalls ----------------------------------------------------------------

    async def _list_firewalls(self, _request: web.Request) -> web.Response:
        return web.json_response(list(self.firewalls.values()))

    async def _create_firewall(self, request: web.Request) -> web.Response:
        body = await request.json()
        check_fields(body, FIREWALL_FIELDS, required=set(FIREWALL_FIELDS))
        if body["network_id"] not in {n["id"] for n in self.networks}:
            raise Reject(400, "database_network_not_found", "no such network")
        if any(f["name"] == body["name"] for f in self.firewalls.values()):
            raise Reject(400, "database_firewall_duplicate", "a firewall has that name")
        for rule in body["rules"]:
            check_rule(rule)
        firewall_id = self._new_id("fw")
        self.firewalls[firewall_id] = {
            "id": firewall_id,
            "name": body["name"],
            "network_id": body["network_id"],
            "rules": body["rules"],
            "instance_count": 0,
        }
        return web.json_response({"id": firewall_id, "name": body["name"], "result": "success"})

    async def _delete_firewall(self, request: web.Request) -> web.Response:
        firewall_id = request.match_info["id"]
        if firewall_id not in self.firewalls:
            raise Reject(404, "database_firewall_not_found", "no such firewall")
        if any(i["firewall_id"] == firewall_id for i in self.instances.values()):
            raise Reject(400, "database_firewall_in_use", "the firewall is in use")
        del self.firewalls[firewall_id]
        return web.json_response({"result": "success", "id": firewall_id})

    # -- instances ----------------------------------------------------------------

    async def _list_instances(self, request: web.Request) -> web.Response:
        try:
            page = int(request.query.get("page", "1"))
            per_page = min(int(request.query.get("per_page", "20")), self.page_size)
        except ValueError:
            raise Reject(400, "invalid_page", "page and per_page are numbers") from None
        items = [self._view(i) for i in self.instances.values()]
        pages = max(1, -(-len(items) // per_page))
        chunk = items[(page - 1) * per_page : page * per_page]
        return web.json_response(
            {"page": page, "per_page": per_page, "pages": pages, "items": chunk}
        )

    async def _create_instance(self, request: web.Request) -> web.Response:
        body = await request.json()
        check_fields(body, INSTANCE_FIELDS, required=INSTANCE_REQUIRED)
        if body["size"] not in SIZES:
            raise Reject(400, "database_size_not_found", "no such size")
        if body["network_id"] not in {n["id"] for n in self.networks}:
            raise Reject(400, "database_network_not_found", "no such network")
        if body["template_id"] not in {i["id"] for i in self.disk_images}:
            raise Reject(400, "database_template_not_found", "no such disk image")
        if body.get("firewall_id", "") and body["firewall_id"] not in self.firewalls:
            raise Reject(400, "database_firewall_not_found", "no such firewall")
        if body.get("public_ip", "create") not in ("create", "none"):
            raise Reject(400, "invalid_public_ip", "public_ip is create or none")
        if body.get("initial_user") in ("root", "admin"):
            raise Reject(400, "invalid_initial_user", "initial_user cannot be root or admin")
        if body.get("count", 1) != 1:
            raise Reject(400, "invalid_count", "count must be 1 here")
        if len(self.instances) >= self.max_instances:
            raise Reject(403, "quota_limit_reached", "instance quota of your account reached")
        instance_id = self._new_id("inst")
        instance = {
            "id": instance_id,
            "hostname": body["hostname"],
            "size": body["size"],
            "status": "BUILDING",
            "public_ip": "",
            "firewall_id": body.get("firewall_id", ""),
            "tags": body.get("tags", "").split(),
            "script": body.get("script", ""),
            "_polls": 0,
            "_deleting": False,
        }
        self.instances[instance_id] = instance
        if self.on_instance_created is not None:
            await self.on_instance_created(instance)
        return web.json_response(self._view(instance))

    async def _get_instance(self, request: web.Request) -> web.Response:
        instance = self.instances.get(request.match_info["id"])
        if instance is None:
            raise Reject(404, "database_instance_not_found", "no such instance")
        if instance["_deleting"]:
            del self.instances[instance["id"]]  # gone once the deletion was seen once
            return web.json_response({**self._view(instance), "status": "DELETING"})
        instance["_polls"] += 1
        if instance["_polls"] >= self.polls_until_active:
            instance["status"] = "ACTIVE"
            instance["public_ip"] = self.public_ip or ""
        return web.json_response(self._view(instance))

    async def _delete_instance(self, request: web.Request) -> web.Response:
        instance = self.instances.get(request.match_info["id"])
        if instance is None:
            raise Reject(404, "database_instance_not_found", "no such instance")
        instance["_deleting"] = True
        return web.json_response({"result": "success", "id": instance["id"]})

    @staticmethod
    def _view(instance: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in instance.items() if not k.startswith("_")}


def check_fields(body: dict[str, Any], known: dict[str, type], required: set[str]) -> None:
    """Exactly the known fields, each of its type; the required ones present."""
    unknown = set(body) - set(known)
    if unknown:
        raise Reject(400, "unknown_fields", f"unknown fields: {sorted(unknown)}")
    missing = required - set(body)
    if missing:
        raise Reject(400, "missing_fields", f"missing fields: {sorted(missing)}")
    for name, value in body.items():
        if type(value) is not known[name]:
            raise Reject(400, "invalid_field", f"{name} must be a {known[name].__name__}")


def check_rule(rule: Any) -> None:
    """A firewall rule Civo would accept: a protocol, a port range, networks, a direction."""
    if not isinstance(rule, dict):
        raise Reject(400, "invalid_rule", "a rule is an object")
    check_fields(rule, RULE_FIELDS, required=set(RULE_FIELDS) - {"label"})
    if rule["protocol"] not in ("tcp", "udp", "icmp"):
        raise Reject(400, "invalid_rule", "protocol is tcp, udp or icmp")
    if rule["direction"] not in ("ingress", "egress") or rule["action"] not in ("allow", "deny"):
        raise Reject(400, "invalid_rule", "direction ingress/egress, action allow/deny")
    try:
        start, end = int(rule["start_port"]), int(rule["end_port"])
        for cidr in rule["cidr"]:
            ipaddress.ip_network(cidr)
    except (ValueError, TypeError):
        raise Reject(400, "invalid_rule", "ports are numbers, cidr a list of networks") from None
    if not (1 <= start <= end <= 65535) or not rule["cidr"]:
        raise Reject(400, "invalid_rule", "1 <= start_port <= end_port <= 65535, some cidr")


async def start_fake_civo(fake: FakeCivo) -> web.AppRunner:
    """Serve ``fake`` on 127.0.0.1 (a free port); sets ``fake.url``."""
    runner = web.AppRunner(fake.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    fake.url = f"http://{host}:{port}"
    return runner
