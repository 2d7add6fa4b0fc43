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
from typing import Any, Final

from server.counts import DURATION_BUCKETS_S, RequestCounts

#: the media type of the text format
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


# -- the text format ----------------------------------------------------------------------


class Exposition:
    """Metric families written in Prometheus' text format, version 0.0.4."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        """Start a family: its ``# HELP`` and ``# TYPE`` lines; its samples follow."""
        escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self._lines.append(f"# HELP {name} {escaped}\n# TYPE {name} {kind}\n")

    def sample(self, name: str, value: int | float, labels: dict[str, str] | None = None) -> None:
        """One sample of the family begun last."""
        if labels:
            pairs = ",".join(f'{key}="{_label_value(text)}"' for key, text in labels.items())
            name = f"{name}{{{pairs}}}"
        self._lines.append(f"{name} {_number(value)}\n")

    def text(self) -> str:
        return "".join(self._lines)


def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: int | float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


# -- what a scrape reports ----------------------------------------------------------------


def render(status: dict[str, Any], counts: RequestCounts, software: str) -> str:
    """The whole scrape: ``status`` as ``ExitServer.status()`` gives it, and ``counts``."""
    out = Exposition()
    out.family("homeport_build_info", "gauge", "The homeport release this exit server runs.")
    out.sample("homeport_build_info", 1, {"version": software.partition("/")[2] or software})
    _sessions(out, status["clients"])
    _visitors(out, status)
    _control(out, status)
    _counted(out, counts)
    _process(out)
    return out.text()


def _sessions(out: Exposition, sessions: list[dict[str, Any]]) -> None:
    connections: dict[str, int] = {}
    streams: dict[str, int] = {}
    for session in sessions:
        name = session["name"]
        connections[name] = connections.get(name, 0) + 1
        streams[name] = streams.get(name, 0) + session["streams"] - session["idle_streams"]
    out.family(
        "homeport_client_connections", "gauge", "Control connections each client holds open."
    )
    for name, count in connections.items():
        out.sample("homeport_client_connections", count, {"client": name})
    out.family(
        "homeport_client_streams",
        "gauge",
        "Streams carrying a request or connection to each client (pooled idle ones not counted).",
    )
    for name, count in streams.items():
        out.sample("homeport_client_streams", count, {"client": name})
    out.family(
        "homeport_client_round_trip_seconds",
        "gauge",
        "Each control connection's last measured round trip (heartbeat PING).",
    )
    for session in sessions:
        if session["round_trip_ms"] is not None:
            out.sample(
                "homeport_client_round_trip_seconds",
                session["round_trip_ms"] / 1000,
                {"client": session["name"], "connection": str(session["connection"])},
            )


def _visitors(out: Exposition, status: dict[str, Any]) -> None:
    tcp = status["tcp_connections"]
    http = status["visitor_connections"] - tcp
    out.family("homeport_visitor_connections", "gauge", "Visitor connections open, by port kind.")
    out.sample("homeport_visitor_connections", http, {"kind": "http"})
    out.sample("homeport_visitor_connections", tcp, {"kind": "tcp"})
    out.family(
        "homeport_visitor_addresses", "gauge", "Addresses (IPv6: /64s) with a connection open."
    )
    out.sample("homeport_visitor_addresses", status["visitor_addresses"])
    out.family("homeport_requests_in_flight", "gauge", "Requests and TCP connections under way.")
    out.sample("homeport_requests_in_flight", status["requests_in_flight"])
    out.family(
        "homeport_visitor_write_buffer_bytes",
        "gauge",
        "Bytes waiting in the exit server to be written to visitors.",
    )
    out.sample("homeport_visitor_write_buffer_bytes", status["visitor_write_buffer_bytes"])
    out.family(
        "homeport_visitor_connections_refused_total",
        "counter",
        "Visitor connections refused by a limit (--max-connections, per address).",
    )
    for limit, count in status["connections_refused"].items():
        out.sample("homeport_visitor_connections_refused_total", count, {"limit": limit})


def _control(out: Exposition, status: dict[str, Any]) -> None:
    out.family("homeport_control_handshakes", "gauge", "Control connections in their handshake.")
    out.sample("homeport_control_handshakes", status["control_handshakes"])
    out.family(
        "homeport_control_connections_refused_total",
        "counter",
        "Control connections refused by a limit of connections in their handshake.",
    )
    for limit, count in status["control_connections_refused"].items():
        out.sample("homeport_control_connections_refused_total", count, {"limit": limit})
    out.family("homeport_auth_failures_total", "counter", "Logins with a missing or wrong token.")
    out.sample("homeport_auth_failures_total", status["auth_failures"])
    out.family(
        "homeport_auth_rate_limited_total",
        "counter",
        "Requests to the control port answered 429: their address failed too often.",
    )
    out.sample("homeport_auth_rate_limited_total", status["auth_rate_limited"])


def _counted(out: Exposition, counts: RequestCounts) -> None:
    clients = sorted(counts.clients.items())
    out.family(
        "homeport_http_requests_total",
        "counter",
        "HTTP requests answered, by the client that served them ('-': none) and status.",
    )
    for name, client in clients:
        statuses = dict(client.http)
        if client.ok:
            statuses[200] = client.ok
        for status, count in sorted(statuses.items()):
            out.sample("homeport_http_requests_total", count, {"client": name, "code": str(status)})
    out.family(
        "homeport_http_request_duration_seconds",
        "histogram",
        "From a request's first byte to its answer's last, by client.",
    )
    for name, client in clients:
        if not client.ok and not client.http:
            continue
        cumulative = 0
        for bound, count in zip(_bucket_labels(), client.buckets, strict=True):
            cumulative += count
            out.sample(
                "homeport_http_request_duration_seconds_bucket",
                cumulative,
                {"client": name, "le": bound},
            )
        out.sample("homeport_http_request_duration_seconds_sum", client.seconds, {"client": name})
        out.sample("homeport_http_request_duration_seconds_count", cumulative, {"client": name})
    out.family(
        "homeport_tcp_connections_total",
        "counter",
        "Raw TCP connections ended, by client, port and status (200: carried to their end).",
    )
    for name, client in clients:
        for (port, status), count in sorted(client.tcp.items()):
            out.sample(
                "homeport_tcp_connections_total",
                count,
                {"client": name, "port": str(port), "code": str(status)},
            )
    out.family(
        "homeport_visitor_bytes_total",
        "counter",
        "Bytes from visitors ('in') and to them ('out'), HTTP and TCP, by client.",
    )
    for name, client in clients:
        out.sample("homeport_visitor_bytes_total", client.bytes_in, {"client": name, "way": "in"})
        out.sample("homeport_visitor_bytes_total", client.bytes_out, {"client": name, "way": "out"})


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
    out.family("process_cpu_seconds_total", "counter", "User and system CPU time spent.")
    out.sample("process_cpu_seconds_total", (int(fields[11]) + int(fields[12])) / ticks)
    out.family("process_virtual_memory_bytes", "gauge", "Virtual memory size.")
    out.sample("process_virtual_memory_bytes", int(fields[20]))
    out.family("process_resident_memory_bytes", "gauge", "Resident memory size.")
    out.sample("process_resident_memory_bytes", int(fields[21]) * resource.getpagesize())
    out.family("process_start_time_seconds", "gauge", "Start time, seconds since the epoch.")
    out.sample("process_start_time_seconds", boot + int(fields[19]) / ticks)
    out.family("process_open_fds", "gauge", "Open file descriptors.")
    out.sample("process_open_fds", descriptors)
    out.family("process_max_fds", "gauge", "The limit of open file descriptors.")
    out.sample("process_max_fds", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
