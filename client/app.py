"""The client: keeps its sessions to the exit server up, forever, and serves their streams.

One session by default; ``--connections N`` keeps N, each on a websocket
of its own with its own reconnect backoff. The exit server gives each
request to the least busy of them (server/registry.py), so over a lossy
uplink a download on one does not hold back what the others carry.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import signal
from typing import Any

from client.config import ClientConfig, control_url
from client.dial import DialFailed, dial
from client.forward import Forwarder
from client.upstreams import Upstream
from tunnel.backoff import AUTH_FAILURE_DELAY_S, DEFAULT_STABLE_AFTER_S, Backoff
from tunnel.errors import AuthRejected, ErrorCode, ProtocolError, SessionClosed, VersionMismatch
from tunnel.events import GoAwayReceived
from tunnel.mux import Multiplexer, Role, Settings
from tunnel.session import Session, SessionEnd, Stream, StreamHandler
from tunnel.systemd import Notifier
from tunnel.tls import PinMismatch, client_context
from tunnel.version import SOFTWARE
from tunnel.websocket import ClientConnection

logger = logging.getLogger("homeport.client")


class TunnelClient:
    """``homeport client``: dials out, registers its routes, forwards streams, reconnects."""

    def __init__(self, config: ClientConfig, *, rng: random.Random | None = None) -> None:
        self.config = config
        self.url = control_url(config.url, insecure=config.insecure)
        self.ssl_context = (
            client_context(ca_file=config.ca_file, pinned=config.fingerprint is not None)
            if self.url.startswith("wss://")
            else None
        )
        self.routes: dict[str, Upstream] = {u.route: u for u in config.upstreams}
        #: this run of the client: a session of another instance is a ghost to replace
        self.instance = secrets.token_hex(8)
        #: the live session of each connection, by connection number
        self.sessions: dict[int, Session] = {}
        #: sessions the exit server sent away, finishing their streams beside their successors
        self._draining: dict[Session, asyncio.Task[SessionEnd]] = {}
        self.sessions_started = 0
        self._rng = rng
        self._stop = asyncio.Event()
        self._connected = asyncio.Event()
        #: how many connections the exit server takes from one client, once a HELLO said
        self._server_max_connections: int | None = None
        self._heard_server = asyncio.Event()
        #: systemd's readiness and watchdog (deploy/civo-exit-node/pi: Type=notify)
        self.notifier = Notifier()

    def stop(self) -> None:
        """Close the sessions politely and make :meth:`run` return."""
        if not self._stop.is_set():
            self.notifier.stopping()
        self._stop.set()
        self._heard_server.set()
        for session in [*self.sessions.values(), *self._draining]:
            session.close(ErrorCode.GOING_AWAY, "client shutting down")

    async def wait_connected(self) -> None:
        """Wait until a session is up (for the demo and tests)."""
        await self._connected.wait()

    async def run_until_signalled(self) -> None:
        """Run until SIGTERM or SIGINT."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        try:
            await self.run()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)

    async def run(self) -> None:
        """Keep every connection up until :meth:`stop`.

        Ready for systemd at once: a Pi may wait minutes for its network
        after a power cut, and the watchdog guards the loop meanwhile too.
        """
        self.notifier.ready()
        try:
            await self._keep_everything_up()
        finally:
            self.notifier.close()

    async def _keep_everything_up(self) -> None:
        async with asyncio.TaskGroup() as connections:
            connections.create_task(self._keep_up(0), name="connection-0")
            if self.config.connections > 1:
                connections.create_task(self._open_the_others(connections))
        await asyncio.gather(*self._draining.values(), return_exceptions=True)  # told to stop
        logger.info("client stopped")

    async def _open_the_others(self, connections: asyncio.TaskGroup) -> None:
        """Start connections 2 to N once the exit server has said it takes them.

        An older exit server would let each of our sessions replace the
        other, over and over; it says nothing of ``max_connections``.
        """
        await self._heard_server.wait()
        if self._stop.is_set():
            return
        allowed = min(self.config.connections, self._server_max_connections or 1)
        if allowed < self.config.connections:
            logger.warning(
                "the exit server takes %d connection%s per client (an older homeport?); "
                "keeping %d of --connections %d",
                allowed,
                "" if allowed == 1 else "s",
                allowed,
                self.config.connections,
            )
        for index in range(1, allowed):
            connections.create_task(self._keep_up(index), name=f"connection-{index}")

    async def _keep_up(self, index: int) -> None:
        """Connect, serve, and reconnect with backoff until :meth:`stop`."""
        loop = asyncio.get_running_loop()
        backoff = Backoff(max_s=self.config.reconnect_max_delay_s, rng=self._rng)
        while not self._stop.is_set():
            started = loop.time()
            delay: float | None = None
            try:
                await self._connect_and_serve(index)
            except _SentAway:
                if loop.time() - started >= DEFAULT_STABLE_AFTER_S:
                    delay = 0.0  # its successor at once; a young one waits its backoff
            except AuthRejected as exc:
                logger.error("%s: check the token (--token-file) matches the exit server's", exc)
                delay = AUTH_FAILURE_DELAY_S * random.uniform(0.8, 1.2)  # noqa: S311
            except PinMismatch as exc:
                logger.error("%s", exc)
                delay = AUTH_FAILURE_DELAY_S
            except VersionMismatch as exc:
                logger.error("the exit server refused our protocol version: %s", exc)
                delay = AUTH_FAILURE_DELAY_S
            except DialFailed as exc:
                logger.warning("%s", exc)
            except (ProtocolError, SessionClosed) as exc:
                logger.warning("session failed: %s", exc)
            except _NotTaken:
                return
            except _Stopped:
                break
            finally:
                self.sessions.pop(index, None)
                if not self.sessions:
                    self._connected.clear()
            if self._stop.is_set():
                break
            if loop.time() - started >= DEFAULT_STABLE_AFTER_S:
                backoff.reset()
            if delay is None:
                delay = backoff.next_delay()
            if not delay:
                continue
            logger.info("reconnecting%s in %.1f s", self._which(index, " connection "), delay)
            try:
                async with asyncio.timeout(delay):
                    await self._stop.wait()
            except TimeoutError:
                pass

    def _which(self, index: int, before: str) -> str:
        """``before`` and ``N of M`` when the client keeps several connections, else nothing."""
        connections = self.config.connections
        return f"{before}{index + 1} of {connections}" if connections > 1 else ""

    async def _dial(self) -> ClientConnection:
        """Dial the exit server, unless :meth:`stop` comes first.

        A dial may wait its whole handshake timeout for a server that does
        not answer; told to stop, the client goes at once.
        """
        config = self.config
        loop = asyncio.get_running_loop()
        dialling = loop.create_task(
            dial(
                self.url,
                config.token,
                ssl_context=self.ssl_context,
                pin=config.fingerprint,
                timeout_s=config.handshake_timeout_s,
            )
        )
        stopping = loop.create_task(self._stop.wait())
        try:
            await asyncio.wait((dialling, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not dialling.done():
                dialling.cancel()  # dial() aborts what it opened
                await asyncio.wait((dialling,))
        if not self._stop.is_set():
            return dialling.result()
        if not dialling.cancelled() and dialling.exception() is None:
            dialling.result().abort()  # connected just as we were told to stop
        raise _Stopped

    async def _connect_and_serve(self, index: int) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        connection = await self._dial()
        mux = Multiplexer(
            Role.CLIENT,
            Settings(max_concurrent_streams=config.max_streams),
            heartbeat_interval_s=config.heartbeat_interval_s,
            heartbeat_timeout_s=config.heartbeat_timeout_s,
            now=loop.time(),
        )
        session = Session(connection, mux, name=config.name, accept_stream=self._accept)
        self.sessions[index] = session
        routes = [
            {
                "host": u.route,
                "host_rewrite": u.authority if u.rewrite_host else None,
                "allow_paths": list(u.allow_paths),
            }
            for u in config.upstreams
            if u.tcp_port is None
        ]
        tcp_ports = [u.tcp_port for u in config.upstreams if u.tcp_port is not None]
        proxy_protocol = {
            str(u.tcp_port): u.proxy_protocol
            for u in config.upstreams
            if u.tcp_port is not None and u.proxy_protocol
        }
        try:
            await session.send_hello(
                {
                    "client_name": config.name,
                    "routes": routes,
                    "tcp_ports": tcp_ports,
                    **({"proxy_protocol": proxy_protocol} if proxy_protocol else {}),
                    "instance": self.instance,
                    "connection": index,
                    "connections": config.connections,
                    "software": SOFTWARE,
                }
            )
            hello = await session.wait_hello()
        except BaseException:
            session.channel.abort()
            raise
        allowed = hello.get("max_connections", 1)
        self._server_max_connections = allowed if type(allowed) is int and allowed > 0 else 1
        self._heard_server.set()
        if index >= self._server_max_connections:
            # The exit server changed under us for one that takes fewer.
            logger.warning("the exit server no longer takes connection %d; closing it", index + 1)
            session.close(ErrorCode.GOING_AWAY, "connection not taken")
            await session.run()
            raise _NotTaken
        self.sessions_started += 1
        self._check_tcp_ports(tcp_ports, hello.get("tcp_ports"), index)
        self._check_proxy_protocol(proxy_protocol, hello, index)
        logger.info(
            "connected to %s as %s (session %s)%s%s; serving %s",
            self.url,
            config.name,
            hello.get("session_id", "?"),
            _tls_in_use(connection.transport),
            self._which(index, "; connection "),
            "; ".join(u.describe() for u in config.upstreams),
        )
        sent_away: asyncio.Future[None] = loop.create_future()

        def go_away_received(event: GoAwayReceived) -> None:
            # NO_ERROR: no new streams, the open ones finish. Any other code
            # comes just before the close that ends the session (REPLACED, an error).
            if event.code is ErrorCode.NO_ERROR and not sent_away.done():
                sent_away.set_result(None)

        session.on_go_away = go_away_received
        self._connected.set()
        if self._stop.is_set():
            session.close(ErrorCode.GOING_AWAY, "client shutting down")
        running = loop.create_task(session.run(), name=f"session-{index}")
        try:
            await asyncio.wait((running, sent_away), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled: the session goes with us
            running.cancel()
            raise
        if not running.done():
            # The exit server opens no more streams here (it used its last
            # stream id, or it is shutting down): open the next session now
            # and let this one finish what it carries (protocol.md §5.1).
            logger.info("the exit server sent this session away; opening the next")
            self._draining[session] = running
            running.add_done_callback(lambda _: self._drained(session))
            raise _SentAway
        self._report_end(running.result())

    def _drained(self, session: Session) -> None:
        """A session sent away has ended, its successor (if it could dial) up beside it."""
        running = self._draining.pop(session)
        if running.cancelled():
            return
        if (exc := running.exception()) is not None:
            logger.warning("session failed: %s", exc)
        else:
            self._report_end(running.result(), handed_over=True)

    def _report_end(self, end: SessionEnd, *, handed_over: bool = False) -> None:
        """Say how a session ended: a warning, unless we ended it or it went as asked."""
        if end.code is ErrorCode.REPLACED:
            logger.warning(
                "the exit server replaced this session with a newer one named %s; "
                "if two clients share that name, give each its own --name",
                self.config.name,
            )
        elif not (end.code is ErrorCode.GOING_AWAY and not end.by_peer):
            # A session sent away has its successor already: its end is news only.
            quietly = handed_over and end.code is ErrorCode.GOING_AWAY
            logger.log(
                logging.INFO if quietly else logging.WARNING,
                "disconnected from the exit server: %s%s",
                end.code.name,
                f" ({end.reason})" if end.reason else "",
            )

    def _check_tcp_ports(self, asked: list[int], granted: object, index: int) -> None:
        """Warn of our TCP ports the exit server does not carry (on the first connection)."""
        if not asked or index != 0:
            return
        carried = set(granted) if isinstance(granted, list) else set()
        missing = [str(port) for port in asked if port not in carried]
        if missing:
            logger.warning(
                "the exit server does not listen on TCP port %s (start it with --tcp-port); "
                "those are not served",
                ", ".join(missing),
            )

    def _check_proxy_protocol(
        self, asked: dict[str, int], hello: dict[str, Any], index: int
    ) -> None:
        """Warn of ports the exit server carries but will not open with a PROXY header."""
        if not asked or index != 0:
            return
        granted = hello.get("proxy_protocol")
        granted = granted if isinstance(granted, dict) else {}
        carried = hello.get("tcp_ports")
        carried = carried if isinstance(carried, list) else []
        missing = [
            port for port in asked if int(port) in carried and granted.get(port) != asked[port]
        ]
        if missing:
            logger.warning(
                "the exit server does not send the PROXY protocol header on TCP port %s "
                "(an older homeport?): an upstream that expects it will refuse those connections",
                ", ".join(missing),
            )

    def _accept(self, stream: Stream) -> StreamHandler:
        upstream = self.routes.get(stream.route)
        if upstream is None:
            logger.warning(
                "the exit server asked for route %r, which we do not serve", stream.route
            )
            stream.reset(ErrorCode.NO_SUCH_ROUTE)
            return StreamHandler()
        return Forwarder(stream, upstream, connect_timeout_s=self.config.upstream_connect_timeout_s)


class _NotTaken(Exception):
    """The exit server does not take this connection number: stop keeping it up."""


class _SentAway(Exception):
    """The exit server sent the session away (GO_AWAY): open its successor."""


class _Stopped(Exception):
    """:meth:`TunnelClient.stop` came while a dial was under way."""


def _tls_in_use(transport: asyncio.BaseTransport | None) -> str:
    """`` over TLSv1.3 with TLS_…`` on a wss:// connection, else nothing."""
    cipher = transport.get_extra_info("cipher") if transport is not None else None
    if not cipher:
        return ""
    name, protocol, _bits = cipher
    return f" over {protocol} with {name}"
