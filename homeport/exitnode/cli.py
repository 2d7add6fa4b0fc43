"""``homeport exit-node``: stand up, list and delete exit servers on a cloud VM.

A thin layer: options become a :class:`CreateRequest` and the flows of
:mod:`homeport.exitnode.provision` do the work. Every :class:`ExitNodeError`
is printed as one message (no traceback) with exit status 1; secrets are
never printed: the token stays in its 0600 file, and the command says where.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import textwrap
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, TypeVar

import aiohttp
import click
from click.core import ParameterSource

from homeport.exitnode.civo import DEFAULT_API_URL, CivoClient, DryRunTransport, HttpTransport
from homeport.exitnode.errors import ExitNodeError
from homeport.exitnode.material import NodeSecrets, generate_secrets
from homeport.exitnode.provision import (
    CreateRequest,
    Creation,
    check_cidr,
    delete_command,
    delete_exit_node,
    https_urls,
    list_exit_nodes,
)
from homeport.exitnode.ready import host_for_url
from homeport.exitnode.render import (
    HTTPS_PORT,
    INSTALL_CLIENT,
    ISSUERS,
    LetsEncrypt,
    NodeSettings,
    bootstrap_script,
    check_package,
    check_tcp_ports,
    cloud_config,
    template,
)
from homeport.exitnode.store import NodeRecord, NodeStore, check_name, default_config_dir
from server.certificates import CHECK_INTERVAL_S, RETRY_FIRST_S
from tunnel.auth import read_secret_file, write_secret_file
from tunnel.errors import ConfigError
from tunnel.log import add_secrets
from tunnel.version import __version__

T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_REGION: Final = "lon1"
DEFAULT_SIZE: Final = "g3.xsmall"
DEFAULT_IMAGE: Final = "ubuntu-noble"
DEFAULT_NAME: Final = "exit"
DEFAULT_UPSTREAM: Final = "http://127.0.0.1:8080"
PI_ADDRESS: Final = "pi@raspberrypi.local"


class CommandFailed(click.ClickException):
    """An exit-node command could not do its job: the message, then exit status 1."""

    exit_code = 1


def _run(flow: Coroutine[Any, Any, T]) -> T:
    """Run a flow; turn its errors into one printed message."""
    try:
        return asyncio.run(flow)
    except ExitNodeError as exc:
        raise CommandFailed(str(exc)) from None


def _name(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return check_name(value)
    except ExitNodeError as exc:
        raise click.BadParameter(str(exc)) from None


def _cidrs(_ctx: click.Context, _param: click.Parameter, value: tuple[str, ...]) -> tuple[str, ...]:
    try:
        return tuple(check_cidr(item) for item in value)
    except ExitNodeError as exc:
        raise click.BadParameter(str(exc)) from None


def _package(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str:
    if value is None:
        if "unknown" in __version__:
            raise click.BadParameter(
                "this homeport has no release version; give --package homeport==VERSION"
            )
        value = f"homeport=={__version__}"
    try:
        return check_package(value)
    except ExitNodeError as exc:
        raise click.BadParameter(str(exc)) from None


def api_options(func: F) -> F:
    """How to reach the Civo API: key, URL, region."""
    func = click.option(
        "--region",
        default=DEFAULT_REGION,
        show_default=True,
        envvar="CIVO_REGION",
        show_envvar=True,
        help="Civo region.",
    )(func)
    func = click.option(
        "--api-url",
        default=DEFAULT_API_URL,
        show_default=True,
        envvar="CIVO_API_URL",
        show_envvar=True,
        help="The Civo API to talk to.",
    )(func)
    return click.option(
        "--api-key-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="File holding your Civo API key. [default: the CIVO_TOKEN environment variable]",
    )(func)


def port_options(func: F) -> F:
    """The exit server's ports: public, control, and the raw TCP ones."""
    func = click.option(
        "--tcp-port",
        "tcp_ports",
        type=click.IntRange(1, 65535),
        multiple=True,
        metavar="PORT",
        help="A raw TCP port the exit server carries to the Pi (install-client.sh "
        "--tcp PORT=ADDRESS:PORT there), open to anyone. Repeatable. [default: none]",
    )(func)
    func = click.option(
        "--control-port",
        type=click.IntRange(1, 65535),
        default=8123,
        show_default=True,
        help="Port tunnel clients connect to (TLS).",
    )(func)
    return click.option(
        "--port",
        type=click.IntRange(1, 65535),
        default=80,
        show_default=True,
        help="Public HTTP port for visitors.",
    )(func)


def letsencrypt_options(func: F) -> F:
    """HTTPS for visitors, with a certificate the exit server gets from Let's Encrypt."""
    func = click.option(
        "--https-redirect",
        is_flag=True,
        help="Answer visitors' plain HTTP requests with a redirect (308) to the same URL "
        "over HTTPS (Let's Encrypt's checks excepted). Needs --letsencrypt-domain. "
        "[default: plain HTTP served too]",
    )(func)
    func = click.option(
        "--letsencrypt-issuer",
        type=click.Choice(ISSUERS),
        default=ISSUERS[0],
        show_default=True,
        help="Let's Encrypt's real CA, or its staging CA (untrusted certificates, "
        "generous rate limits) to try a set-up.",
    )(func)
    func = click.option(
        "--letsencrypt-email",
        metavar="EMAIL",
        help="Contact address for Let's Encrypt's notices about the certificate.",
    )(func)
    return click.option(
        "--letsencrypt-domain",
        "letsencrypt_domains",
        multiple=True,
        metavar="NAME",
        help=f"Serve visitors over HTTPS on port {HTTPS_PORT} too, with a certificate for "
        "this name that the exit server gets from Let's Encrypt and renews (point the "
        "name's DNS at the node's IP; needs --port 80). Repeatable. [default: no HTTPS]",
    )(func)


def _api_key(api_key_file: Path | None) -> str:
    """The API key from --api-key-file, else CIVO_TOKEN; registered as a secret for logs."""
    try:
        if api_key_file is not None:
            key = read_secret_file(api_key_file, what="Civo API key")
        else:
            key = os.environ.get("CIVO_TOKEN", "").strip()
    except ConfigError as exc:
        raise CommandFailed(str(exc)) from None
    if not key:
        raise CommandFailed(
            "no Civo API key: give --api-key-file FILE or set CIVO_TOKEN "
            "(the key is in the Civo dashboard, under Settings, Profile, Security)"
        )
    if not key.isascii() or not key.isprintable() or " " in key:
        raise CommandFailed("the Civo API key has spaces or control characters")
    add_secrets(key)
    return key


@asynccontextmanager
async def civo_client(api_url: str, api_key: str, region: str) -> AsyncIterator[CivoClient]:
    """A client of the real API for the duration of one command."""
    async with aiohttp.ClientSession() as session:
        yield CivoClient(HttpTransport(session, api_url, api_key), region)


def _progress(message: str) -> None:
    click.echo(message, err=True)


def _store(ctx: click.Context) -> NodeStore:
    store = ctx.find_object(NodeStore)
    assert store is not None
    return store


@click.group("exit-node")
@click.option(
    "--config-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="HOMEPORT_CONFIG_DIR",
    show_envvar=True,
    help="Where each node's token and record are kept. [default: ~/.config/homeport]",
)
@click.pass_context
def exit_node(ctx: click.Context, config_dir: Path | None) -> None:
    """Create, list and delete exit servers on a cloud VM (Civo).

    `create` makes the VM, its firewall and the exit server in one command
    and prints the one command to run on the Pi.
    """
    ctx.obj = NodeStore(config_dir or default_config_dir())


@exit_node.command()
@click.option(
    "--provider", type=click.Choice(["civo"]), default="civo", show_default=True, help="Cloud."
)
@click.option(
    "--name",
    default=DEFAULT_NAME,
    show_default=True,
    callback=_name,
    help="The node's name, also the VM's host name.",
)
@api_options
@click.option("--size", default=DEFAULT_SIZE, show_default=True, help="Civo instance size.")
@click.option(
    "--image",
    default=DEFAULT_IMAGE,
    show_default=True,
    help="Disk image name (a Debian or Ubuntu with Python 3.11 or newer).",
)
@port_options
@letsencrypt_options
@click.option(
    "--allow-ssh-from",
    multiple=True,
    callback=_cidrs,
    metavar="CIDR",
    help="Open SSH (22) to this network only, e.g. 203.0.113.7/32. Repeatable. "
    "[default: SSH closed]",
)
@click.option("--ssh-key-id", help="Id of a Civo SSH key to install for the user civo.")
@click.option(
    "--package",
    callback=_package,
    metavar="SPEC",
    help="What the VM installs with pip. [default: homeport==THIS VERSION]",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=900.0,
    show_default=True,
    help="Seconds to wait for the VM and its exit server, in all.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.01),
    default=5.0,
    show_default=True,
    help="Seconds between two checks while waiting.",
)
@click.option("--dry-run", is_flag=True, help="Print every API call (secrets redacted); make none.")
@click.pass_context
def create(
    ctx: click.Context,
    provider: str,
    name: str,
    api_key_file: Path | None,
    api_url: str,
    region: str,
    size: str,
    image: str,
    port: int,
    control_port: int,
    tcp_ports: tuple[int, ...],
    letsencrypt_domains: tuple[str, ...],
    letsencrypt_email: str | None,
    letsencrypt_issuer: str,
    https_redirect: bool,
    allow_ssh_from: tuple[str, ...],
    ssh_key_id: str | None,
    package: str,
    timeout: float,
    poll_interval: float,
    dry_run: bool,
) -> None:
    """Create an exit node: a VM running the exit server, behind its own firewall."""
    request = CreateRequest(
        name=name,
        region=region,
        size=size,
        image=image,
        port=port,
        control_port=control_port,
        allow_ssh_from=allow_ssh_from,
        ssh_key_id=ssh_key_id,
        package=package,
        timeout_s=timeout,
        poll_interval_s=poll_interval,
        tcp_ports=tcp_ports,
        letsencrypt=LetsEncrypt(
            letsencrypt_domains, letsencrypt_email, letsencrypt_issuer, https_redirect
        ),
    )
    try:
        request = request.checked()  # before the API key is even looked for
    except ExitNodeError as exc:
        raise CommandFailed(str(exc)) from None
    store = _store(ctx)
    secrets = generate_secrets(name)
    add_secrets(secrets.token)
    if dry_run:
        _dry_run(request, secrets, store, api_url)
        return
    key = _api_key(api_key_file)

    async def flow() -> NodeRecord:
        async with civo_client(api_url, key, region) as civo:
            return await Creation(civo, request, secrets, store, _progress).run()

    record = _run(flow())
    click.echo(ready_message(record, store))


def _dry_run(request: CreateRequest, secrets: NodeSecrets, store: NodeStore, api_url: str) -> None:
    click.echo(
        "dry run: the Civo API calls `homeport exit-node create` would make; "
        "none is made and no file is written."
    )
    click.echo(f"Each goes to {api_url} with the header Authorization: bearer <redacted>.")
    click.echo("")
    civo = CivoClient(DryRunTransport(click.echo, request.image), request.region)
    _run(Creation(civo, request, secrets, None, click.echo).run())
    if store.exists(request.name):
        click.echo(f"(a node named {request.name} is already recorded here: create would refuse)")


def pi_command(record: NodeRecord, host: str, upstream: str = DEFAULT_UPSTREAM) -> str:
    """The command that installs the client on the Pi, with the token file beside it."""
    args = [
        "sudo", "bash", INSTALL_CLIENT,
        "--url", f"wss://{host}:{record.control_port}",
        "--fingerprint", record.fingerprint,
        "--token-file", "token",
        "--upstream", upstream,
    ]  # fmt: skip
    return shlex.join(args) + " && rm token"


def _pi_instructions(record: NodeRecord, store: NodeStore, host: str) -> list[str]:
    folder = store.folder(record.name)
    copy = shlex.join(
        ["scp", str(folder / "token"), str(folder / INSTALL_CLIENT), f"{PI_ADDRESS}:"]
    )
    lines = [
        "On the Pi, install the client: copy the token and the installer there",
        f"  {copy}",
        "then run, on the Pi:",
        f"  {pi_command(record, host)}",
        "(for a faasd gateway, add --allow-path default=/function/ "
        "--allow-path default=/async-function/ before the &&)",
    ]
    if record.tcp_ports:
        lines.append(
            f"(to serve the raw TCP {_ports(record.tcp_ports)}, add --tcp PORT=ADDRESS:PORT "
            f"for each before the &&, e.g. --tcp {record.tcp_ports[0]}=127.0.0.1:22)"
        )
    return lines


def _ports(ports: tuple[int, ...]) -> str:
    """``port 2222`` or ``ports 2222, 5432``."""
    return ("port " if len(ports) == 1 else "ports ") + ", ".join(str(port) for port in ports)


def _https_lines(record: NodeRecord, ip: str) -> list[str]:
    """Where visitors get HTTPS, and what it waits for: the names' DNS naming the node.

    With the redirect, plain HTTP waits for it too: every visitor is sent to HTTPS.
    """
    if not record.letsencrypt_domains:
        return []
    urls = ", ".join(https_urls(record.letsencrypt_domains))
    ca = "Let's Encrypt"
    if record.letsencrypt_issuer == "staging":
        ca = "Let's Encrypt's staging CA (browsers do not trust it)"
    redirect = (
        "Plain HTTP is answered with a redirect (308) to the same URL over HTTPS (Let's "
        "Encrypt's checks excepted), so visitors wait for the certificate too. "
        if record.https_redirect
        else ""
    )
    text = (
        f"HTTPS: {urls} with a certificate from {ca}, once the DNS A record of "
        f"{', '.join(record.letsencrypt_domains)} is {ip}. {redirect}"
        "The exit server asks as it starts "
        f"and, until it has the certificate, again {RETRY_FIRST_S / 60:.0f} minutes later, "
        f"then twice as long each time, up to {CHECK_INTERVAL_S / 3600:.0f} hours apart "
        "(`sudo systemctl reload homeport-exit` on the VM asks at once)."
    )
    return textwrap.wrap(
        text, width=88, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False
    )


def ready_message(record: NodeRecord, store: NodeStore) -> str:
    """What `create` prints once the node serves: where, the pin, and the Pi's command."""
    assert record.public_ip is not None
    host = host_for_url(record.public_ip)
    public = f"http://{host}/" if record.port == 80 else f"http://{host}:{record.port}/"
    browse = public
    if record.letsencrypt_domains:
        # Redirected, http://IP/ would lead to https://IP/, which no certificate names.
        browse = f"https://{record.letsencrypt_domains[0]}/"
        if not record.https_redirect:
            browse += f" (or {public})"
    lines = [
        f"exit node {record.name} is ready: visitors on {public}, "
        f"clients on wss://{host}:{record.control_port}",
        *_https_lines(record, record.public_ip),
        *([f"raw TCP {_ports(record.tcp_ports)} on {host}"] if record.tcp_ports else []),
        f"control port certificate: {record.fingerprint}",
        f"token: {store.token_path(record.name)} (mode 0600; it is not printed)",
        "",
        *_pi_instructions(record, store, host),
        "",
        f"Then browse {browse}",
        f"Delete it all with: {delete_command(record.name, record.region)}",
    ]
    return "\n".join(lines)


@exit_node.command("list")
@api_options
@click.pass_context
def list_(ctx: click.Context, api_key_file: Path | None, api_url: str, region: str) -> None:
    """List the exit nodes homeport created in a region."""
    store = _store(ctx)
    key = _api_key(api_key_file)

    async def flow() -> list[list[str]]:
        async with civo_client(api_url, key, region) as civo:
            return await list_exit_nodes(civo, store)

    rows = _run(flow())
    if not rows:
        click.echo(f"no exit node made by homeport in region {region}")
        return
    header = [
        "NAME", "REGION", "STATUS", "PUBLIC IP", "HTTPS", "INSTANCE ID", "FIREWALL", "TOKEN FILE"
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


@exit_node.command()
@click.argument("name", callback=_name)
@api_options
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=300.0,
    show_default=True,
    help="Seconds to wait for Civo to remove the instance before its firewall can go.",
)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.01),
    default=3.0,
    show_default=True,
    help="Seconds between two checks while waiting.",
)
@click.pass_context
def delete(
    ctx: click.Context,
    name: str,
    api_key_file: Path | None,
    api_url: str,
    region: str,
    timeout: float,
    poll_interval: float,
) -> None:
    """Delete exit node NAME: its instance, its firewall and its local files (token too)."""
    store = _store(ctx)
    try:
        record = store.load(name)
    except ExitNodeError as exc:
        raise CommandFailed(str(exc)) from None
    if record is not None and record.provider != "civo":
        store.remove(name)
        click.echo(f"forgot exit node {name}; delete its VM at your provider yourself")
        return
    if record is not None and ctx.get_parameter_source("region") is ParameterSource.DEFAULT:
        region = record.region  # where it was made, unless told otherwise
    key = _api_key(api_key_file)

    async def flow() -> None:
        async with civo_client(api_url, key, region) as civo:
            await delete_exit_node(civo, name, store, timeout, poll_interval, _progress)

    _run(flow())


@exit_node.command()
@click.option(
    "--name",
    default=DEFAULT_NAME,
    show_default=True,
    callback=_name,
    help="The node's name (for its local files).",
)
@click.option(
    "--format",
    "form",
    type=click.Choice(["cloud-config", "script"]),
    default="cloud-config",
    show_default=True,
    help="cloud-init's #cloud-config, or a first-boot shell script.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="File to write (mode 0600: it holds the TLS key).",
)
@port_options
@letsencrypt_options
@click.option(
    "--package",
    callback=_package,
    metavar="SPEC",
    help="What the VM installs with pip. [default: homeport==THIS VERSION]",
)
@click.pass_context
def userdata(
    ctx: click.Context,
    name: str,
    form: str,
    output: Path,
    port: int,
    control_port: int,
    tcp_ports: tuple[int, ...],
    letsencrypt_domains: tuple[str, ...],
    letsencrypt_email: str | None,
    letsencrypt_issuer: str,
    https_redirect: bool,
    package: str,
) -> None:
    """Write first-boot user data for a VM at any provider (cloud-init or a script).

    Makes the node's token and TLS certificate like `create` does; give the
    file to your provider when you create the VM, open --port,
    --control-port, every --tcp-port (and 443 with --letsencrypt-domain) in
    its firewall, then delete the file.
    """
    store = _store(ctx)
    try:
        check_tcp_ports(tcp_ports, port, control_port)
        letsencrypt = LetsEncrypt(
            letsencrypt_domains, letsencrypt_email, letsencrypt_issuer, https_redirect
        ).checked(port, control_port, tcp_ports)
    except ExitNodeError as exc:
        raise CommandFailed(str(exc)) from None
    if store.exists(name):
        raise CommandFailed(f"an exit node named {name} is already recorded; pick another --name")
    secrets = generate_secrets(name)
    settings = NodeSettings(
        package,
        port,
        control_port,
        secrets.token_hash,
        secrets.tls_cert_pem,
        secrets.tls_key_pem,
        tcp_ports,
        letsencrypt,
    )
    try:
        text = cloud_config(settings) if form == "cloud-config" else bootstrap_script(settings)
        record = NodeRecord(
            name,
            "manual",
            "-",
            port,
            control_port,
            secrets.fingerprint,
            tcp_ports=tcp_ports,
            letsencrypt_domains=letsencrypt.domains,
            letsencrypt_issuer=letsencrypt.issuer,
            https_redirect=letsencrypt.https_redirect,
        )
        store.save_new(record, secrets.token, secrets.tls_cert_pem, template(INSTALL_CLIENT))
        write_secret_file(output, text.rstrip("\n"))
    except ExitNodeError as exc:
        raise CommandFailed(str(exc)) from None
    except OSError as exc:
        raise CommandFailed(f"cannot write {output}: {exc.strerror}") from None
    click.echo(f"wrote {output} (mode 0600; it holds the TLS key: delete it once the VM is up)")
    click.echo(f"control port certificate: {record.fingerprint}")
    click.echo(f"token: {store.token_path(name)} (mode 0600; it is not printed)")
    click.echo("")
    click.echo("\n".join(_pi_instructions(record, store, "PUBLIC_IP")))
    if letsencrypt.domains:
        click.echo("")
        click.echo("\n".join(_https_lines(record, "PUBLIC_IP")))
