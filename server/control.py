"""The control endpoint: where clients dial in, are authenticated and get a session.

Everything is decided before the websocket upgrade, in the HTTP handshake
(docs/security.md): a token in the URL is refused, a browser's ``Origin`` is
refused, an address with too many failures gets 429, a missing or wrong
bearer token gets 401, and a client speaking another protocol version gets
426 with a message saying which. Only then is the connection upgraded and
the HELLO exchanged.

Before any of that, a connection is admitted: at most
:data:`MAX_HANDSHAKES` connections may be in their handshake (TLS, then
HTTP) at once, :data:`MAX_HANDSHAKES_PER_ADDRESS` of them from one address,
and each has :data:`HANDSHAKE_TIMEOUT_S` from its accept for both. A
connection beyond a limit is closed as it is accepted, before TLS has cost
anything. So the port accepts its own connections (``sock_accept``) and
hands each admitted one to the loop with ``connect_accepted_socket``:
``create_server`` would start TLS before we could see who is calling.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import socket
import ssl
from collections.abc import Callable
from typing import Any, Final

from websockets.http11 import Request, Response

from server.config import ServerConfig
from server.limits import AuthLimiter, ConnectionsPerAddress, Refusals
from server.listen import Acceptor, listening
from server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from server.paths import MAX_ALLOWED_PATHS, valid_prefix
from server.registry import ConnectedClient, Registry, Route, normalize_host, valid_client_name
from tunnel.auth import TokenVerifier, bearer_token
from tunnel.errors import ErrorCode, ProtocolError, SessionClosed
from tunnel.frames import TCP_ROUTE_PREFIX, tcp_route
from tunnel.mux import Multiplexer, Role, Settings
from tunnel.session import Session
from tunnel.tls import server_context
from tunnel.version import SOFTWARE
from tunnel.websocket import HANDSHAKE_TIMEOUT_S, SUBPROTOCOL, ServerConnection, rejection

logger = logging.getLogger("homeport.server")

CONNECT_PATH: Final = "/connect"
HEALTH_PATH: Final = "/healthz"
STATUS_PATH: Final = "/status"
METRICS_PATH: Final = "/metrics"
#: what the token opens, beside the tunnel itself (CONNECT_PATH)
_REPORTS: Final = (STATUS_PATH, METRICS_PATH)
MAX_ROUTES: Final = 64
#: connections one client may keep (``homeport client --connections``)
MAX_CONNECTIONS: Final = 8
_INSTANCE: Final = re.compile(r"[0-9a-f]{8,64}")
#: Control connections in their handshake at once, in all and from one
#: address (an IPv6 /64). Each holds a socket, and over TLS some 50 KiB,
#: until its deadline: unbounded, one host opening connections and sending
#: nothing filled the exit server's memory (5,000 took 289 MiB) and would
#: take every file descriptor (docs/security.md). A Pi keeps at most
#: MAX_CONNECTIONS, so a whole household reconnecting at once fits.
MAX_HANDSHAKES: Final = 256
MAX_HANDSHAKES_PER_ADDRESS: Final = 16


class ControlServer:
    """Accepts clients on the control port and keeps their sessions."""

    def __init__(
        self,
        config: ServerConfig,
        registry: Registry,
        verifier: TokenVerifier,
        status: Callable[[], dict[str, Any]] | None = None,
        metrics: Callable[[], str] | None = None,
    ) -> None:
        self.config = config
        self.registry = registry
        self.verifier = verifier
        #: the metrics token's check (--metrics-token-file): reads, opens no tunnel
        self.reader = (
            TokenVerifier(config.metrics_token_digest)
            if config.metrics_token_digest is not None
            else None
        )
        self.status = status
        self.metrics = metrics
        self.sessions: set[Session] = set()
        self.auth_failures = 0
        self.limiter = AuthLimiter(max_failures=config.max_auth_failures)
        #: requests answered 429: their address failed too often of late
        self.rate_limited = Refusals()
        #: connections in their handshake, each with its address's key
        self.handshakes: dict[ServerConnection, str] = {}
        self.handshake_addresses = ConnectionsPerAddress(MAX_HANDSHAKES_PER_ADDRESS)
        #: connections closed as accepted because MAX_HANDSHAKES were under way
        self.handshakes_refused_at_capacity = Refusals()
        self._tls: ssl.SSLContext | None = None
        self._acceptors: list[Acceptor] = []
        self._connecting: set[asyncio.Task[None]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def listen(self) -> list[tuple[str, int]]:
        """Start listening; return the bound addresses.

        Raises:
            ConfigError: the TLS certificate or key cannot be loaded.
            OSError: the port cannot be bound.
        """
        config = self.config
        if config.tls_cert is not None and config.tls_key is not None:
            self._tls = server_context(config.tls_cert, config.tls_key)
        listeners = listening(config.bind, config.control_port, config.backlog)
        self._acceptors = [
            Acceptor(listener, self._admit, "the control port") for listener in listeners
        ]
        return [listener.getsockname()[:2] for listener in listeners]

    def stop_accepting(self) -> None:
        """Close the port, and every connection not yet upgraded: no new session starts."""
        for acceptor in self._acceptors:
            acceptor.close()
        for task in self._connecting:
            task.cancel()
        self._acceptors = []
        for connection in list(self.handshakes):
            connection.abort()

    # -- admission -----------------------------------------------------------------------

    def _admit(self, sock: socket.socket, host: str) -> None:
        """Hand an accepted connection to its handshake, or close it if over a limit.

        Raises:
            OSError: the socket is unusable already (the caller reset it).
        """
        if len(self.handshakes) >= MAX_HANDSHAKES:
            self.handshakes_refused_at_capacity.count(host)
            sock.close()
            return
        key = self.handshake_addresses.admit(host)
        if key is None:
            sock.close()
            return
        loop = asyncio.get_running_loop()
        connection = ServerConnection(
            self._decide,
            self._opened,
            deadline=loop.time() + HANDSHAKE_TIMEOUT_S,
            lost=self._handshake_over,
        )
        self.handshakes[connection] = key
        task = loop.create_task(self._connect(sock, connection), name="control-handshake")
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, sock: socket.socket, connection: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(
                lambda: connection,
                sock,
                ssl=self._tls,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S if self._tls else None,
            )
        except BaseException as exc:
            sock.close()
            self._handshake_over(connection)
            if not isinstance(exc, OSError):  # cancelled: the port is closing
                raise
            # TLS failed or timed out (ssl.SSLError and TimeoutError are OSErrors):
            # a port scanner, or a caller that gave up. At debug only, or every
            # probe of the port would log a line.
            logger.debug("TLS handshake on the control port failed: %s", exc)

    def _handshake_over(self, connection: ServerConnection) -> None:
        """``connection`` was upgraded, or closed: it no longer counts against the limits."""
        key = self.handshakes.pop(connection, None)
        if key is not None:
            self.handshake_addresses.release(key)

    async def close_sessions(self, code: ErrorCode, reason: str) -> None:
        """Close every session with ``code`` and wait for them to end."""
        for session in list(self.sessions):
            session.close(code, reason)
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    # -- the HTTP handshake ------------------------------------------------------------

    def _decide(self, connection: ServerConnection, request: Request) -> Response | None:
        """Answer a request on the control port, or return None to upgrade it."""
        path, _, query = request.path.partition("?")
        upgrade = "Upgrade" in request.headers
        if path == HEALTH_PATH and not upgrade:
            return rejection(200, "ok")
        if path != CONNECT_PATH and (path not in _REPORTS or upgrade):
            return rejection(404, "not found")
        if query:
            # A token must never travel in a URL (it ends up in logs and
            # histories); refuse any query without ever logging it.
            return rejection(400, "query strings are not accepted; send the token in a header")
        if "Origin" in request.headers:
            return rejection(403, "browsers may not open tunnels")
        source = connection.remote_address.rpartition(":")[0].strip("[]")
        now = asyncio.get_running_loop().time()
        if self.limiter.blocked(source, now):
            self.rate_limited.count(source)
            return rejection(
                429, "too many failed attempts; try again later", {"Retry-After": "60"}
            )
        presented = request.headers.get_all("Authorization")
        # Two credentials are no credential: never pick one of them.
        token = bearer_token(presented[0]) if len(presented) == 1 else None
        if not self.verifier.verify(token):
            if self.reader is not None and self.reader.verify(token):
                if path in _REPORTS:
                    self.limiter.succeeded(source)
                    return self._report(path)
                logger.warning(
                    "refused a tunnel from %s: its token is the metrics token, which only reads %s",
                    connection.remote_address,
                    " and ".join(_REPORTS),
                )
                return rejection(403, "this token reads /metrics and /status; it opens no tunnel")
            self.auth_failures += 1
            self.limiter.failed(source, now)
            logger.warning(
                "rejected a client from %s: %s token",
                connection.remote_address,
                "wrong" if presented else "missing",
            )
            return rejection(401, "unauthorized", {"WWW-Authenticate": 'Bearer realm="homeport"'})
        self.limiter.succeeded(source)
        if path in _REPORTS:
            return self._report(path)
        offered = [
            p.strip()
            for value in request.headers.get_all("Sec-WebSocket-Protocol")
            for p in value.split(",")
        ]
        if SUBPROTOCOL not in offered:
            return rejection(
                426,
                f"protocol version mismatch: this exit server speaks {SUBPROTOCOL}; "
                "run the same homeport version on both ends",
                {"Sec-WebSocket-Protocol": SUBPROTOCOL},
            )
        return None

    def _report(self, path: str) -> Response:
        """``GET /status`` or ``GET /metrics``, for a token that may read them."""
        if path == STATUS_PATH:
            body = json.dumps(self.status() if self.status else {}, indent=2)
            return rejection(200, body, {"Cache-Control": "no-store"}, "application/json")
        body = self.metrics().removesuffix("\n") if self.metrics else ""
        return rejection(200, body, {"Cache-Control": "no-store"}, METRICS_CONTENT_TYPE)

    def _opened(self, connection: ServerConnection, request: Request) -> None:
        self._handshake_over(connection)
        task = asyncio.get_running_loop().create_task(
            self._serve(connection), name=f"session-{connection.remote_address}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- the session -------------------------------------------------------------------

    async def _serve(self, connection: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        address = connection.remote_address
        mux = Multiplexer(
            Role.SERVER,
            Settings(max_concurrent_streams=0),
            heartbeat_interval_s=config.heartbeat_interval_s,
            heartbeat_timeout_s=config.heartbeat_timeout_s,
            now=loop.time(),
        )
        session = Session(connection, mux, name=address)
        try:
            hello = await session.wait_hello()
            name, routes = _read_client_hello(hello)
            tcp_ports = _read_tcp_ports(hello)
            proxy_versions = _read_proxy_protocol(hello, tcp_ports)
            if not routes and not tcp_ports:
                raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "no route and no TCP port to serve")
            instance, index, connections = _read_connection(hello)
        except (ProtocolError, SessionClosed) as exc:
            reason = exc.message if isinstance(exc, ProtocolError) else exc.reason
            logger.warning("client from %s failed its HELLO: %s", address, reason)
            connection.close(exc.code, f"HELLO rejected: {reason}")
            await connection.wait_closed()
            return
        session_id = secrets.token_hex(8)
        session.name = name
        offered = [port for port in tcp_ports if port in config.tcp_ports]
        if len(offered) < len(tcp_ports):
            missing = ", ".join(str(port) for port in tcp_ports if port not in offered)
            logger.warning(
                "client %s asks for TCP port %s, which this exit server does not listen on "
                "(--tcp-port); not served",
                name,
                missing,
            )
        for port in offered:
            routes[tcp_route(port)] = Route(
                tcp_route(port), proxy_protocol=proxy_versions.get(port, 0)
            )
        client = ConnectedClient(
            name=name,
            session=session,
            routes=routes,
            remote_addr=address,
            session_id=session_id,
            max_streams=config.max_streams_per_client,
            instance=instance,
            connection=index,
            connections=connections,
        )
        granted = {port: proxy_versions[port] for port in offered if port in proxy_versions}
        await session.send_hello(server_hello(session_id, offered, granted))
        which = f"connection {index + 1} of {connections}" if connections > 1 else ""
        for replaced in self.registry.add(client):
            if replaced.session.is_closing:
                continue  # going away already: it ends once its last exchange is done
            logger.info(
                "client %s%s reconnected from %s; closing its previous session from %s",
                name,
                f" ({which})" if which else "",
                address,
                replaced.remote_addr,
            )
            replaced.session.close(ErrorCode.REPLACED, "replaced by a newer session")
        logger.info(
            "client %s connected from %s (session %s%s), serving %s",
            name,
            address,
            session_id,
            f", {which}" if which else "",
            ", ".join(_describe(route) for route in routes.values()),
        )
        self.sessions.add(session)
        try:
            end = await session.run()
            logger.info(
                "client %s disconnected (session %s): %s%s",
                name,
                session_id,
                end.code.name,
                f" ({end.reason})" if end.reason else "",
            )
        finally:
            self.sessions.discard(session)
            self.registry.remove(client)
            client.close_pool()


def _read_client_hello(hello: dict[str, Any]) -> tuple[str, dict[str, Route]]:
    """Check the client's name and routes.

    Raises:
        ProtocolError: a field is missing or malformed.
    """
    name = hello.get("client_name")
    if not valid_client_name(name):
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "client_name is missing or invalid")
    assert isinstance(name, str)
    entries = hello.get("routes")
    if not isinstance(entries, list) or not len(entries) <= MAX_ROUTES:
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, f"routes must list 0 to {MAX_ROUTES} routes")
    routes: dict[str, Route] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "a route is not an object")
        host = entry.get("host")
        rewrite = entry.get("host_rewrite")
        if not isinstance(host, str) or (host and normalize_host(host) != host):
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "a route's host is invalid")
        if rewrite is not None and (
            not isinstance(rewrite, str) or not rewrite.isascii() or normalize_host(rewrite) is None
        ):
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "a route's host_rewrite is invalid")
        allow = entry.get("allow_paths") or []
        if (
            not isinstance(allow, list)
            or len(allow) > MAX_ALLOWED_PATHS
            or not all(valid_prefix(p) for p in allow)
        ):
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "a route's allow_paths is invalid")
        if host in routes:
            raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "a host is routed twice")
        routes[host] = Route(host, rewrite.encode() if rewrite else None, tuple(allow))
    return name, routes


def _read_tcp_ports(hello: dict[str, Any]) -> list[int]:
    """The raw TCP ports the client serves (none when it names none).

    Raises:
        ProtocolError: not a list of distinct port numbers, or too many.
    """
    ports = hello.get("tcp_ports", [])
    if (
        not isinstance(ports, list)
        or len(ports) > MAX_ROUTES
        or not all(type(port) is int and 0 < port < 65536 for port in ports)
        or len(set(ports)) < len(ports)
    ):
        raise ProtocolError(
            ErrorCode.PROTOCOL_ERROR, f"tcp_ports must list up to {MAX_ROUTES} distinct ports"
        )
    return ports


def _read_proxy_protocol(hello: dict[str, Any], tcp_ports: list[int]) -> dict[int, int]:
    """The PROXY protocol version the client asks for on each of its TCP ports (none: {}).

    Raises:
        ProtocolError: not an object of the client's TCP ports to 1 or 2.
    """
    asked = hello.get("proxy_protocol", {})
    if not isinstance(asked, dict):
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "proxy_protocol must be an object")
    versions: dict[int, int] = {}
    for key, version in asked.items():
        port = int(key) if key.isascii() and key.isdigit() and len(key) <= 5 else 0
        if port not in tcp_ports or type(version) is not int or version not in (1, 2):
            raise ProtocolError(
                ErrorCode.PROTOCOL_ERROR,
                "proxy_protocol must map the client's TCP ports to version 1 or 2",
            )
        versions[port] = version
    return versions


def server_hello(
    session_id: str,
    tcp_ports: list[int] | None = None,
    proxy_protocol: dict[int, int] | None = None,
) -> dict[str, Any]:
    """What the exit server says in its HELLO, besides the multiplexer's settings.

    ``max_connections`` tells a client that several of its sessions may
    stand side by side; one that does not see it (from an older exit
    server, which would have each replace the other) keeps one.
    ``tcp_ports`` are those of the client's that this server carries, and
    ``proxy_protocol`` those it opens with a PROXY protocol header.
    """
    return {
        "session_id": session_id,
        "max_connections": MAX_CONNECTIONS,
        "tcp_ports": tcp_ports or [],
        "proxy_protocol": {str(port): v for port, v in (proxy_protocol or {}).items()},
        "software": SOFTWARE,
    }


def _read_connection(hello: dict[str, Any]) -> tuple[str, int, int]:
    """The client's instance, this connection's number and how many it keeps.

    A client that sends no ``instance`` (an older one) gets one of its own
    for this session, so it replaces whatever its name had, as before.

    Raises:
        ProtocolError: a field is malformed.
    """
    instance = hello.get("instance")
    connection = hello.get("connection", 0)
    connections = hello.get("connections", 1)
    if instance is None:
        instance = secrets.token_hex(8)
    elif not (isinstance(instance, str) and _INSTANCE.fullmatch(instance)):
        raise ProtocolError(ErrorCode.PROTOCOL_ERROR, "instance must be 8 to 64 hex digits")
    if not (type(connections) is int and 1 <= connections <= MAX_CONNECTIONS):
        raise ProtocolError(
            ErrorCode.PROTOCOL_ERROR, f"connections must be an integer from 1 to {MAX_CONNECTIONS}"
        )
    if not (type(connection) is int and 0 <= connection < connections):
        raise ProtocolError(
            ErrorCode.PROTOCOL_ERROR, "connection must be an integer from 0 to connections - 1"
        )
    return instance, connection, connections


def _describe(route: Route) -> str:
    if route.host.startswith(TCP_ROUTE_PREFIX):
        port = route.host.removeprefix(TCP_ROUTE_PREFIX)
        proxy = f" (PROXY protocol v{route.proxy_protocol})" if route.proxy_protocol else ""
        return f"TCP port {port}{proxy}"
    name = route.host or "the default route"
    return f"{name} (paths {', '.join(route.allow_paths)})" if route.allow_paths else name
