"""Creating, listing and deleting exit nodes on Civo: the flows behind ``homeport exit-node``.

Create, in order: refuse a name already taken; find the default network
and the disk image; write the token and record locally; create a firewall
that opens only the public port, the control port, the raw TCP ports (if
any), the HTTPS port (with ``--letsencrypt-domain``) and (if asked) SSH
from one network; create the instance with the bootstrap script; wait until
it is ACTIVE with a public IP (and say which IP the names' DNS must point
at); wait until the exit server answers on the control port with the
certificate made for it.
Each thing created is recorded at once, and any failure after the first
one says what exists and how to delete it, so nothing is left behind
silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Final

from homeport.exitnode.civo import CivoClient, Json
from homeport.exitnode.errors import CivoError, ExitNodeError, NotFound
from homeport.exitnode.material import NodeSecrets
from homeport.exitnode.ready import wait_until_serving
from homeport.exitnode.render import (
    HTTPS_PORT,
    INSTALL_CLIENT,
    NO_HTTPS,
    LetsEncrypt,
    NodeSettings,
    bootstrap_script,
    check_package,
    check_port,
    check_tcp_ports,
    template,
)
from homeport.exitnode.store import NodeRecord, NodeStore, check_name

TAG: Final = "homeport"
PROVIDER: Final = "civo"
ANY_IPV4: Final = "0.0.0.0/0"
_REGION: Final = re.compile(r"[a-z0-9-]{2,32}")

Say = Callable[[str], None]


@dataclass(frozen=True)
class CreateRequest:
    """What ``exit-node create`` was asked for."""

    name: str
    region: str
    size: str
    image: str
    port: int
    control_port: int
    allow_ssh_from: tuple[str, ...]
    ssh_key_id: str | None
    package: str
    timeout_s: float
    poll_interval_s: float
    tcp_ports: tuple[int, ...] = ()
    letsencrypt: LetsEncrypt = NO_HTTPS

    def checked(self) -> CreateRequest:
        """Itself, once every field is known to be well formed (the HTTPS names normalised).

        Raises:
            ExitNodeError: a field is not.
        """
        check_name(self.name)
        if _REGION.fullmatch(self.region) is None:
            raise ExitNodeError(f"--region {self.region!r} is not a region name (like lon1)")
        check_port(self.port, "--port")
        check_port(self.control_port, "--control-port")
        if self.port == self.control_port:
            raise ExitNodeError("--port and --control-port must differ")
        check_tcp_ports(self.tcp_ports, self.port, self.control_port)
        letsencrypt = self.letsencrypt.checked(self.port, self.control_port, self.tcp_ports)
        check_package(self.package)
        if self.timeout_s <= 0 or self.poll_interval_s <= 0:
            raise ExitNodeError("--timeout and --poll-interval must be positive")
        return replace(self, letsencrypt=letsencrypt)


def firewall_name(name: str) -> str:
    """The name of the firewall homeport makes for node ``name``."""
    return f"{TAG}-{name}"


def _rule(
    direction: str, protocol: str, ports: tuple[int, int], cidrs: list[str], label: str
) -> dict[str, Json]:
    return {
        "protocol": protocol,
        "start_port": str(ports[0]),
        "end_port": str(ports[1]),
        "cidr": cidrs,
        "direction": direction,
        "action": "allow",
        "label": label,
    }


def firewall_rules(
    port: int,
    control_port: int,
    allow_ssh_from: tuple[str, ...],
    tcp_ports: tuple[int, ...] = (),
    https_port: int | None = None,
) -> list[dict[str, Json]]:
    """In: the public, control, HTTPS (if served) and raw TCP ports from anywhere, SSH
    only from the given networks.

    Out: all TCP and UDP (the VM installs packages, resolves names, keeps time
    and asks Let's Encrypt for its certificate).
    """
    rules = [
        _rule("ingress", "tcp", (port, port), [ANY_IPV4], "homeport public port"),
        _rule("ingress", "tcp", (control_port, control_port), [ANY_IPV4], "homeport control"),
    ]
    if https_port is not None:
        rules.append(
            _rule("ingress", "tcp", (https_port, https_port), [ANY_IPV4], "homeport https")
        )
    rules += [
        _rule("ingress", "tcp", (tcp_port, tcp_port), [ANY_IPV4], f"homeport tcp {tcp_port}")
        for tcp_port in tcp_ports
    ]
    if allow_ssh_from:
        rules.append(_rule("ingress", "tcp", (22, 22), list(allow_ssh_from), "ssh"))
    rules += [
        _rule("egress", "tcp", (1, 65535), [ANY_IPV4], "all tcp out"),
        _rule("egress", "udp", (1, 65535), [ANY_IPV4], "all udp out"),
    ]
    return rules


def https_urls(domains: tuple[str, ...]) -> list[str]:
    """The URLs visitors browse over HTTPS: ``https://fn.example.com/`` for each name."""
    return [f"https://{domain}/" for domain in domains]


def https_cell(record: NodeRecord) -> str:
    """A node's HTTPS cell in ``list``: its URLs, and "(http redirected)" when plain HTTP is."""
    urls = ",".join(https_urls(record.letsencrypt_domains))
    return f"{urls} (http redirected)" if urls and record.https_redirect else urls


def check_cidr(text: str) -> str:
    """A network in CIDR form, normalised (``203.0.113.7/32``).

    Raises:
        ExitNodeError: not one.
    """
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise ExitNodeError(
            f"--allow-ssh-from {text!r} is not a network (try 203.0.113.7/32)"
        ) from None


def delete_command(name: str, region: str) -> str:
    """The command that deletes node ``name``."""
    return f"homeport exit-node delete {name} --region {region}"


def leftovers(record: NodeRecord) -> str:
    """What exists of a node that failed part way, and how to delete it."""
    things = []
    if record.instance_id:
        things.append(f"instance {record.name} (id {record.instance_id})")
    if record.firewall_id:
        things.append(f"firewall {record.firewall_name} (id {record.firewall_id})")
    if not things:
        return "Nothing was left in Civo."
    return (
        f"Still in Civo region {record.region}: {', '.join(things)}. "
        f"Delete them with: {delete_command(record.name, record.region)}"
    )


def _is_ours(instance: dict[str, Json], name: str) -> bool:
    tags = instance.get("tags")
    return instance.get("hostname") == name and isinstance(tags, list) and TAG in tags


class Creation:
    """One run of ``exit-node create``: the steps, and the record kept as they succeed."""

    def __init__(
        self,
        civo: CivoClient,
        request: CreateRequest,
        secrets: NodeSecrets,
        store: NodeStore | None,
        say: Say,
    ) -> None:
        self.civo = civo
        self.request = request.checked()
        self.secrets = secrets
        self.store = store  # None on a dry run: nothing is written
        self.say = say
        self.record = NodeRecord(
            name=self.request.name,
            provider=PROVIDER,
            region=civo.region,
            port=self.request.port,
            control_port=self.request.control_port,
            fingerprint=secrets.fingerprint,
            tcp_ports=self.request.tcp_ports,
            letsencrypt_domains=self.request.letsencrypt.domains,
            letsencrypt_issuer=self.request.letsencrypt.issuer,
            https_redirect=self.request.letsencrypt.https_redirect,
        )

    def _save(self) -> None:
        if self.store is not None:
            self.store.save(self.record)

    async def run(self) -> NodeRecord:
        """Create the node; return its record once it serves (on a dry run, after the calls).

        Raises:
            ExitNodeError: any step failed; the message says what is left and how to delete it.
        """
        await self._refuse_taken_name()
        network = await self.civo.default_network()
        image = await self.civo.disk_image(self.request.image)
        script = bootstrap_script(
            NodeSettings(
                package=self.request.package,
                public_port=self.request.port,
                control_port=self.request.control_port,
                token_hash=self.secrets.token_hash,
                tls_cert_pem=self.secrets.tls_cert_pem,
                tls_key_pem=self.secrets.tls_key_pem,
                tcp_ports=self.request.tcp_ports,
                letsencrypt=self.request.letsencrypt,
            )
        )
        if self.store is not None:
            self.store.save_new(
                self.record, self.secrets.token, self.secrets.tls_cert_pem, template(INSTALL_CLIENT)
            )
        try:
            await self._create_firewall(network["id"])
            await self._create_instance(network["id"], image["id"], script)
            if self.store is None:
                self._say_what_would_follow()
                return self.record
            await self._wait_until_up()
        except ExitNodeError as exc:
            if self.store is not None and not (self.record.instance_id or self.record.firewall_id):
                self.store.remove(self.record.name)  # nothing to delete later: forget it now
            raise ExitNodeError(f"{exc}\n{leftovers(self.record)}") from None
        except BaseException:  # Ctrl-C, cancellation: still say what exists
            self.say(leftovers(self.record))
            raise
        return self.record

    async def _refuse_taken_name(self) -> None:
        name = self.request.name
        if self.store is not None and self.store.exists(name):
            raise ExitNodeError(
                f"an exit node named {name} is already recorded in {self.store.folder(name)}; "
                f"delete it first ({delete_command(name, self.civo.region)}) or pick another --name"
            )
        for instance in await self.civo.instances():
            if instance.get("hostname") == name:
                raise ExitNodeError(
                    f"region {self.civo.region} already has an instance named {name} "
                    f"(id {instance.get('id')}); pick another --name"
                )

    async def _create_firewall(self, network_id: str) -> None:
        request = self.request
        self.say(f"creating firewall {firewall_name(request.name)}")
        self.record.firewall_name = firewall_name(request.name)
        rules = firewall_rules(
            request.port,
            request.control_port,
            request.allow_ssh_from,
            request.tcp_ports,
            HTTPS_PORT if request.letsencrypt.domains else None,
        )
        self.record.firewall_id = await self.civo.create_firewall(
            firewall_name(request.name), network_id, rules
        )
        self._save()

    async def _create_instance(self, network_id: str, image_id: str, script: str) -> None:
        request = self.request
        config: dict[str, Json] = {
            "hostname": request.name,
            "size": request.size,
            "network_id": network_id,
            "template_id": image_id,
            "firewall_id": self.record.firewall_id,
            "public_ip": "create",
            "initial_user": "civo",
            "count": 1,
            "tags": TAG,
            "script": script,
        }
        if request.ssh_key_id:
            config["ssh_key_id"] = request.ssh_key_id
        self.say(f"creating instance {request.name} ({request.size}, {request.image})")
        try:
            instance = await self.civo.create_instance(config)
        except ExitNodeError:
            await self._remove_firewall_after_failure()
            raise
        self.record.instance_id = instance["id"]
        self._save()

    async def _remove_firewall_after_failure(self) -> None:
        """The instance was refused: its firewall is of no use, so take it away again."""
        firewall_id = self.record.firewall_id
        if firewall_id is None or self.store is None:
            return
        try:
            await self.civo.delete_firewall(firewall_id)
        except ExitNodeError as exc:
            self.say(f"could not delete firewall {self.record.firewall_name} again: {exc}")
            return
        self.record.firewall_id = None
        self._save()

    def _say_what_would_follow(self) -> None:
        request = self.request
        self.say(
            f"then GET /v2/instances/<instance id>?region={self.civo.region} every "
            f"{request.poll_interval_s:g} s until it is ACTIVE with a public IP "
            f"(at most {request.timeout_s:g} s in all),"
        )
        self.say(
            f"then GET https://<public ip>:{request.control_port}/healthz until the exit "
            "server answers with the certificate made for it."
        )

    async def _wait_until_up(self) -> None:
        request = self.request
        deadline = time.monotonic() + request.timeout_s
        self.say(f"waiting for instance {request.name} to be ACTIVE with a public IP")
        assert self.record.instance_id is not None
        ip = await wait_for_public_ip(
            self.civo, self.record.instance_id, deadline, request.poll_interval_s
        )
        self.record.public_ip = ip
        self._save()
        self.say(f"instance {request.name} is ACTIVE at {ip}; waiting for the exit server")
        if request.letsencrypt.domains:
            # The first order goes out as the exit server starts, minutes from now: a
            # record set meanwhile spares the user the wait for the retry.
            self.say(
                f"point the DNS A record of {', '.join(request.letsencrypt.domains)} at {ip} "
                "now (and remove any AAAA record): the exit server asks Let's Encrypt for "
                "its HTTPS certificate as soon as it starts"
            )
        await wait_until_serving(
            ip, request.control_port, self.record.fingerprint, deadline, request.poll_interval_s
        )


async def wait_for_public_ip(
    civo: CivoClient, instance_id: str, deadline: float, interval_s: float
) -> str:
    """Poll the instance until it is ACTIVE with a public IP; return the IP.

    Raises:
        ExitNodeError: it failed, or the deadline passed first (the message
            says whether it was still building or ACTIVE with no public IP).
    """
    while True:
        instance = await civo.instance(instance_id)
        status = str(instance.get("status") or "").upper()
        ip = instance.get("public_ip")
        if status in ("ERROR", "FAILED"):
            raise ExitNodeError(f"Civo reports the instance as {status}")
        if status == "ACTIVE" and ip:
            try:
                return str(ipaddress.ip_address(ip))
            except ValueError:
                raise ExitNodeError("Civo gave the instance a malformed public IP") from None
        if time.monotonic() + interval_s > deadline:
            if status == "ACTIVE":
                raise ExitNodeError(
                    "the instance is ACTIVE but has no public IP: Civo assigned it none in time"
                )
            raise ExitNodeError(f"the instance is still {status or 'not ready'}: timed out")
        await asyncio.sleep(interval_s)


async def list_exit_nodes(civo: CivoClient, store: NodeStore) -> list[list[str]]:
    """Rows of NAME, REGION, STATUS, PUBLIC IP, HTTPS, INSTANCE, FIREWALL, TOKEN FILE.

    Instances tagged ``homeport`` in the region, and the nodes recorded on
    this machine that Civo no longer has. HTTPS is the URLs a node serves
    with a Let's Encrypt certificate, as recorded here, and whether plain
    HTTP is redirected to them (see :func:`https_cell`).

    Raises:
        ExitNodeError: the API failed, or a local record cannot be read.
    """
    firewalls = {str(f.get("id")): str(f.get("name")) for f in await civo.firewalls()}
    records = {record.name: record for record in store.records()}
    rows = []
    for instance in await civo.instances():
        tags = instance.get("tags")
        if not (isinstance(tags, list) and TAG in tags):
            continue
        name = str(instance.get("hostname"))
        record = records.pop(name, None)
        token = str(store.token_path(name)) if record is not None else "-"
        https = https_cell(record) if record is not None else ""
        firewall_id = str(instance.get("firewall_id") or "")
        rows.append(
            [
                name,
                civo.region,
                str(instance.get("status") or "?"),
                str(instance.get("public_ip") or "-"),
                https or "-",
                str(instance.get("id")),
                firewalls.get(firewall_id, firewall_id or "-"),
                token,
            ]
        )
    for record in records.values():
        if record.region == civo.region:
            rows.append(
                [record.name, record.region, "GONE (local record only)", "-", "-", "-", "-", "-"]
            )
    return rows


async def delete_exit_node(
    civo: CivoClient, name: str, store: NodeStore, timeout_s: float, interval_s: float, say: Say
) -> None:
    """Delete a node's instance, then its firewall, then its local files.

    The instance is found by the recorded id, else by host name among the
    instances tagged ``homeport``; the firewall by the recorded id, else by
    the name homeport gives it. Only what homeport made is touched.

    Raises:
        ExitNodeError: nothing by that name exists, or a deletion failed.
    """
    check_name(name)
    record = store.load(name)
    instance_id = await _find_instance(civo, name, record)
    firewall_id = await _find_firewall(civo, name, record)
    if instance_id is None and firewall_id is None:
        if record is None:
            raise ExitNodeError(f"no exit node named {name} in region {civo.region}")
        say(f"Civo has nothing left of {name}; forgetting its local record")
    if instance_id is not None:
        say(f"deleting instance {name} (id {instance_id})")
        await civo.delete_instance(instance_id)
        await _wait_until_gone(civo, instance_id, time.monotonic() + timeout_s, interval_s)
    if firewall_id is not None:
        say(f"deleting firewall {firewall_name(name)} (id {firewall_id})")
        with contextlib.suppress(NotFound):  # gone already: fine
            await civo.delete_firewall(firewall_id)
    store.remove(name)
    say(f"exit node {name} is deleted")


async def _find_instance(civo: CivoClient, name: str, record: NodeRecord | None) -> str | None:
    if record is not None and record.instance_id:
        try:
            return str((await civo.instance(record.instance_id))["id"])
        except NotFound:
            return None
    for instance in await civo.instances():
        if _is_ours(instance, name):
            return str(instance["id"])
    return None


async def _find_firewall(civo: CivoClient, name: str, record: NodeRecord | None) -> str | None:
    wanted = record.firewall_id if record is not None else None
    for firewall in await civo.firewalls():
        if firewall.get("id") == wanted or firewall.get("name") == firewall_name(name):
            return str(firewall["id"])
    return None


async def _wait_until_gone(
    civo: CivoClient, instance_id: str, deadline: float, interval_s: float
) -> None:
    """Civo deletes in the background; a firewall in use cannot be deleted before."""
    while True:
        try:
            await civo.instance(instance_id)
        except NotFound:
            return
        if time.monotonic() + interval_s > deadline:
            raise CivoError(
                f"instance {instance_id} is still there after the deletion was accepted; "
                "run the same delete again in a minute"
            )
        await asyncio.sleep(interval_s)
