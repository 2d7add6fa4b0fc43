"""The exit server: the public listener and the control endpoint, started and stopped together."""

from __future__ import annotations

import asyncio
import collections
import logging
import signal
import time
from typing import Any, Final

from server.certificates import (
    CHALLENGES_DIR,
    AcmeCertificates,
    CertificateFiles,
    Challenges,
    public_context,
)
from server.config import ServerConfig
from server.control import CONNECT_PATH, MAX_HANDSHAKES, ControlServer
from server.https import HttpsPort
from server.metrics import render
from server.proxy import PublicServer
from server.registry import Registry
from tunnel.auth import TokenVerifier
from tunnel.errors import ErrorCode
from tunnel.systemd import Notifier
from tunnel.tls import default_data_dir
from tunnel.version import SOFTWARE

logger = logging.getLogger("homeport.server")

#: How often connections refused by a limit are summed up in the log: one
#: line then, not one per connection, which a flood would turn into a flood
#: of the log.
REFUSALS_LOG_INTERVAL_S: Final = 60.0
#: Addresses a summary names, those refused most first.
REFUSALS_LOG_ADDRESSES: Final = 3


def format_address(address: tuple[str, int]) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ExitServer:
    """``homeport server``: serves visitors on the public port, clients on the control port."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.registry = Registry()
        self.public = PublicServer(config, self.registry)
        self.control = ControlServer(
            config,
            self.registry,
            TokenVerifier(config.token_digest),
            status=self.status,
            metrics=self.metrics,
        )
        self.public_addresses: list[tuple[str, int]] = []
        self.control_addresses: list[tuple[str, int]] = []
        #: where the raw TCP ports (--tcp-port) listen
        self.tcp_addresses: list[tuple[str, int]] = []
        #: where the HTTPS port listens, when served
        self.https_addresses: list[tuple[str, int]] = []
        #: what keeps the HTTPS port's certificate (ACME or files), when served
        self.certificates: AcmeCertificates | CertificateFiles | None = None
        self.https: HttpsPort | None = None
        self._stop = asyncio.Event()
        #: systemd's readiness and watchdog (deploy/civo-exit-node: Type=notify)
        self.notifier = Notifier()
        self._refusals_timer: asyncio.TimerHandle | None = None

    def status(self) -> dict[str, Any]:
        """What ``GET /status`` on the control port reports (with the token)."""
        now = time.time()
        clients = []
        for client in self.registry.clients():
            session = client.session
            stats = session.statistics()
            mux_stats = session.mux.statistics()
            clients.append(
                {
                    "name": client.name,
                    "session_id": client.session_id,
                    "connection": client.connection,
                    "connections": client.connections,
                    "remote_addr": client.remote_addr,
                    "routes": [route or "*" for route in client.routes],
                    "connected_s": round(now - client.connected_at, 1),
                    "streams": stats.streams,
                    "idle_streams": client.idle_streams(),
                    "mux_streams": mux_stats.open_streams,
                    "held_bytes": mux_stats.held_receive_bytes,
                    "queued_bytes": mux_stats.buffered_send_bytes,
                    "bytes_to_client": stats.bytes_written,
                    "bytes_from_client": stats.bytes_read,
                    "round_trip_ms": (
                        round(stats.round_trip_s * 1000, 2)
                        if stats.round_trip_s is not None
                        else None
                    ),
                }
            )
        snapshot: dict[str, Any] = {
            "software": SOFTWARE,
            "clients": clients,
            "visitor_connections": self.public.open_connections(),
            "tcp_connections": len(self.public.tcp_connections),
            "visitor_addresses": len(self.public.per_address),
            "connections_refused": {
                "max_connections": self.public.refused_at_capacity.total,
                "per_address": self.public.per_address.refused,
            },
            "control_handshakes": len(self.control.handshakes),
            "control_connections_refused": {
                "max_handshakes": self.control.handshakes_refused_at_capacity.total,
                "per_address": self.control.handshake_addresses.refused,
            },
            "visitor_write_buffer_bytes": self.public.write_buffer_bytes(),
            "requests_in_flight": self.public.in_flight,
            "auth_failures": self.control.auth_failures,
            "auth_rate_limited": self.control.rate_limited.total,
        }
        certificates = self.certificates
        if isinstance(certificates, AcmeCertificates):
            current = certificates.current
            snapshot["https"] = {
                "certificate": "acme",
                "domains": list(certificates.domains),
                "not_after": current.not_after.isoformat() if current else None,
                "renew_at": current.renew_at.isoformat() if current else None,
                "acme_failures": certificates.failures,
            }
        elif isinstance(certificates, CertificateFiles):
            snapshot["https"] = {"certificate": "files", "cert": str(certificates.cert)}
        return snapshot

    def metrics(self) -> str:
        """What ``GET /metrics`` on the control port reports (with the token)."""
        return render(self.status(), self.public.counts, SOFTWARE)

    async def start(self) -> None:
        """Bind both ports.

        Raises:
            OSError: a port cannot be bound (in use, or a privileged port).
        """
        config = self.config
        self.public_addresses = await self.public.listen(config.bind, config.port)
        if config.https:
            await self._serve_https()
        self.tcp_addresses = []
        for port in config.tcp_ports:
            self.tcp_addresses += await self.public.listen_tcp(config.bind, port)
        self.control_addresses = await self.control.listen()
        scheme = "wss" if config.tls_cert is not None else "ws"
        if self.tcp_addresses:
            logger.info(
                "raw TCP on %s, each connection carried to the client that serves its port",
                ", ".join(f"tcp://{format_address(a)}" for a in self.tcp_addresses),
            )
        logger.info(
            "exit server ready: visitors on %s, clients on %s",
            ", ".join(f"http://{format_address(a)}/" for a in self.public_addresses),
            ", ".join(
                f"{scheme}://{format_address(a)}{CONNECT_PATH}" for a in self.control_addresses
            ),
        )
        if config.tls_fingerprint is not None:
            self._announce_fingerprint(config.tls_fingerprint)
        self._refusals_timer = asyncio.get_running_loop().call_later(
            REFUSALS_LOG_INTERVAL_S, self._log_refusals
        )
        self.notifier.ready()

    async def _serve_https(self) -> None:
        """Listen on the HTTPS port, its certificate kept by ACME or loaded from files.

        Raises:
            ConfigError: the certificate files cannot be loaded.
            OSError: the port cannot be bound.
        """
        config = self.config
        context = public_context()
        certificates: AcmeCertificates | CertificateFiles
        if config.acme_domains:
            data_dir = config.data_dir or default_data_dir()
            self.public.challenges = Challenges(config.acme_domains, data_dir / CHALLENGES_DIR)
            certificates = AcmeCertificates(
                context,
                domains=config.acme_domains,
                email=config.acme_email,
                directory_url=config.acme_directory,
                ca_file=config.acme_ca_file,
                data_dir=data_dir,
                user_agent=SOFTWARE,
            )
        else:
            assert config.https_cert is not None
            assert config.https_key is not None
            certificates = CertificateFiles(context, config.https_cert, config.https_key)
        certificates.start()
        self.certificates = certificates
        self.https = HttpsPort(self.public, context)
        self.https_addresses = self.https.listen(config.bind, config.https_port)
        if config.https_redirect:
            self.public.https_redirect_port = config.https_port or self.https_addresses[0][1]
        source = (
            f"a certificate for {', '.join(config.acme_domains)} from {config.acme_directory}"
            if config.acme_domains
            else f"the certificate in {config.https_cert}"
        )
        logger.info(
            "HTTPS on %s, with %s",
            ", ".join(f"https://{format_address(a)}/" for a in self.https_addresses),
            source,
        )

    def _log_refusals(self) -> None:
        """Sum up, in one line, the connections refused since the last summary (if any).

        Each refusal is counted (``GET /status``) but not logged as it
        happens; this says how many, under which limit, and from where.
        """
        self._refusals_timer = asyncio.get_running_loop().call_later(
            REFUSALS_LOG_INTERVAL_S, self._log_refusals
        )
        public, control = self.public, self.control
        limits = (
            (public.refused_at_capacity, "visitor connection",
             f"at --max-connections ({self.config.max_connections:,} open)", False),
            (public.per_address.refusals, "visitor connection",
             "from addresses at --max-connections-per-address", True),
            (control.handshakes_refused_at_capacity, "control connection",
             f"beyond the {MAX_HANDSHAKES:,} that may be in their handshake at once", False),
            (control.handshake_addresses.refusals, "control connection",
             "from addresses at their handshake limit", True),
            (control.rate_limited, "login",
             "from addresses at --max-auth-failures, answered 429", True),
        )  # fmt: skip
        parts = []
        for refusals, what, limit, by_address in limits:
            count, refused_from = refusals.take()
            if count:
                part = f"{count:,} {what}{'' if count == 1 else 's'} {limit}"
                parts.append(f"{part} ({_most_refused(refused_from)})" if by_address else part)
        if parts:
            logger.warning(
                "refused in the last %g s: %s", REFUSALS_LOG_INTERVAL_S, "; ".join(parts)
            )

    def _announce_fingerprint(self, fingerprint: str) -> None:
        """Print what a client needs to pin this server, with the command to run."""
        config = self.config
        wildcard = (None, "", "0.0.0.0", "::")  # noqa: S104 - names, not a bind
        host = config.advertised_host or (
            config.bind if config.bind not in wildcard else "PUBLIC_IP"
        )
        if ":" in str(host):
            host = f"[{host}]"
        port = self.control_addresses[0][1]
        token_file = config.token_file_hint or "TOKEN_FILE"  # a copy of it, on the client
        logger.info("control channel TLS certificate fingerprint: %s", fingerprint)
        logger.info(
            "on the client, run: homeport client --url wss://%s:%d --fingerprint %s "
            "--token-file %s --upstream http://127.0.0.1:8080",
            host,
            port,
            fingerprint,
            token_file,
        )

    def stop(self) -> None:
        """Ask :meth:`serve_until_signalled` to shut down gracefully."""
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: load the HTTPS certificate files again, or check the ACME one now."""
        if self.certificates is not None:
            self.certificates.reload()
        else:
            logger.info("SIGHUP: nothing to load again (no HTTPS certificate)")

    async def serve_until_signalled(self) -> None:
        """Once started: serve until SIGTERM or SIGINT, then shut down gracefully."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self._stop.wait()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish (bounded), close sessions with 1001."""
        in_flight = self.public.in_flight
        logger.info(
            "shutting down: %d request%s in flight, %d client%s connected",
            in_flight,
            "" if in_flight == 1 else "s",
            len(self.registry),
            "" if len(self.registry) == 1 else "s",
        )
        self.notifier.stopping()
        if self._refusals_timer is not None:
            self._refusals_timer.cancel()
        if self.certificates is not None:
            self.certificates.stop()
        self.public.begin_shutdown()
        if self.https is not None:
            self.https.close()
        self.control.stop_accepting()
        for client in self.registry.clients():
            client.session.go_away(ErrorCode.NO_ERROR, "exit server shutting down")
        try:
            async with asyncio.timeout(self.config.drain_timeout_s):
                await self.public.wait_drained()
        except TimeoutError:
            logger.warning(
                "%d request(s) still in flight after %.0f s; closing them",
                self.public.in_flight,
                self.config.drain_timeout_s,
            )
            self.public.abort_all()
        for client in self.registry.clients():
            client.close_pool()
        await self.control.close_sessions(ErrorCode.GOING_AWAY, "exit server shutting down")
        self.notifier.close()
        logger.info("exit server stopped")


def _most_refused(refused: collections.Counter[str]) -> str:
    """The addresses refused most, with their counts: ``203.0.113.7: 950, …, and 4 more``."""
    named = ", ".join(
        f"{key}: {count:,}" for key, count in refused.most_common(REFUSALS_LOG_ADDRESSES)
    )
    more = len(refused) - REFUSALS_LOG_ADDRESSES
    return f"{named}, and {more:,} more" if more > 0 else named
