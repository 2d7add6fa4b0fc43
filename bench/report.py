"""The results: a table on stdout and the same figures as JSON under bench/results/.

Ratios are tunnel / direct. For requests/s and MiB/s they are the share of
direct speed the tunnel keeps (1.0 is no loss); for latencies they are how
many times longer a request takes through the tunnel (1.0 is no added delay).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from bench.download import DownloadResult
from bench.machine import MachineCpu
from bench.measure import AccessLogPoint, Downloads, HttpPoint, Measured, Plan, median_mib_per_s
from bench.upstream import LARGE_BYTES, LARGE_PATH, SMALL_BYTES, SMALL_PATH
from bench.wrk import REQUEST_TIMEOUT_S, WrkResult

SCHEMA_VERSION: Final = 1
LATEST_NAME: Final = "latest.json"
# Busier than this just before or after the run (all CPUs, 100 = all busy): the
# machine was not idle.
BUSY_CPU_PERCENT: Final = 10.0
# More of the CPUs than this used by processes not ours, or taken by the
# hypervisor, during a measurement: its figures are low by an unknown amount.
OTHERS_CPU_PERCENT: Final = 5.0
STEAL_CPU_PERCENT: Final = 5.0
_COLUMNS: Final = "{:<30} {:<12} {:>12} {:>26} {:>8}"


@dataclass(frozen=True)
class Report:
    """Everything one run measured, and on what."""

    started_at: float
    plan: Plan
    machine: dict[str, Any]
    software: dict[str, Any]
    http: list[HttpPoint]
    access_log: AccessLogPoint | None
    downloads: Downloads
    tunnel_status_after: dict[str, Any]
    peak_rss_bytes: dict[str, int | None]

    def measurements(self) -> Iterator[tuple[str, Measured]]:
        """Every wrk measurement, labelled ``c=10 tunnel``."""
        for point in self.http:
            yield f"c={point.connections} direct", point.direct
            yield f"c={point.connections} tunnel", point.tunnel
        if self.access_log is not None:
            yield f"c={self.access_log.connections} tunnel, access log on", self.access_log.tunnel

    def warnings(self) -> list[str]:
        """What a reader should not miss: errors, and CPU taken from what was measured."""
        found = []
        for when in ("before", "after"):
            busy = self.machine.get(f"cpu_busy_percent_{when}")
            if busy is not None and busy > BUSY_CPU_PERCENT:
                found.append(f"the CPUs were {busy:.0f}% busy in the second {when} the run")
        for label, measured in self.measurements():
            if measured.result.errors:
                found.append(f"{label}: errors: {errors_text(measured.result)}")
            machine = measured.machine_cpu
            if machine is None:
                continue
            if machine.others_percent is not None and machine.others_percent > OTHERS_CPU_PERCENT:
                found.append(
                    f"{label}: other processes used {machine.others_percent:.0f}% of the CPUs; "
                    "its figures are low"
                )
            if machine.steal_percent > STEAL_CPU_PERCENT:
                found.append(
                    f"{label}: the hypervisor took {machine.steal_percent:.0f}% of the CPUs "
                    "(steal); its figures are low"
                )
        return found


def ratio(tunnel: float | None, direct: float | None) -> float | None:
    """tunnel / direct, or None when either is missing or direct is zero."""
    if tunnel is None or direct is None or direct == 0:
        return None
    return tunnel / direct


def errors_text(result: WrkResult) -> str:
    """``0``, or the kinds of error wrk counted: ``non-2xx/3xx 4, timeout 2``."""
    kinds = {
        "non-2xx/3xx": result.non_2xx_3xx,
        "connect": result.connect_errors,
        "read": result.read_errors,
        "write": result.write_errors,
        "timeout": result.timeouts,
    }
    text = ", ".join(f"{kind} {count}" for kind, count in kinds.items() if count)
    return text or "0"


# -- JSON ----------------------------------------------------------------------------------


def to_json(report: Report) -> dict[str, Any]:
    """The whole report as JSON-ready data."""
    return {
        "schema": SCHEMA_VERSION,
        "date": _iso_utc(report.started_at),
        "machine": report.machine,
        "software": report.software,
        "parameters": _parameters(report.plan),
        "http": [_http_point(point) for point in report.http],
        "access_log": _access_log(report.access_log, report.http),
        "download": _downloads(report.downloads),
        "tunnel_status_after": report.tunnel_status_after,
        "peak_rss_bytes": report.peak_rss_bytes,
        "warnings": report.warnings(),
    }


def write_results(data: dict[str, Any], results_dir: Path) -> list[Path]:
    """Write ``data`` as ``latest.json`` and a timestamped copy; return both paths."""
    results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2) + "\n"
    stamp = str(data["date"]).replace(":", "-")
    written = []
    for name in (f"{stamp}.json", LATEST_NAME):
        path = results_dir / name
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(text)
        os.replace(temporary, path)
        written.append(path)
    return written


def _iso_utc(timestamp: float) -> str:
    """``2025-11-26T01:23:45Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _parameters(plan: Plan) -> dict[str, Any]:
    """The run's parameters, including the fixed ones."""
    return {
        "duration_s": plan.duration_s,
        "warmup_s": plan.warmup_s,
        "concurrencies": list(plan.concurrencies),
        "max_wrk_threads": plan.max_wrk_threads,
        "wrk_request_timeout_s": REQUEST_TIMEOUT_S,
        "downloads_each_way": plan.downloads,
        "access_log_connections": plan.access_log_connections,
        "quick": plan.quick,
        "small_path": SMALL_PATH,
        "small_bytes": SMALL_BYTES,
        "large_path": LARGE_PATH,
        "large_bytes": LARGE_BYTES,
        "upstream": "own nginx on 127.0.0.1: 1 worker, sendfile, keep-alive, access log off",
        "exit_server_log_level": "warning (access log off); info for the access-log run",
        "client_log_level": "info (no per-request lines)",
    }


def _measured(measured: Measured) -> dict[str, Any]:
    """A wrk run's figures with its error total, and the CPU it took."""
    machine = measured.machine_cpu
    return {
        **vars(measured.result),
        "errors": measured.result.errors,
        "process_cpu_percent": measured.process_cpu_percent,
        "machine_cpu_percent": vars(machine) if machine is not None else None,
    }


def _ratios(tunnel: WrkResult, direct: WrkResult | None) -> dict[str, float | None]:
    """tunnel/direct for requests/s, p50 and p99."""
    return {
        "requests_per_s": ratio(tunnel.requests_per_s, direct.requests_per_s if direct else None),
        "latency_p50": ratio(tunnel.latency_p50_s, direct.latency_p50_s if direct else None),
        "latency_p99": ratio(tunnel.latency_p99_s, direct.latency_p99_s if direct else None),
    }


def _http_point(point: HttpPoint) -> dict[str, Any]:
    """One concurrency, both ways, with tunnel/direct ratios."""
    return {
        "test": f"GET {SMALL_PATH} c={point.connections}",
        "connections": point.connections,
        "wrk_threads": point.threads,
        "direct": _measured(point.direct),
        "tunnel": _measured(point.tunnel),
        "ratio": _ratios(point.tunnel.result, point.direct.result),
    }


def _same_concurrency(http: list[HttpPoint], connections: int) -> HttpPoint | None:
    """The point measured with the access log off at ``connections``, if there was one."""
    return next((point for point in http if point.connections == connections), None)


def _access_log(point: AccessLogPoint | None, http: list[HttpPoint]) -> dict[str, Any] | None:
    """The access-log run, compared with direct and with the log off at its concurrency."""
    if point is None:
        return None
    same = _same_concurrency(http, point.connections)
    logged = point.tunnel.result
    return {
        "test": f"GET {SMALL_PATH} c={point.connections}, exit server access log on",
        "connections": point.connections,
        "wrk_threads": point.threads,
        "tunnel": _measured(point.tunnel),
        "ratio": _ratios(logged, same.direct.result if same else None),
        "ratio_to_tunnel_without_access_log": _ratios(logged, same.tunnel.result if same else None),
    }


def _download_runs(results: list[DownloadResult]) -> dict[str, Any]:
    """Each download and their median throughput."""
    return {
        "median_mib_per_s": median_mib_per_s(results),
        "runs": [{**vars(result), "mib_per_s": result.mib_per_s} for result in results],
    }


def _downloads(downloads: Downloads) -> dict[str, Any]:
    """The /100m downloads both ways, with the ratio of their medians."""
    return {
        "test": f"download {LARGE_PATH}, one at a time (curl)",
        "bytes": LARGE_BYTES,
        "direct": _download_runs(downloads.direct),
        "tunnel": _download_runs(downloads.tunnel),
        "ratio": {
            "mib_per_s": ratio(
                median_mib_per_s(downloads.tunnel), median_mib_per_s(downloads.direct)
            )
        },
    }


# -- the table ---------------------------------------------------------------------------


def format_table(report: Report) -> str:
    """The figures as a text table, with a header saying when, how and on what."""
    lines = [*_header(report), "", _COLUMNS.format("test", "figure", "direct", "tunnel", "ratio")]
    lines.append("-" * len(lines[-1]))
    for point in report.http:
        lines += _measured_rows(
            f"GET {SMALL_PATH} c={point.connections}", point.direct, point.tunnel
        )
    if report.access_log is not None:
        log = report.access_log
        same = _same_concurrency(report.http, log.connections)
        label = f"GET {SMALL_PATH} c={log.connections} access log ON"
        lines += _measured_rows(label, same.direct if same else None, log.tunnel)
        if same is not None:
            slowdown = ratio(log.tunnel.result.requests_per_s, same.tunnel.result.requests_per_s)
            lines.append(_row("", "req/s vs off", "", "", _ratio_text(slowdown)))
    direct_mib = median_mib_per_s(report.downloads.direct)
    tunnel_mib = median_mib_per_s(report.downloads.tunnel)
    lines.append(
        _row(
            f"download {LARGE_PATH} (median of {len(report.downloads.direct)})",
            "MiB/s",
            f"{direct_mib:,.1f}",
            f"{tunnel_mib:,.1f}",
            _ratio_text(ratio(tunnel_mib, direct_mib)),
        )
    )
    warnings = report.warnings()
    if warnings:
        lines += ["", "WARNINGS:", *(f"  {warning}" for warning in warnings)]
    return "\n".join(lines)


def _header(report: Report) -> list[str]:
    """Three lines: when, how and on what it was measured."""
    plan, machine, software = report.plan, report.machine, report.software
    packages = ", ".join(
        f"{name} {version}" for name, version in software["packages"].items() if version
    )
    git = software.get("git") or {}
    revision = f"{git.get('commit', '?')[:10]}{' (dirty)' if git.get('dirty') else ''}"
    return [
        f"homeport benchmark, {_iso_utc(report.started_at)}, git {revision}",
        f"{plan.duration_s} s per run after {plan.warmup_s} s warm-up; wrk "
        f"-t{plan.max_wrk_threads} at most, keep-alive; exit server access log off unless stated",
        f"{machine['nproc']} x {machine['cpu_model']}; {software['python']}; {packages}; "
        f"nginx {software['nginx']} (1 worker)",
    ]


def _measured_rows(label: str, direct: Measured | None, tunnel: Measured) -> list[str]:
    """requests/s, p50, p99, errors and CPU for one test; ``ratio`` is tunnel/direct."""
    d, t = (direct.result if direct else None), tunnel.result
    return [
        _row(
            label,
            "req/s",
            f"{d.requests_per_s:,.0f}" if d else "-",
            f"{t.requests_per_s:,.0f}",
            _ratio_text(ratio(t.requests_per_s, d.requests_per_s if d else None)),
        ),
        _row(
            "",
            "p50",
            _ms(d.latency_p50_s) if d else "-",
            _ms(t.latency_p50_s),
            _ratio_text(ratio(t.latency_p50_s, d.latency_p50_s if d else None)),
        ),
        _row(
            "",
            "p99",
            _ms(d.latency_p99_s) if d else "-",
            _ms(t.latency_p99_s),
            _ratio_text(ratio(t.latency_p99_s, d.latency_p99_s if d else None)),
        ),
        _row("", "errors", errors_text(d) if d else "-", errors_text(t), ""),
        _row("", "cpu procs", _processes(direct), _processes(tunnel), ""),
        _row("", "cpu all/oth", _machine(direct), _machine(tunnel), ""),
    ]


def _processes(measured: Measured | None) -> str:
    """``srv 95% cli 30% ngx 10%``: each watched process, 100 % being one core."""
    if measured is None:
        return "-"
    short = {"nginx": "ngx", "server": "srv", "client": "cli"}
    return " ".join(
        f"{short.get(name, name)} {percent:.0f}%"
        for name, percent in measured.process_cpu_percent.items()
    )


def _machine(measured: Measured | None) -> str:
    """``97% / 2%``: all CPUs busy, and the share of other processes (100 % is every CPU)."""
    use: MachineCpu | None = measured.machine_cpu if measured else None
    if use is None:
        return "-"
    others = f"{use.others_percent:.0f}%" if use.others_percent is not None else "?"
    return f"{use.busy_percent:.0f}% / {others}"


def _row(label: str, figure: str, direct: str, tunnel: str, ratio_text: str) -> str:
    """One line of the table, its columns aligned."""
    return _COLUMNS.format(label, figure, direct, tunnel, ratio_text).rstrip()


def _ms(value_s: float) -> str:
    """A latency in milliseconds, with a precision that suits its size."""
    ms = value_s * 1000
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


def _ratio_text(value: float | None) -> str:
    """A ratio with two decimals (three below 0.1), or ``-``."""
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 0.1 else f"{value:.2f}"
