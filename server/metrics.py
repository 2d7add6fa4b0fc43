"""Prometheus metrics: ``GET /metrics`` on the control port, with the token.

Counted as each request ends (server/counts.py, one call beside the
access log's line): per client, the HTTP requests by status and their
durations as a histogram, the raw TCP connections by port and status, and
the bytes from and to visitors. The rest is read when scraped: what
``/status`` reports (sessions, streams, visitor connections, refusals,
failed logins), and the process's CPU, memory and file descriptors from
``/proc``, under the names every Prometheus client library gives them.

The text exposition format (version 0.0.4) is written here rather than by
``prometheus_client``: importing that library costs the exit server 5 MiB
of resident memory (``http.server``, ``email``, ``wsgiref`` and the rest),
a sixth of its idle size, kept for good after the first scrape, for a
format of a few lines per metric. The tests read what we write with its
parser (tests/server/test_metrics.py).
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Iterable
from datetime import datetime
from typing import Any, Final

from server.counts import DURATION_BUCKETS_S, ClientCounts, RequestCounts

#: the media type of the text format
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


# -- the text format ----------------------------------------------------------------------


Labels = dict[str, str]
Number = int | float


class Exposition:
    """Metric families written in Prometheus' text format, version 0.0.4."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(
        self,
        name: str,
        kind: str,
        help_text: str,
        samples: Iterable[tuple[Labels | None, Number]] = (),
    ) -> None:
        """A family: its ``# HELP`` and ``# TYPE`` lines, then ``samples`` of it, if given."""
        escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self._lines.append(f"# HELP {name} {escaped}\n# TYPE {name} {kind}\n")
        for labels, value in samples:
            self.sample(name, value, labels)

    def sample(self, name: str, value: Number, labels: Labels | None = None) -> None:
        """One sample of the family begun last (a histogram's under its own names)."""
        if labels:
            pairs = ",".join(f'{key}="{_label_value(text)}"' for key, text in labels.items())
            name = f"{name}{{{pairs}}}"
        self._lines.append(f"{name} {_number(value)}\n")

    def text(self) -> str:
        return "".join(self._lines)


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Number) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


# -- what a scrape reports ----------------------------------------------------------------

#: one sample each, read from the /status snapshot: name, type, help, the snapshot's key
_SNAPSHOT: Final = (
    (
        "homeport_visitor_addresses",
        "gauge",
        "Addresses (IPv6: /64s) with a connection open.",
        "visitor_addresses",
    ),
    (
        "homeport_requests_in_flight",
        "gauge",
        "Requests and TCP connections under way.",
        "requests_in_flight",
    ),
    (
        "homeport_visitor_write_buffer_bytes",
        "gauge",
        "Bytes waiting in the exit server to be written to visitors.",
        "visitor_write_buffer_bytes",
    ),
    (
        "homeport_control_handshakes",
        "gauge",
        "Control connections in their handshake.",
        "control_handshakes",
    ),
    (
        "homeport_auth_failures_total",
        "counter",
        "Logins with a missing or wrong token.",
        "auth_failures",
    ),
    (
        "homeport_auth_rate_limited_total",
        "counter",
        "Requests to the control port answered 429: their address failed too often.",
        "auth_rate_limited",
    ),
)
#: a sample per limit, read from the snapshot: name, help, the snapshot's key
_REFUSALS: Final = (
    (
        "homeport_visitor_connections_refused_total",
        "Visitor connections refused by a limit (--max-connections, per address).",
        "connections_refused",
    ),
    (
        "homeport_control_connections_refused_total",
        "Control connections refused by a limit of connections in their handshake.",
        "control_connections_refused",
    ),
)


def render(status: dict[str, Any], counts: RequestCounts, software: str) -> str:
    """The whole scrape: ``status`` as ``ExitServer.status()`` gives it, and ``counts``."""
    out = Exposition()
    version = software.partition("/")[2] or software
    out.family(
        "homeport_build_info",
        "gauge",
        "The homeport release this exit server runs.",
        [({"version": version}, 1)],
    )
    _sessions(out, status["clients"])
    tcp = status["tcp_connections"]
    out.family(
        "homeport_visitor_connections",
        "gauge",
        "Visitor connections open, by port kind.",
        [({"kind": "http"}, status["visitor_connections"] - tcp), ({"kind": "tcp"}, tcp)],
    )
    for name, kind, help_text, key in _SNAPSHOT:
        out.family(name, kind, help_text, [(None, status[key])])
    for name, help_text, key in _REFUSALS:
        refused = status[key].items()
        out.family(name, "counter", help_text, [({"limit": k}, n) for k, n in refused])
    _counted(out, counts)
    https = status.get("https")
    if https is not None and https["certificate"] == "acme":
        _acme(out, https)
    _process(out)
    return out.text()


def _acme(out: Exposition, https: dict[str, Any]) -> None:
    """The ACME certificate's end, to alert on before visitors see it, and failed orders."""
    not_after = https["not_after"]
    out.family(
        "homeport_https_certificate_expiry_timestamp_seconds",
        "gauge",
        "When the HTTPS certificate from the ACME CA expires (Unix time).",
        [] if not_after is None else [(None, datetime.fromisoformat(not_after).timestamp())],
    )
    out.family(
        "homeport_acme_order_failures_total",
        "counter",
        "Certificate orders or checks that failed (each logged with the CA's reason).",
        [(None, https["acme_failures"])],
    )


def _sessions(out: Exposition, sessions: list[dict[str, Any]]) -> None:
    connections: dict[str, int] = {}
    streams: dict[str, int] = {}
    for session in sessions:
        name = session["name"]
        connections[name] = connections.get(name, 0) + 1
        streams[name] = streams.get(name, 0) + session["streams"] - session["idle_streams"]
    out.family(
        "homeport_client_connections",
        "gauge",
        "Control connections each client holds open.",
        [({"client": name}, count) for name, count in connections.items()],
    )
    out.family(
        "homeport_client_streams",
        "gauge",
        "Streams carrying a request or connection to each client (pooled idle ones not counted).",
        [({"client": name}, count) for name, count in streams.items()],
    )
    out.family(
        "homeport_client_round_trip_seconds",
        "gauge",
        "Each control connection's last measured round trip (heartbeat PING).",
        [
            (
                {"client": session["name"], "connection": str(session["connection"])},
                session["round_trip_ms"] / 1000,
            )
            for session in sessions
            if session["round_trip_ms"] is not None
        ],
    )


def _counted(out: Exposition, counts: RequestCounts) -> None:
    clients = sorted(counts.clients.items())
    out.family(
        "homeport_http_requests_total",
        "counter",
        "HTTP requests answered, by the client that served them ('-': none) and status.",
        [
            ({"client": name, "code": str(status)}, count)
            for name, client in clients
            for status, count in sorted(_statuses(client).items())
        ],
    )
    histogram = "homeport_http_request_duration_seconds"
    out.family(
        histogram, "histogram", "From a request's first byte to its answer's last, by client."
    )
    for name, client in clients:
        if not client.ok and not client.http:
            continue
        cumulative = 0
        for bound, count in zip(_bucket_labels(), client.buckets, strict=True):
            cumulative += count
            out.sample(f"{histogram}_bucket", cumulative, {"client": name, "le": bound})
        out.sample(f"{histogram}_sum", client.seconds, {"client": name})
        out.sample(f"{histogram}_count", cumulative, {"client": name})
    out.family(
        "homeport_tcp_connections_total",
        "counter",
        "Raw TCP connections ended, by client, port and status (200: carried to their end).",
        [
            ({"client": name, "port": str(port), "code": str(status)}, count)
            for name, client in clients
            for (port, status), count in sorted(client.tcp.items())
        ],
    )
    out.family(
        "homeport_visitor_bytes_total",
        "counter",
        "Bytes from visitors ('in') and to them ('out'), HTTP and TCP, by client.",
        [
            ({"client": name, "way": way}, count)
            for name, client in clients
            for way, count in (("in", client.bytes_in), ("out", client.bytes_out))
        ],
    )


def _statuses(client: ClientCounts) -> dict[int, int]:
    """A client's HTTP requests by status, the 200s (counted apart) among them."""
    statuses = dict(client.http)
    if client.ok:
        statuses[200] = client.ok
    return statuses


def _bucket_labels() -> Iterable[str]:
    yield from (_number(bound) for bound in DURATION_BUCKETS_S)
    yield "+Inf"


def _process(out: Exposition) -> None:
    """The standard process metrics, read from /proc as the client libraries read them."""
    try:
        with open("/proc/self/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
        with open("/proc/stat", "rb") as system:
            boot = next(float(line.split()[1]) for line in system if line.startswith(b"btime "))
        descriptors = len(os.listdir("/proc/self/fd"))
    except (OSError, StopIteration, ValueError):
        return  # not Linux, or no /proc: these metrics are left out
    ticks = os.sysconf("SC_CLK_TCK")
    # fields[0] is the state, the third field of stat(5): index n here is field n + 3
    for name, kind, help_text, value in (
        (
            "process_cpu_seconds_total",
            "counter",
            "User and system CPU time spent.",
            (int(fields[11]) + int(fields[12])) / ticks,
        ),
        ("process_virtual_memory_bytes", "gauge", "Virtual memory size.", int(fields[20])),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size.",
            int(fields[21]) * resource.getpagesize(),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time, seconds since the epoch.",
            boot + int(fields[19]) / ticks,
        ),
        ("process_open_fds", "gauge", "Open file descriptors.", descriptors),
        (
            "process_max_fds",
            "gauge",
            "The limit of open file descriptors.",
            resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        ),
    ):
        out.family(name, kind, help_text, [(None, value)])
