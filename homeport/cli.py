"""The ``homeport`` command line: a thin layer mapping options onto config objects.

Every option of ``server`` and ``client`` can also come from an environment
variable (shown in ``--help``) or from a TOML file given with ``--config``;
the command line wins over the environment, and the environment over the file.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from homeport.lean import import_websockets
from tunnel.auth import (
    generate_token,
    load_token,
    parse_token_hash,
    read_secret_file,
    token_digest,
    write_secret_file,
)
from tunnel.errors import ConfigError
from tunnel.log import add_secrets, setup_logging
from tunnel.malloc import keep_freed_buffers, return_free_pages
from tunnel.tls import default_data_dir, ensure_self_signed, parse_fingerprint
from tunnel.version import __version__

F = TypeVar("F", bound=Callable[..., Any])
logger = logging.getLogger("homeport")

_SIZE = re.compile(r"(\d+)\s*([kmgt]?)(i?b?)", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_SOURCE_RANK = {
    ParameterSource.COMMANDLINE: 3,
    ParameterSource.ENVIRONMENT: 2,
    ParameterSource.DEFAULT_MAP: 1,
    ParameterSource.DEFAULT: 0,
}


class Failure(click.ClickException):
    """A configuration the user must fix: printed as one line, exit status 2."""

    exit_code = 2


class RunFailure(Failure):
    """Something at run time stopped us (a port in use): exit status 1."""

    exit_code = 1


def run_async(main: Coroutine[Any, Any, None]) -> None:
    """Run the event loop: uvloop where it is installed, asyncio elsewhere."""
    keep_freed_buffers()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
    else:
        uvloop.run(main)


def settle_memory() -> None:
    """Once a process has started: put what starting it left behind out of the way.

    What is loaded by then (modules, classes, the configuration) lives as long
    as the process: frozen out of the cyclic collector's sight, its full
    collections walk only what the tunnel allocates (they took 20-80 ms on the
    exit server, each a stall for every visitor). What starting freed goes
    back to the kernel (about 1 MiB of the idle RSS).
    """
    gc.collect()
    gc.freeze()
    return_free_pages()


async def _settle_once(ready: Awaitable[None]) -> None:
    await ready
    settle_memory()


def parse_size(text: str) -> int:
    """``10M``, ``512k``, ``1GiB`` or plain bytes.

    Raises:
        ConfigError: not a size.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"{text!r} is not a size (try 10M or 1G)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def _load_config_file(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``--config FILE``: TOML whose keys are the long option names."""
    if value is None:
        return None
    import tomllib  # only here: most runs have no config file (docs/performance.md)

    path = Path(value)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"{path} is not valid TOML: {exc}") from None
    assert ctx.command is not None
    # Keys are the long option names (``upstream``, ``allow-path``), which may
    # differ from the parameters they fill (``upstreams``, ``allow_paths``).
    by_option: dict[str, str] = {}
    for param in ctx.command.params:
        if isinstance(param, click.Option) and param.name and param.name != "config":
            for option in param.opts:
                if option.startswith("--"):
                    by_option[option[2:]] = param.name
    settings: dict[str, Any] = {}
    unknown = []
    for key, item in data.items():
        name = by_option.get(key.replace("_", "-"))
        if name is None:
            unknown.append(key)
        else:
            settings[name] = item
    if unknown:
        valid = ", ".join(sorted(by_option))
        raise click.BadParameter(
            f"{path}: unknown setting(s) {', '.join(sorted(unknown))}; valid settings: {valid}"
        )
    ctx.default_map = {**(ctx.default_map or {}), **settings}
    return value


def common_options(func: F) -> F:
    """Options every long-running command takes."""
    func = click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        default="info",
        show_default=True,
        show_envvar=True,
        envvar="HOMEPORT_LOG_LEVEL",
        help="How much to log.",
    )(func)
    return click.option(
        "--config",
        type=click.Path(dir_okay=False),
        show_envvar=True,
        envvar="HOMEPORT_CONFIG",
        is_eager=True,
        expose_value=False,
        callback=_load_config_file,
        help="TOML file of settings, keyed by long option name (port = 8000).",
    )(func)


def token_options(func: F) -> F:
    func = click.option(
        "--token-file",
        type=click.Path(dir_okay=False, path_type=Path),
        show_envvar=True,
        envvar="HOMEPORT_TOKEN_FILE",
        help="File holding the token (mode 0600).",
    )(func)
    return click.option(
        "--token",
        envvar="HOMEPORT_TOKEN",
        show_envvar=True,
        help="The token itself. Visible in `ps` when given as a flag: prefer "
        "--token-file or HOMEPORT_TOKEN.",
    )(func)


def _rank(ctx: click.Context, name: str) -> int:
    source = ctx.get_parameter_source(name)
    return _SOURCE_RANK.get(source, 0) if source is not None else 0


def _pick(ctx: click.Context, given: dict[str, Any], what: str) -> tuple[str, Any] | None:
    """The one setting among ``given`` from the highest-ranked source.

    Raises:
        ConfigError: two of them come from the same, highest, source.
    """
    present = {name: value for name, value in given.items() if value is not None}
    if not present:
        return None
    best = max(_rank(ctx, name) for name in present)
    tied = [name for name in present if _rank(ctx, name) == best]
    if len(tied) > 1:
        flags = " or ".join("--" + name.replace("_", "-") for name in tied)
        raise ConfigError(f"give only one {what}: {flags}, not both")
    return tied[0], present[tied[0]]


def resolve_token(ctx: click.Context, token: str | None, token_file: Path | None) -> str | None:
    """The token from the highest-ranked of --token and --token-file.

    Raises:
        ConfigError: both given at the same level, or the token is malformed.
    """
    picked = _pick(ctx, {"token": token, "token_file": token_file}, "token source")
    if picked is None:
        return None
    name, value = picked
    if name == "token" and ctx.get_parameter_source("token") is ParameterSource.COMMANDLINE:
        logger.warning(
            "--token on the command line is visible to other users (ps); "
            "prefer --token-file or HOMEPORT_TOKEN"
        )
    return load_token(value if name == "token" else None, value if name == "token_file" else None)


def resolve_server_secret(ctx: click.Context, given: dict[str, Any]) -> bytes:
    """The SHA-256 the server checks tokens against, from a token or its hash.

    Raises:
        ConfigError: none given, two at the same level, or a malformed one.
    """
    picked = _pick(ctx, given, "token source")
    if picked is None:
        raise ConfigError(
            "the exit server needs a token: give --token-file FILE "
            "(make one with `homeport token -o FILE`), set HOMEPORT_TOKEN, "
            "or give only its hash with --token-hash-file"
        )
    name, value = picked
    if name == "token_hash":
        digest = parse_token_hash(value, source="--token-hash")
    elif name == "token_hash_file":
        digest = parse_token_hash(read_secret_file(value, what="token hash"), source=str(value))
    else:
        token = resolve_token(
            ctx,
            given["token"] if name == "token" else None,
            given["token_file"] if name == "token_file" else None,
        )
        assert token is not None
        add_secrets(token)
        digest = token_digest(token)
    add_secrets(digest.hex())
    return digest


def resolve_metrics_secret(
    ctx: click.Context, token_file: Path | None, token_hash: str | None
) -> bytes | None:
    """The SHA-256 of the metrics token, from its file or its hash; None without one.

    Raises:
        ConfigError: both given at the same level, or a malformed one.
    """
    given = {"metrics_token_file": token_file, "metrics_token_hash": token_hash}
    picked = _pick(ctx, given, "metrics token source")
    if picked is None:
        return None
    name, value = picked
    if name == "metrics_token_hash":
        digest = parse_token_hash(value, source="--metrics-token-hash")
    else:
        token = load_token(None, value)
        assert token is not None
        add_secrets(token)
        digest = token_digest(token)
    add_secrets(digest.hex())
    return digest


def bind_failure(exc: OSError, what: str) -> RunFailure:
    if exc.errno == errno.EADDRINUSE:
        return RunFailure(f"cannot listen on {what}: the port is already in use")
    if exc.errno == errno.EACCES:
        return RunFailure(
            f"cannot listen on {what}: permission denied (ports below 1024 need root "
            "or CAP_NET_BIND_SERVICE)"
        )
    return RunFailure(f"cannot listen on {what}: {exc.strerror or exc}")


class _Commands(click.Group):
    """The command group, with ``exit-node`` loaded only when it is used.

    It needs aiohttp, which would otherwise add ~15 MiB to every server and
    client process (docs/performance.md).
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "exit-node"])

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name == "exit-node":
            from homeport.exitnode.cli import exit_node

            return exit_node
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=_Commands,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, prog_name="homeport")
def main() -> None:
    """homeport: a public URL for a machine behind NAT, through a VM you own.

    Run `homeport server` on a VM with a public IP, `homeport client` on the
    machine at home, and browse the VM's address.
    """


@main.command()
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the token to this file (mode 0600) instead of printing it.",
)
def token(output: Path | None) -> None:
    """Print a new random token (256 bits, URL-safe)."""
    value = generate_token()
    if output is None:
        click.echo(value)
        return
    try:
        write_secret_file(output, value)
    except OSError as exc:
        raise RunFailure(f"cannot write {output}: {exc.strerror}") from None
    click.echo(f"wrote a new token to {output}", err=True)


@main.command()
@click.option(
    "--bind", show_envvar=True, envvar="HOMEPORT_BIND", help="Interface to bind. [default: all]"
)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_PORT",
    help="Public HTTP port for visitors.",
)
@click.option(
    "--control-port",
    type=click.IntRange(0, 65535),
    default=8123,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_CONTROL_PORT",
    help="Port clients connect to.",
)
@click.option(
    "--tcp-port",
    "tcp_ports",
    type=click.IntRange(1, 65535),
    multiple=True,
    show_envvar=True,
    envvar="HOMEPORT_TCP_PORT",
    help="A raw TCP port to listen on, each connection carried to the client that "
    "serves it (client --tcp); repeatable.",
)
@token_options
@click.option(
    "--token-hash",
    show_envvar=True,
    envvar="HOMEPORT_TOKEN_HASH",
    metavar="SHA256",
    help="Hold only the token's SHA-256 (64 hex digits) instead of the token.",
)
@click.option(
    "--token-hash-file",
    type=click.Path(dir_okay=False, path_type=Path),
    show_envvar=True,
    envvar="HOMEPORT_TOKEN_HASH_FILE",
    help="File holding the token's SHA-256.",
)
@click.option(
    "--metrics-token-file",
    type=click.Path(dir_okay=False, path_type=Path),
    show_envvar=True,
    envvar="HOMEPORT_METRICS_TOKEN_FILE",
    help="File holding a second token that reads /metrics and /status and opens no "
    "tunnel: give that one to Prometheus.",
)
@click.option(
    "--metrics-token-hash",
    show_envvar=True,
    envvar="HOMEPORT_METRICS_TOKEN_HASH",
    metavar="SHA256",
    help="Hold only the metrics token's SHA-256 instead.",
)
@click.option(
    "--auto-tls",
    is_flag=True,
    show_envvar=True,
    envvar="HOMEPORT_AUTO_TLS",
    help="Serve the control port over TLS with a self-signed certificate made once "
    "in --data-dir; prints its fingerprint for clients to pin.",
)
@click.option(
    "--auto-tls-san",
    "auto_tls_sans",
    multiple=True,
    show_envvar=True,
    envvar="HOMEPORT_AUTO_TLS_SAN",
    metavar="IP_OR_NAME",
    help="Address or name to put in the self-signed certificate. Repeatable.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    show_envvar=True,
    envvar="HOMEPORT_DATA_DIR",
    help="Where the server keeps its TLS key. [default: $STATE_DIRECTORY, "
    "else $XDG_STATE_HOME/homeport, else ~/.local/state/homeport]",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    show_envvar=True,
    envvar="HOMEPORT_TLS_CERT",
    help="A real certificate (PEM chain) for the control port.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, path_type=Path),
    show_envvar=True,
    envvar="HOMEPORT_TLS_KEY",
    help="The private key of --tls-cert.",
)
@click.option(
    "--https-port",
    type=click.IntRange(0, 65535),
    default=443,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_HTTPS_PORT",
    help="Public HTTPS port for visitors, served with --letsencrypt-domain or --https-cert.",
)
@click.option(
    "--letsencrypt-domain",
    "letsencrypt_domains",
    multiple=True,
    show_envvar=True,
    envvar="HOMEPORT_LETSENCRYPT_DOMAIN",
    metavar="NAME",
    help="Get the HTTPS certificate for this name from Let's Encrypt (HTTP-01 on "
    "--port, which must be reachable as port 80) and renew it. Repeatable.",
)
@click.option(
    "--letsencrypt-email",
    show_envvar=True,
    envvar="HOMEPORT_LETSENCRYPT_EMAIL",
    metavar="EMAIL",
    help="Contact address for the CA's notices about the certificate.",
)
@click.option(
    "--letsencrypt-issuer",
    type=click.Choice(["production", "staging"]),
    default="production",
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_LETSENCRYPT_ISSUER",
    help="Let's Encrypt's real CA, or its staging CA (untrusted certificates, "
    "generous rate limits) to try a set-up.",
)
@click.option(
    "--acme-directory",
    show_envvar=True,
    envvar="HOMEPORT_ACME_DIRECTORY",
    metavar="URL",
    help="Another ACME CA's directory URL instead of Let's Encrypt's.",
)
@click.option(
    "--acme-ca-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    show_envvar=True,
    envvar="HOMEPORT_ACME_CA_FILE",
    help="CA certificates (PEM) to trust for the ACME directory's own HTTPS.",
)
@click.option(
    "--https-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    show_envvar=True,
    envvar="HOMEPORT_HTTPS_CERT",
    help="A certificate (PEM chain) for the HTTPS port from elsewhere (certbot, a "
    "wildcard); loaded again when the file changes.",
)
@click.option(
    "--https-key",
    type=click.Path(dir_okay=False, path_type=Path),
    show_envvar=True,
    envvar="HOMEPORT_HTTPS_KEY",
    help="The private key of --https-cert.",
)
@click.option(
    "--https-redirect",
    is_flag=True,
    show_envvar=True,
    envvar="HOMEPORT_HTTPS_REDIRECT",
    help="Answer plain HTTP requests with a redirect (308) to the same URL over HTTPS.",
)
@click.option(
    "--max-auth-failures",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_MAX_AUTH_FAILURES",
    help="Failed logins an address may make per minute before it gets 429.",
)
@click.option(
    "--response-timeout",
    type=click.FloatRange(min=0.1),
    default=70.0,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_RESPONSE_TIMEOUT",
    help="Seconds to wait for an upstream's response head (504 after).",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    default=25.0,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_DRAIN_TIMEOUT",
    help="On SIGTERM, seconds in-flight requests get to finish.",
)
@click.option(
    "--head-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_HEAD_TIMEOUT",
    help="Seconds a visitor has to send a request head (408 after).",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_BODY_TIMEOUT",
    help="Seconds a request body may stall before the connection is closed "
    "(with a 408 if no answer has begun).",
)
@click.option(
    "--send-timeout",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_SEND_TIMEOUT",
    help="Seconds a visitor may leave its response unread (our buffer for it "
    "full) before its connection is dropped.",
)
@click.option(
    "--keepalive-timeout",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_KEEPALIVE_TIMEOUT",
    help="Seconds an idle visitor connection is kept open.",
)
@click.option(
    "--tcp-keepalive",
    type=click.IntRange(min=0, max=32767),  # the kernel's TCP_KEEPIDLE at most
    default=15,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_TCP_KEEPALIVE",
    help="Seconds a visitor connection may be silent before TCP keep-alive "
    "probes it, and between probes; after 9 unanswered it is dropped. 0 for none.",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_MAX_CONNECTIONS",
    help="Open visitor connections at most (503 beyond).",
)
@click.option(
    "--max-connections-per-address",
    type=click.IntRange(min=0),
    default=256,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_MAX_CONNECTIONS_PER_ADDRESS",
    help="Open visitor connections from one address (an IPv6 /64) at most "
    "(429 beyond); 0 for no limit, as behind a CDN or load balancer.",
)
@click.option(
    "--max-streams-per-client",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_MAX_STREAMS_PER_CLIENT",
    help="Concurrent streams to one client at most, all its connections together (503 beyond).",
)
@click.option(
    "--max-body",
    show_envvar=True,
    envvar="HOMEPORT_MAX_BODY",
    help="Largest request body, e.g. 10M (413 above it). [default: no limit]",
)
@click.option(
    "--websocket/--no-websocket",
    default=True,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_WEBSOCKET",
    help="Pass visitors' WebSocket upgrades through to upstreams.",
)
@click.option(
    "--websocket-idle-timeout",
    type=click.FloatRange(min=0),
    default=300.0,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_WEBSOCKET_IDLE_TIMEOUT",
    help="Seconds a passed-through WebSocket may carry nothing either way "
    "before it is closed; 0 for no limit.",
)
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_HEARTBEAT_INTERVAL",
    help="Seconds between heartbeats to each client.",
)
@click.option(
    "--heartbeat-timeout",
    type=click.FloatRange(min=0.2),
    default=20.0,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_HEARTBEAT_TIMEOUT",
    help="A client silent this long is dropped.",
)
@common_options
@click.pass_context
def server(
    ctx: click.Context,
    bind: str | None,
    port: int,
    control_port: int,
    tcp_ports: tuple[int, ...],
    token: str | None,
    token_file: Path | None,
    token_hash: str | None,
    token_hash_file: Path | None,
    metrics_token_file: Path | None,
    metrics_token_hash: str | None,
    auto_tls: bool,
    auto_tls_sans: tuple[str, ...],
    data_dir: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    https_port: int,
    letsencrypt_domains: tuple[str, ...],
    letsencrypt_email: str | None,
    letsencrypt_issuer: str,
    acme_directory: str | None,
    acme_ca_file: Path | None,
    https_cert: Path | None,
    https_key: Path | None,
    https_redirect: bool,
    max_auth_failures: int,
    response_timeout: float,
    drain_timeout: float,
    head_timeout: float,
    body_timeout: float,
    send_timeout: float,
    keepalive_timeout: float,
    tcp_keepalive: int,
    max_connections: int,
    max_connections_per_address: int,
    max_streams_per_client: int,
    max_body: str | None,
    websocket: bool,
    websocket_idle_timeout: float,
    heartbeat_interval: float,
    heartbeat_timeout: float,
    log_level: str,
) -> None:
    """Run the exit server (on the VM with the public IP)."""
    import_websockets()  # first: without the 2.7 MiB it would bring and not use
    from server.app import ExitServer
    from server.config import ServerConfig, tcp_ports_problem

    setup_logging(log_level)
    try:
        digest = resolve_server_secret(
            ctx,
            {
                "token": token,
                "token_file": token_file,
                "token_hash": token_hash,
                "token_hash_file": token_hash_file,
            },
        )
        metrics_digest = resolve_metrics_secret(ctx, metrics_token_file, metrics_token_hash)
        if metrics_digest == digest:
            raise ConfigError(
                "the metrics token must not be the tunnel token (make another with "
                "`homeport token -o FILE`)"
            )
        tls_fingerprint = None
        if auto_tls:
            if tls_cert or tls_key:
                raise ConfigError("give --auto-tls or --tls-cert/--tls-key, not both")
            certificate = ensure_self_signed(data_dir or default_data_dir(), list(auto_tls_sans))
            tls_cert, tls_key, tls_fingerprint = (
                certificate.cert_path,
                certificate.key_path,
                certificate.fingerprint,
            )
            verb = "made a new" if certificate.created else "using the"
            logger.info("%s self-signed TLS certificate %s", verb, certificate.cert_path)
            missing = set(auto_tls_sans) - set(certificate.sans)
            if missing:
                logger.warning(
                    "the certificate does not name %s (it was made earlier; pinned clients do "
                    "not mind; delete %s and its key to make a new one)",
                    ", ".join(sorted(missing)),
                    certificate.cert_path,
                )
        elif (tls_cert is None) != (tls_key is None):
            raise ConfigError("--tls-cert and --tls-key go together")
        https = https_options(
            domains=letsencrypt_domains,
            email=letsencrypt_email,
            issuer=letsencrypt_issuer,
            directory=acme_directory,
            ca_file=acme_ca_file,
            cert=https_cert,
            key=https_key,
        )
        served_https_port = https_port if https else None
        if https_redirect and not https:
            raise ConfigError("--https-redirect needs HTTPS: --letsencrypt-domain or --https-cert")
        problem = tcp_ports_problem(tcp_ports, port, control_port, served_https_port)
        if problem is not None:
            raise ConfigError(problem)
        if letsencrypt_domains and port != 80 and not acme_directory:
            logger.warning(
                "Let's Encrypt checks --letsencrypt-domain on port 80, and --port is %d: "
                "forward the VM's port 80 to it, or give --port 80",
                port,
            )
        config = ServerConfig(
            token_digest=digest,
            metrics_token_digest=metrics_digest,
            bind=bind or None,
            port=port,
            control_port=control_port,
            tcp_ports=tcp_ports,
            response_timeout_s=response_timeout,
            head_timeout_s=head_timeout,
            body_timeout_s=body_timeout,
            send_timeout_s=send_timeout,
            keepalive_timeout_s=keepalive_timeout,
            tcp_keepalive_s=tcp_keepalive or None,
            drain_timeout_s=drain_timeout,
            max_connections=max_connections,
            max_connections_per_address=max_connections_per_address,
            max_streams_per_client=max_streams_per_client,
            max_body_bytes=parse_size(max_body) if max_body else None,
            websocket_passthrough=websocket,
            websocket_idle_timeout_s=websocket_idle_timeout or None,
            heartbeat_interval_s=heartbeat_interval,
            heartbeat_timeout_s=heartbeat_timeout,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_fingerprint=tls_fingerprint,
            advertised_host=auto_tls_sans[0] if auto_tls_sans else None,
            token_file_hint=str(token_file.resolve()) if token_file else None,
            max_auth_failures=max_auth_failures,
            https_port=https_port,
            https_redirect=https_redirect,
            data_dir=data_dir,
            **https,
        )
    except ConfigError as exc:
        raise Failure(str(exc)) from None

    async def serve() -> None:
        exit_server = ExitServer(config)
        try:
            await exit_server.start()
        except ConfigError as exc:
            raise Failure(str(exc)) from None
        except OSError as exc:
            listened = (port, served_https_port, *tcp_ports)
            ports = ", ".join(str(p) for p in listened if p is not None)
            raise bind_failure(exc, f"port {ports} or {control_port}") from None
        settle_memory()
        await exit_server.serve_until_signalled()

    run_async(serve())


def https_options(
    *,
    domains: tuple[str, ...],
    email: str | None,
    issuer: str,
    directory: str | None,
    ca_file: Path | None,
    cert: Path | None,
    key: Path | None,
) -> dict[str, Any]:
    """The ServerConfig fields of the HTTPS options; none when HTTPS is not asked for.

    Raises:
        ConfigError: options that do not go together, a name no CA would
            certify over HTTP-01, an email or directory URL that is not one.
    """
    from server.certificates import (
        LETSENCRYPT,
        LETSENCRYPT_STAGING,
        domain_problem,
        email_problem,
    )

    if (cert is None) != (key is None):
        raise ConfigError("--https-cert and --https-key go together")
    if cert is not None:
        if domains:
            raise ConfigError("give --letsencrypt-domain or --https-cert/--https-key, not both")
        return {"https_cert": cert, "https_key": key}
    if not domains:
        for value, option in (
            (email, "--letsencrypt-email"),
            (directory, "--acme-directory"),
            (ca_file, "--acme-ca-file"),
        ):
            if value:
                raise ConfigError(f"{option} goes with --letsencrypt-domain")
        return {}
    names = tuple(dict.fromkeys(name.strip().lower().rstrip(".") for name in domains))
    for name in names:
        problem = domain_problem(name)
        if problem is not None:
            raise ConfigError(f"--letsencrypt-domain {problem}")
    if email is not None:
        problem = email_problem(email)
        if problem is not None:
            raise ConfigError(problem)
    if directory is not None and not directory.startswith("https://"):
        raise ConfigError(f"--acme-directory {directory!r}: an ACME directory is an https:// URL")
    return {
        "acme_domains": names,
        "acme_email": email,
        "acme_directory": directory
        or (LETSENCRYPT_STAGING if issuer == "staging" else LETSENCRYPT),
        "acme_ca_file": ca_file,
    }


@main.command()
@click.option(
    "--url",
    show_envvar=True,
    envvar="HOMEPORT_URL",
    required=True,
    help="The exit server's control endpoint, e.g. wss://203.0.113.10:8123.",
)
@token_options
@click.option(
    "--upstream",
    "upstreams",
    multiple=True,
    show_envvar=True,
    envvar="HOMEPORT_UPSTREAM",
    metavar="[HOST=]URL",
    help="A LAN service to serve: http://127.0.0.1:8080 for every host, or "
    "fn.example.com=http://127.0.0.1:8080 for one. Repeatable.",
)
@click.option(
    "--tcp",
    "tcp_upstreams",
    multiple=True,
    show_envvar=True,
    envvar="HOMEPORT_TCP",
    metavar="PORT=ADDRESS:PORT",
    help="Serve the exit server's raw TCP port PORT (its --tcp-port) from this LAN "
    "address, e.g. 2222=127.0.0.1:22. Repeatable.",
)
@click.option(
    "--proxy-protocol",
    "proxy_protocol",
    multiple=True,
    show_envvar=True,
    envvar="HOMEPORT_PROXY_PROTOCOL",
    metavar="PORT=v1|v2",
    help="Open each connection to this --tcp port's upstream with a PROXY protocol header "
    "(v1 text, v2 binary) naming the visitor, for servers that read it (nginx, HAProxy, "
    "Caddy, Postfix). Repeatable.",
)
@click.option(
    "--rewrite-host",
    "rewrite_hosts",
    multiple=True,
    show_envvar=True,
    envvar="HOMEPORT_REWRITE_HOST",
    metavar="ROUTE",
    help="Send the upstream's own host:port as Host for this route "
    "(a route host, or 'default'). Repeatable.",
)
@click.option(
    "--allow-path",
    "allow_paths",
    multiple=True,
    show_envvar=True,
    envvar="HOMEPORT_ALLOW_PATH",
    metavar="ROUTE=PREFIX",
    help="Make only PREFIX of this route public, e.g. default=/function/ for a faasd "
    "gateway (others get 403 at the exit server). Repeatable.",
)
@click.option(
    "--name",
    show_envvar=True,
    envvar="HOMEPORT_NAME",
    help="This client's name; a new session with the same name replaces the old. "
    "[default: the host name]",
)
@click.option(
    "--upstream-connect-timeout",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_UPSTREAM_CONNECT_TIMEOUT",
    help="Seconds to wait for an upstream to accept a connection.",
)
@click.option(
    "--connections",
    type=click.IntRange(1, 8),
    default=1,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_CONNECTIONS",
    help="Websocket connections to keep to the exit server; requests go to the least busy. "
    "Over a lossy uplink, 2 keep a download from holding back other visitors.",
)
@click.option(
    "--max-streams",
    type=click.IntRange(min=1),
    default=16384,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_MAX_STREAMS",
    help="Concurrent streams the exit server may open to this client, per connection.",
)
@click.option(
    "--heartbeat-interval",
    type=click.FloatRange(min=0.1),
    default=10.0,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_HEARTBEAT_INTERVAL",
    help="Seconds between heartbeats to the server.",
)
@click.option(
    "--heartbeat-timeout",
    type=click.FloatRange(min=0.2),
    default=20.0,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_HEARTBEAT_TIMEOUT",
    help="Reconnect when the server is silent this long.",
)
@click.option(
    "--handshake-timeout",
    type=click.FloatRange(min=1),
    default=10.0,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_HANDSHAKE_TIMEOUT",
    help="Seconds to open the connection to the exit server (TCP, TLS and the "
    "websocket handshake together); raise it on links whose round trips take seconds.",
)
@click.option(
    "--reconnect-max-delay",
    type=click.FloatRange(min=1),
    default=30.0,
    show_default=True,
    show_envvar=True,
    envvar="HOMEPORT_RECONNECT_MAX_DELAY",
    help="Longest wait between reconnect attempts, in seconds.",
)
@click.option(
    "--fingerprint",
    show_envvar=True,
    envvar="HOMEPORT_FINGERPRINT",
    metavar="sha256:HEX",
    help="Pin the exit server's certificate (as it prints it at start); wss:// only.",
)
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, path_type=Path),
    show_envvar=True,
    envvar="HOMEPORT_CA_FILE",
    help="Trust this CA (PEM) for the server's certificate instead of the system's.",
)
@click.option(
    "--insecure",
    is_flag=True,
    show_envvar=True,
    envvar="HOMEPORT_INSECURE",
    help="Allow ws:// to a server that is not on this machine (the token travels in clear).",
)
@common_options
@click.pass_context
def client(
    ctx: click.Context,
    url: str,
    token: str | None,
    token_file: Path | None,
    upstreams: tuple[str, ...],
    tcp_upstreams: tuple[str, ...],
    proxy_protocol: tuple[str, ...],
    rewrite_hosts: tuple[str, ...],
    allow_paths: tuple[str, ...],
    name: str | None,
    upstream_connect_timeout: float,
    connections: int,
    max_streams: int,
    heartbeat_interval: float,
    heartbeat_timeout: float,
    handshake_timeout: float,
    reconnect_max_delay: float,
    fingerprint: str | None,
    ca_file: Path | None,
    insecure: bool,
    log_level: str,
) -> None:
    """Run the client (on the machine at home): dial out and serve LAN upstreams."""
    import_websockets()  # first: without the 2.7 MiB it would bring and not use
    from client.app import TunnelClient
    from client.config import ClientConfig, control_url, default_client_name
    from client.upstreams import parse_upstreams
    from server.registry import valid_client_name

    setup_logging(log_level)
    try:
        secret = resolve_token(ctx, token, token_file)
        if secret is None:
            raise ConfigError("the client needs the server's token: give --token-file FILE")
        add_secrets(secret)
        client_name = name or default_client_name()
        if not valid_client_name(client_name):
            raise ConfigError(
                f"--name {client_name!r} must be 1-63 letters, digits, '.', '_' or '-'"
            )
        control_url(url, insecure=insecure)
        pin = parse_fingerprint(fingerprint) if fingerprint else None
        if (pin or ca_file) and not url.strip().lower().startswith("wss://"):
            raise ConfigError("--fingerprint and --ca-file need a wss:// --url")
        if pin and ca_file:
            raise ConfigError("give --fingerprint or --ca-file, not both")
        config = ClientConfig(
            url=url,
            token=secret,
            upstreams=parse_upstreams(
                upstreams,
                frozenset(r.lower().removesuffix(".") for r in rewrite_hosts),
                allow_paths,
                tcp_upstreams,
                proxy_protocol,
            ),
            name=client_name,
            upstream_connect_timeout_s=upstream_connect_timeout,
            connections=connections,
            max_streams=max_streams,
            heartbeat_interval_s=heartbeat_interval,
            heartbeat_timeout_s=heartbeat_timeout,
            insecure=insecure,
            handshake_timeout_s=handshake_timeout,
            reconnect_max_delay_s=reconnect_max_delay,
            fingerprint=pin,
            ca_file=ca_file,
        )
    except ConfigError as exc:
        raise Failure(str(exc)) from None

    async def connect() -> None:
        tunnel_client = TunnelClient(config)
        settle = asyncio.create_task(_settle_once(tunnel_client.wait_connected()))
        try:
            await tunnel_client.run_until_signalled()
        finally:
            settle.cancel()

    run_async(connect())


@main.command()
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Public port of the demo exit server (0 picks a free one).",
)
@click.option(
    "--control-port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="Control port of the demo exit server (0 picks a free one).",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default="info",
    show_default=True,
)
def demo(port: int, control_port: int, log_level: str) -> None:
    """Run an exit server, a client and a sample upstream on this machine."""
    import_websockets()
    from homeport.demo import run_demo

    setup_logging(log_level)
    try:
        run_async(run_demo(port=port, control_port=control_port))
    except OSError as exc:
        raise bind_failure(exc, f"port {port}") from None
    except KeyboardInterrupt:  # pragma: no cover - the demo handles SIGINT itself
        sys.exit(130)
