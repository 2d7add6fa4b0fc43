"""The results: a table on stdout and the same figures as JSON under bench/results/.

Ratios are tunnel / direct, for each tunnel (homeport, ssh -R and the peers)
against the direct figure of the same run. For requests/s and MiB/s they are the share of
direct speed the tunnel keeps (1.0 is no loss); for latencies they are how
many times longer a request takes through the tunnel (1.0 is no added delay).
The target column holds issue 5's targets, checked for homeport. The main
table shows homeport beside ``ssh -R``; a second one puts every tunnel's
ratios side by side, the peers' among them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.goals import Figures, Goal, check_goals, per_stream_spec, ratio
from bench.machine import MachineCpu
from bench.measure import (
    AccessLogPoint,
    HttpPoint,
    Measured,
    Plan,
    TransferRun,
    Transfers,
)
from bench.peers import PAGEKITE, PIPENET
from bench.streams import StreamsResult
from bench.targets import (
    DIRECT,
    HOMEPORT,
    HOMEPORT_WSS,
    LABELS,
    RELAYS,
    SIDES,
    SSH_R,
)
from bench.transfer import MIB
from bench.upstream import LARGE_BYTES, LARGE_PATH, SMALL_BYTES, SMALL_PATH, UPLOAD_PATH
from bench.wrk import REQUEST_TIMEOUT_S, WrkResult

SCHEMA_VERSION: Final = 3  # 3: wrk tests in rounds
LATEST_NAME: Final = "latest.json"
# Busier than this just before or after the run (all CPUs, 100 = all busy): the
# machine was not idle.
BUSY_CPU_PERCENT: Final = 10.0
# More of the CPUs than this used by processes not ours, or taken by the
# hypervisor, during a measurement: its figures are low by an unknown amount.
OTHERS_CPU_PERCENT: Final = 5.0
STEAL_CPU_PERCENT: Final = 5.0
#: every tunnel compared, in the order of the side-by-side table and the chart
TUNNELS: Final = (HOMEPORT, SSH_R, PIPENET, PAGEKITE, RELAYS)
#: the main table's tunnels: homeport and the baseline every user has
MAIN_TUNNELS: Final = (HOMEPORT, SSH_R)
# label, figure, direct, homeport, ratio, ssh -R, ratio, target, verdict
_COLUMNS: Final = "{:<27} {:<14} {:>11} {:>21} {:>6} {:>21} {:>6}  {:<14} {}"
_SHORT: Final = {"nginx": "ngx", "server": "srv", "client": "cli"}


@dataclass(frozen=True)
class Report:
    """Everything one run measured, and on what."""

    started_at: float
    plan: Plan
    machine: dict[str, Any]
    software: dict[str, Any]
    targets: tuple[str, ...]  # the columns measured: direct, homeport and (unless off) ssh_r
    http: list[HttpPoint]
    new_connection: HttpPoint | None
    access_log: AccessLogPoint | None
    downloads: Transfers
    uploads: Transfers
    idle_rss_bytes: dict[str, dict[str, int | None]]  # tunnel -> server/client -> bytes
    streams: dict[str, StreamsResult]
    tunnel_status_after: dict[str, Any]
    #: peers that failed and left the run: where and why
    dropped: dict[str, str] = field(default_factory=dict)

    @property
    def figures(self) -> Figures:
        """The figures the targets are checked against."""
        return Figures(
            http=self.http,
            new_connection=self.new_connection,
            downloads=self.downloads,
            uploads=self.uploads,
            idle_rss_bytes=self.idle_rss_bytes,
            streams=self.streams,
            stream_counts=self.plan.stream_counts,
        )

    def goals(self, target: str = HOMEPORT) -> list[Goal]:
        """Issue 5's targets checked for ``target``."""
        return check_goals(self.figures, target)

    def measurements(self) -> Iterator[tuple[str, Measured]]:
        """Every wrk measurement, labelled ``c=10 homeport``."""
        points = [*self.http, *([self.new_connection] if self.new_connection else [])]
        for point in points:
            for target, measured in point.by_target.items():
                yield f"{point.test}, {LABELS[target]}", measured
        if self.access_log is not None:
            label = f"GET {SMALL_PATH} c={self.access_log.connections}, homeport, access log on"
            yield label, self.access_log.tunnel

    def transfer_runs(self) -> Iterator[tuple[str, TransferRun]]:
        """Every measured download and upload, labelled ``download 2, ssh -R``."""
        for transfers in (self.downloads, self.uploads):
            for target, runs in transfers.by_target.items():
                for number, run in enumerate(runs, 1):
                    yield f"{transfers.kind} {number}, {LABELS[target]}", run

    def warnings(self) -> list[str]:
        """What a reader must not miss: errors, and CPU taken from what was measured."""
        found = [
            f"{LABELS[target]} left the run, its later figures missing: {reason}"
            for target, reason in self.dropped.items()
        ]
        for when in ("before", "after"):
            busy = self.machine.get(f"cpu_busy_percent_{when}")
            if busy is not None and busy > BUSY_CPU_PERCENT:
                found.append(f"the CPUs were {busy:.0f}% busy in the second {when} the run")
        for label, measured in self.measurements():
            if measured.result.errors:
                found.append(f"{label}: errors: {errors_text(measured.result)}")
            found += _interference(label, measured.machine_cpu)
        for label, run in self.transfer_runs():
            found += _interference(label, run.machine_cpu)
        for target, streams in self.streams.items():
            for point in streams.points:
                if point.opened < point.count or not point.confirmed:
                    server = point.server_status
                    on_server = (
                        f", the exit server {server['visitor_connections']:,} visitor "
                        f"connections and {server['streams']:,} streams"
                        if server is not None
                        else ""
                    )
                    found.append(
                        f"idle streams through {LABELS[target]}: {point.opened:,} of "
                        f"{point.count:,} opened; counted open: the idle upstream "
                        f"{point.upstream_open:,}{on_server}"
                    )
            if streams.errors:
                samples = "; ".join(streams.error_samples)
                found.append(
                    f"idle streams through {LABELS[target]}: failures {streams.errors} "
                    f"(e.g. {samples})"
                )
        return found

    def interfered(self) -> bool:
        """Whether other load took CPU from some measurement (so figures are low)."""
        return any(
            "other processes" in warning or "steal" in warning or "busy" in warning
            for warning in self.warnings()
        )


def _interference(label: str, machine: MachineCpu | None) -> list[str]:
    """Warnings for a measurement during which others used the CPUs."""
    if machine is None:
        return []
    found = []
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


def client_cpu_line(report: Report) -> str:
    """The client's (the Pi side's) CPU per GiB carried: the figure the issue asks for."""
    parts = []
    for target in report.targets:
        if target == DIRECT:
            continue
        down = report.downloads.cpu_s_per_gib(target, "client")
        up = report.uploads.cpu_s_per_gib(target, "client")
        parts.append(f"{LABELS[target]} {_seconds(down)} down, {_seconds(up)} up")
    return "client (Pi side) CPU seconds per GiB carried, lower is better: " + "; ".join(parts)


# -- JSON ----------------------------------------------------------------------------------


def to_json(report: Report) -> dict[str, Any]:
    """The whole report as JSON-ready data."""
    return {
        "schema": SCHEMA_VERSION,
        "date": iso_utc(report.started_at),
        "machine": report.machine,
        "software": report.software,
        "parameters": _parameters(report.plan, report.targets),
        "targets": {
            target: [_goal(goal) for goal in report.goals(target)]
            for target in TUNNELS
            if target in report.targets
        },
        "http": [_http_point(point) for point in report.http],
        "new_connection": _http_point(report.new_connection) if report.new_connection else None,
        "access_log": _access_log(report.access_log, report.http),
        "download": _transfers(report.downloads),
        "upload": _transfers(report.uploads),
        "memory": _memory(report),
        "cpu_s_per_gib": _cpu_per_gib(report),
        "tunnel_status_after": report.tunnel_status_after,
        "dropped": report.dropped,
        "warnings": report.warnings(),
    }


def write_results(data: dict[str, Any], results_dir: Path) -> list[Path]:
    """Write ``data`` as ``latest.json`` and a timestamped copy; return both paths."""
    results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, indent=2) + "\n"
    written = []
    for name in (f"{stamp(data['date'])}.json", LATEST_NAME):
        path = results_dir / name
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(text)
        os.replace(temporary, path)
        written.append(path)
    return written


def iso_utc(timestamp: float) -> str:
    """``2025-11-26T01:23:45Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def stamp(date: str) -> str:
    """A file name part from an ISO date: ``2025-11-26T01-23-45Z``."""
    return date.replace(":", "-")


def _goal(goal: Goal) -> dict[str, Any]:
    return {
        "figure": goal.spec.key,
        "value": goal.value,
        "target": f"{goal.spec.comparison} {goal.spec.limit:g}",
        "verdict": goal.verdict,
    }


def _parameters(plan: Plan, targets: tuple[str, ...]) -> dict[str, Any]:
    """The run's parameters, including the fixed ones."""
    return {
        "targets": [LABELS[target] for target in targets],
        "duration_s": plan.duration_s,
        "rounds": plan.rounds,
        "warmup_s": plan.warmup_s,
        "concurrencies": list(plan.concurrencies),
        "new_connection_connections": plan.new_connection_connections,
        "max_wrk_threads": plan.max_wrk_threads,
        "wrk_request_timeout_s": REQUEST_TIMEOUT_S,
        "transfers_each_way": plan.transfers,
        "access_log_connections": plan.access_log_connections,
        "stream_counts": list(plan.stream_counts),
        "quick": plan.quick,
        "small_path": SMALL_PATH,
        "small_bytes": SMALL_BYTES,
        "large_path": LARGE_PATH,
        "upload_path": UPLOAD_PATH,
        "large_bytes": LARGE_BYTES,
        "upstream": "own nginx on 127.0.0.1: 1 worker, sendfile, keep-alive, access log off; "
        "POST /upload read whole (mirror_request_body) then 200, logged with $request_length",
        "exit_server_log_level": "warning (access log off); info for the access-log run",
        "client_log_level": "info (no per-request lines)",
        "ssh": "own sshd -D on 127.0.0.1 and ssh -N -R, OpenSSH's default cipher, no compression",
        "rss": "VmRSS from /proc, summed over a process and its descendants (sshd: its "
        "listener and its connection process)",
        "peak_rss": "VmHWM after resetting it (/proc/PID/clear_refs 5) before the run",
    }


def _measured(measured: Measured) -> dict[str, Any]:
    """A wrk run's figures with its error total, the CPU it took and the peak RSS."""
    machine = measured.machine_cpu
    return {
        **vars(measured.result),
        "errors": measured.result.errors,
        "process_cpu_percent": measured.process_cpu_percent,
        "process_cpu_s": measured.process_cpu_s,
        "cpu_us_per_request": {
            name: measured.cpu_us_per_request(name) for name in measured.process_cpu_s
        },
        "machine_cpu_percent": vars(machine) if machine is not None else None,
        "peak_rss_bytes": measured.peak_rss_bytes,
        "peak_rss_since": "run start" if measured.peak_rss_reset else "process start",
    }


def _ratios(result: WrkResult, direct: WrkResult | None) -> dict[str, float | None]:
    """result/direct for requests/s, p50 and p99."""
    return {
        "requests_per_s": ratio(result.requests_per_s, direct.requests_per_s if direct else None),
        "latency_p50": ratio(result.latency_p50_s, direct.latency_p50_s if direct else None),
        "latency_p99": ratio(result.latency_p99_s, direct.latency_p99_s if direct else None),
    }


def _http_point(point: HttpPoint) -> dict[str, Any]:
    """One concurrency, every target, with each tunnel's ratios to direct."""
    direct = point.by_target[DIRECT].result
    return {
        "test": point.test,
        "kind": point.kind,
        "connections": point.connections,
        "wrk_threads": point.threads,
        **{target: _measured(measured) for target, measured in point.by_target.items()},
        "ratio": {
            target: {
                **_ratios(measured.result, direct),
                "requests_per_s_by_round": point.round_ratios(target, DIRECT),
            }
            for target, measured in point.by_target.items()
            if target != DIRECT
        },
        "rounds": {
            target: [
                {
                    "requests_per_s": run.result.requests_per_s,
                    "latency_p50_s": run.result.latency_p50_s,
                    "latency_p99_s": run.result.latency_p99_s,
                    "errors": run.result.errors,
                }
                for run in runs
            ]
            for target, runs in point.rounds.items()
        },
    }


def _same_concurrency(http: list[HttpPoint], connections: int) -> HttpPoint | None:
    """The keep-alive point at ``connections``, if there was one."""
    return next((point for point in http if point.connections == connections), None)


def _access_log(point: AccessLogPoint | None, http: list[HttpPoint]) -> dict[str, Any] | None:
    """The access-log run, compared with direct and with the log off at its concurrency."""
    if point is None:
        return None
    same = _same_concurrency(http, point.connections)
    logged = point.tunnel.result
    direct = same.by_target[DIRECT].result if same else None
    unlogged = same.by_target[HOMEPORT].result if same else None
    return {
        "test": f"GET {SMALL_PATH} c={point.connections}, exit server access log on",
        "connections": point.connections,
        "wrk_threads": point.threads,
        HOMEPORT: _measured(point.tunnel),
        "ratio": _ratios(logged, direct),
        "ratio_to_homeport_without_access_log": _ratios(logged, unlogged),
    }


def _transfers(transfers: Transfers) -> dict[str, Any]:
    """The 100 MiB transfers through every target, with each tunnel's ratio of medians."""
    direct = transfers.median_mib_per_s(DIRECT)
    verb = "download" if transfers.kind == "download" else "upload"
    path = LARGE_PATH if verb == "download" else UPLOAD_PATH
    return {
        "test": f"{verb} 100 MiB ({path}), one at a time (curl)",
        "bytes": LARGE_BYTES,
        **{
            target: {
                "median_mib_per_s": transfers.median_mib_per_s(target),
                "cpu_s_per_gib": {
                    name: transfers.cpu_s_per_gib(target, name) for name in runs[0].cpu_s
                }
                if runs
                else {},
                "runs": [
                    {
                        **vars(run.result),
                        "mib_per_s": run.result.mib_per_s,
                        "cpu_s": run.cpu_s,
                        "machine_cpu_percent": vars(run.machine_cpu) if run.machine_cpu else None,
                    }
                    for run in runs
                ],
            }
            for target, runs in transfers.by_target.items()
        },
        "ratio": {
            target: {"mib_per_s": ratio(transfers.median_mib_per_s(target), direct)}
            for target in transfers.by_target
            if target != DIRECT
        },
    }


def _peak_rss_at(report: Report, connections: int) -> dict[str, dict[str, int | None]]:
    point = _same_concurrency(report.http, connections)
    if point is None:
        return {}
    return {
        target: measured.peak_rss_bytes
        for target, measured in point.by_target.items()
        if target != DIRECT
    }


def _memory(report: Report) -> dict[str, Any]:
    """RSS idle, under load, and per idle stream, for each tunnel."""
    return {
        "idle_rss_bytes": report.idle_rss_bytes,
        "peak_rss_bytes_c100": _peak_rss_at(report, 100),
        "streams": {target: _streams(result) for target, result in report.streams.items()},
    }


def _streams(result: StreamsResult) -> dict[str, Any]:
    return {
        "baseline_rss_bytes": result.baseline_rss_bytes,
        "points": [vars(point) for point in result.points],
        "closed_s": result.closed_s,
        "heartbeats_until_released": result.heartbeats,
        "after_close_rss_bytes": result.after_close_rss_bytes,
        "errors": result.errors,
        "error_samples": result.error_samples,
    }


def _cpu_per_gib(report: Report) -> dict[str, Any]:
    """CPU seconds per GiB carried, per tunnel side, for downloads and uploads."""
    return {
        target: {
            transfers.kind: {
                side: transfers.cpu_s_per_gib(target, side) for side in (*SIDES, "nginx")
            }
            for transfers in (report.downloads, report.uploads)
        }
        for target in report.targets
        if target != DIRECT
    }


# -- the table ---------------------------------------------------------------------------


def format_table(report: Report) -> str:
    """The figures as a text table, with a header saying when, how and on what."""
    tunnels: list[str] = [target for target in MAIN_TUNNELS if target in report.targets]
    goals = {goal.spec.key: goal for goal in report.goals(HOMEPORT)}
    table = _Table(tunnels, goals)
    for point in report.http:
        table.wrk_rows(point, peak_rss=point.connections == 100)
        if HOMEPORT_WSS in point.by_target:
            table.wss_rows(point)
    if report.access_log is not None:
        table.access_log_rows(report.access_log, _same_concurrency(report.http, 100))
    if report.new_connection is not None:
        table.wrk_rows(report.new_connection, peak_rss=False)
    table.transfer_rows(report.downloads)
    table.transfer_rows(report.uploads)
    table.memory_rows(report)
    verdicts = [goal.verdict for goal in goals.values()]
    lines = [*_header(report)]
    if report.interfered():
        lines += [
            "",
            "!! OTHER LOAD ON THE MACHINE DURING THIS RUN: some figures are low by an unknown",
            "!! amount (see WARNINGS at the end); re-run when `uptime` shows a quiet machine.",
        ]
    lines += ["", *table.lines]
    if any(target not in MAIN_TUNNELS for target in report.targets if target in TUNNELS):
        lines += ["", *side_by_side(report)]
    lines += [
        "",
        client_cpu_line(report),
        f"targets (homeport): {verdicts.count('PASS')} PASS, {verdicts.count('MISS')} MISS"
        + (f", {verdicts.count('n/a')} not measured" if "n/a" in verdicts else ""),
    ]
    warnings = report.warnings()
    if warnings:
        lines += ["", "WARNINGS:", *(f"  {warning}" for warning in warnings)]
    return "\n".join(lines)


# label, then a ratio (or figure) for each tunnel
_SIDE_LABEL: Final = "{:<34}"
_SIDE_CELL: Final = " {:>13}"


def side_by_side(report: Report) -> list[str]:
    """Every tunnel's figures as ratios to direct in this run, one column per tunnel.

    Rates (req/s, conn/s, MiB/s) are the share of direct's kept, higher is
    better; the p99 is how many times direct's, lower is better; memory and CPU
    are the tunnel's own, lower is better.
    """
    tunnels = [target for target in TUNNELS if target in report.targets]
    lines = [
        "every tunnel side by side (ratios to direct in this run; rates higher, "
        "the rest lower is better)",
        _SIDE_LABEL.format("") + "".join(_SIDE_CELL.format(LABELS[target]) for target in tunnels),
    ]
    lines.append("-" * len(lines[-1]))

    def add(label: str, cells: list[str]) -> None:
        lines.append(
            (_SIDE_LABEL.format(label) + "".join(_SIDE_CELL.format(c) for c in cells)).rstrip()
        )

    points = [*report.http, *([report.new_connection] if report.new_connection else [])]
    for point in points:
        direct = point.by_target[DIRECT].result
        label = (
            f"c={point.connections} new conn, conn/s"
            if point.kind != "keep-alive"
            else f"GET {SMALL_PATH} c={point.connections}, req/s"
        )
        results = [point.by_target[t].result if t in point.by_target else None for t in tunnels]
        add(
            label,
            [
                _ratio_text(ratio(r.requests_per_s, direct.requests_per_s)) if r else "-"
                for r in results
            ],
        )
        if point.connections == 100 and point.kind == "keep-alive":
            add(
                "  p99, x direct",
                [
                    _ratio_text(ratio(r.latency_p99_s, direct.latency_p99_s)) if r else "-"
                    for r in results
                ],
            )
            add("  errors", [f"{r.errors:,}" if r else "-" for r in results])
    for transfers in (report.downloads, report.uploads):
        direct_mib = transfers.median_mib_per_s(DIRECT)
        add(
            f"{transfers.kind} 100 MiB, MiB/s",
            [_ratio_text(ratio(transfers.median_mib_per_s(t), direct_mib)) for t in tunnels],
        )
    for side in SIDES:
        add(
            f"idle RSS, {side}",
            [_mib(report.idle_rss_bytes.get(t, {}).get(side)) for t in tunnels],
        )
    for transfers in (report.downloads, report.uploads):
        add(
            f"client cpu per GiB, {transfers.kind}",
            [_seconds(transfers.cpu_s_per_gib(t, "client")) for t in tunnels],
        )
    return lines


class _Table:
    """The table's lines, built section by section."""

    def __init__(self, tunnels: list[str], goals: dict[str, Goal]) -> None:
        self.tunnels = tunnels
        self.goals = goals
        header = self._format(
            "test", "figure", "direct", "homeport", "ratio", "ssh -R", "ratio", "target", ""
        )
        self.lines = [header, "-" * len(header)]

    def row(
        self,
        label: str,
        figure: str,
        direct: str,
        cells: dict[str, str],
        ratios: dict[str, float | None] | None = None,
        goal_key: str | None = None,
    ) -> None:
        """One line: a figure for direct and each tunnel, their ratios and homeport's verdict."""
        ratios = ratios or {}
        goal = self.goals.get(goal_key) if goal_key else None
        self.lines.append(
            self._format(
                label,
                figure,
                direct,
                cells.get(HOMEPORT, ""),
                _ratio_text(ratios.get(HOMEPORT)) if HOMEPORT in ratios else "",
                cells.get(SSH_R, "") if SSH_R in self.tunnels else "",
                _ratio_text(ratios.get(SSH_R)) if SSH_R in ratios else "",
                goal.spec.text if goal else "",
                goal.verdict if goal else "",
            )
        )

    def wrk_rows(self, point: HttpPoint, *, peak_rss: bool) -> None:
        """req/s, p50, p99, errors and CPU for one wrk test through every target."""
        direct = point.by_target[DIRECT].result
        tunnels = {t: m for t, m in point.by_target.items() if t != DIRECT}
        results = {t: m.result for t, m in tunnels.items()}
        new = point.kind != "keep-alive"
        label = (
            f"GET {SMALL_PATH} c={point.connections} new conn"
            if new
            else f"GET {SMALL_PATH} c={point.connections}"
        )
        goal_prefix = "new_connection" if new else f"c{point.connections}"

        def ratios(field: str) -> dict[str, float | None]:
            return {t: ratio(getattr(r, field), getattr(direct, field)) for t, r in results.items()}

        self.row(
            label,
            "conn/s" if new else "req/s",
            f"{direct.requests_per_s:,.0f}",
            {t: f"{r.requests_per_s:,.0f}" for t, r in results.items()},
            ratios("requests_per_s"),
            f"{goal_prefix}_requests_per_s_ratio",
        )
        if len(point.rounds[DIRECT]) > 1:
            self.row(
                "",
                "ratio by round",
                "",
                {t: " ".join(map(_ratio_text, point.round_ratios(t, DIRECT))) for t in tunnels},
            )
        self.row(
            "",
            "p50",
            _ms(direct.latency_p50_s),
            {t: _ms(r.latency_p50_s) for t, r in results.items()},
            ratios("latency_p50_s"),
        )
        self.row(
            "",
            "p99",
            _ms(direct.latency_p99_s),
            {t: _ms(r.latency_p99_s) for t, r in results.items()},
            ratios("latency_p99_s"),
            f"{goal_prefix}_latency_p99_ratio",
        )
        self.row(
            "",
            "errors",
            errors_text(direct),
            {t: errors_text(r) for t, r in results.items()},
            goal_key=f"{goal_prefix}_errors",
        )
        self.row(
            "",
            "cpu % procs",
            _processes(point.by_target[DIRECT]),
            {t: _processes(m) for t, m in tunnels.items()},
        )
        self.row(
            "",
            "cpu us/req",
            _per_request(point.by_target[DIRECT]),
            {t: _per_request(m) for t, m in tunnels.items()},
        )
        self.row(
            "",
            "cpu % all/oth",
            _machine(point.by_target[DIRECT]),
            {t: _machine(m) for t, m in tunnels.items()},
        )
        if peak_rss:
            self.row(
                "",
                "peak RSS s/c",
                "",
                {t: _server_client_mib(m.peak_rss_bytes) for t, m in tunnels.items()},
            )

    def wss_rows(self, point: HttpPoint) -> None:
        """The same test through the tunnel whose control channel is TLS, in homeport's column."""
        direct = point.by_target[DIRECT].result
        measured = point.by_target[HOMEPORT_WSS]
        result = measured.result
        plain = point.by_target[HOMEPORT].result
        self.row(
            "  over wss (TLS)",
            "req/s",
            "",
            {HOMEPORT: f"{result.requests_per_s:,.0f}"},
            {HOMEPORT: ratio(result.requests_per_s, direct.requests_per_s)},
        )
        if len(point.rounds[DIRECT]) > 1:
            self.row(
                "",
                "ratio by round",
                "",
                {HOMEPORT: " ".join(map(_ratio_text, point.round_ratios(HOMEPORT_WSS, DIRECT)))},
            )
        self.row(
            "",
            "p99",
            "",
            {HOMEPORT: _ms(result.latency_p99_s)},
            {HOMEPORT: ratio(result.latency_p99_s, direct.latency_p99_s)},
        )
        self.row("", "errors", "", {HOMEPORT: errors_text(result)})
        self.row("", "cpu us/req", "", {HOMEPORT: _per_request(measured)})
        self.row(
            "",
            "req/s vs ws",
            "",
            {},
            {HOMEPORT: ratio(result.requests_per_s, plain.requests_per_s)},
        )

    def access_log_rows(self, point: AccessLogPoint, same: HttpPoint | None) -> None:
        """The c=100 run through homeport with its access log on."""
        result = point.tunnel.result
        direct = same.by_target[DIRECT].result if same else None
        unlogged = same.by_target[HOMEPORT].result if same else None
        label = f"GET {SMALL_PATH} c={point.connections} log ON"
        self.row(
            label,
            "req/s",
            f"{direct.requests_per_s:,.0f}" if direct else "-",
            {HOMEPORT: f"{result.requests_per_s:,.0f}"},
            {HOMEPORT: ratio(result.requests_per_s, direct.requests_per_s if direct else None)},
        )
        self.row(
            "",
            "p99",
            _ms(direct.latency_p99_s) if direct else "-",
            {HOMEPORT: _ms(result.latency_p99_s)},
            {HOMEPORT: ratio(result.latency_p99_s, direct.latency_p99_s if direct else None)},
        )
        self.row("", "errors", "", {HOMEPORT: errors_text(result)})
        self.row(
            "",
            "req/s vs off",
            "",
            {},
            {HOMEPORT: ratio(result.requests_per_s, unlogged.requests_per_s if unlogged else None)},
        )

    def transfer_rows(self, transfers: Transfers) -> None:
        """Median MiB/s and CPU per GiB of each side, for downloads or uploads."""
        direct = transfers.median_mib_per_s(DIRECT)
        count = len(transfers.by_target.get(DIRECT, []))
        label = f"{transfers.kind} 100 MiB, median {count}"
        medians = {t: transfers.median_mib_per_s(t) for t in self.tunnels}
        self.row(
            label,
            "MiB/s",
            f"{direct:,.1f}" if direct is not None else "-",
            {t: f"{m:,.1f}" if m is not None else "-" for t, m in medians.items()},
            {t: ratio(m, direct) for t, m in medians.items()},
            f"{transfers.kind}_mib_per_s_ratio",
        )
        for side in SIDES:
            self.row(
                "",
                f"{side} cpu s/GiB",
                "",
                {t: _seconds(transfers.cpu_s_per_gib(t, side)) for t in self.tunnels},
            )
        if HOMEPORT_WSS in transfers.by_target:
            over_tls = transfers.median_mib_per_s(HOMEPORT_WSS)
            self.row(
                "  over wss (TLS)",
                "MiB/s",
                "",
                {HOMEPORT: f"{over_tls:,.1f}" if over_tls is not None else "-"},
                {HOMEPORT: ratio(over_tls, direct)},
            )
            for side in SIDES:
                self.row(
                    "",
                    f"{side} cpu s/GiB",
                    "",
                    {HOMEPORT: _seconds(transfers.cpu_s_per_gib(HOMEPORT_WSS, side))},
                )

    def memory_rows(self, report: Report) -> None:
        """RSS idle, and per idle stream at each count, of each tunnel side."""
        for side in SIDES:
            self.row(
                "memory: idle RSS" if side == "server" else "",
                side,
                "",
                {t: _mib(report.idle_rss_bytes.get(t, {}).get(side)) for t in self.tunnels},
                goal_key=f"idle_rss_{side}_bytes",
            )
        over_tls = report.idle_rss_bytes.get(HOMEPORT_WSS)
        if over_tls is not None:
            for side in SIDES:
                self.row(
                    "  over wss (TLS)" if side == "server" else "",
                    side,
                    "",
                    {HOMEPORT: _mib(over_tls.get(side))},
                )
        for count in report.plan.stream_counts:
            points = {
                t: next((p for p in result.points if p.count == count), None)
                for t, result in report.streams.items()
            }
            for side in SIDES:
                self.row(
                    f"memory per stream @{count:,}" if side == "server" else "",
                    side,
                    "",
                    {
                        t: _kib(p.per_stream_bytes.get(side)) if p else "-"
                        for t, p in points.items()
                    },
                    goal_key=per_stream_spec(side, count).key,
                )
            self.row(
                "",
                "open",
                "",
                {
                    t: f"{min(p.opened, p.upstream_open):,} in {p.open_s:.0f} s" if p else "-"
                    for t, p in points.items()
                },
                goal_key=f"open_streams_{count}",
            )
        self.row(
            "streams of visitors gone",
            "released",
            "",
            {t: _released(result) for t, result in report.streams.items()},
        )

    @staticmethod
    def _format(*cells: str) -> str:
        return _COLUMNS.format(*cells).rstrip()


def _header(report: Report) -> list[str]:
    """When, how and on what it was measured, which build of homeport, and the peers."""
    plan, machine, software = report.plan, report.machine, report.software
    packages = ", ".join(
        f"{name} {version}" for name, version in software["packages"].items() if version
    )
    git = software.get("git") or {}
    revision = f"{git.get('commit', '?')[:10]}{' (dirty)' if git.get('dirty') else ''}"
    ssh = (software.get("openssh") or "-").split(",")[0]
    lines = [
        f"homeport benchmark, {iso_utc(report.started_at)}, git {revision}",
        f"wrk: {_rounds_text(plan)} after {plan.warmup_s} s warm-up, "
        f"-t{plan.max_wrk_threads} at most; exit server access log off unless stated; "
        "ratios are to direct in this run",
        f"{machine['nproc']} x {machine['cpu_model']}; load average "
        f"{' '.join(f'{x:.2f}' for x in machine['load_average_1m_5m_15m'])} at the start"
        + _wake_up_text(machine.get("wake_up_round_trip_us")),
        f"{software['python']}; {packages}; nginx {software['nginx']} (1 worker); {ssh} "
        f"({software.get('ssh_cipher') or 'default cipher'})",
        f"homeport: exit server {software.get('exit_server_build', 'pure Python')}, "
        f"client pure Python; both, and the relays, on "
        f"{software.get('tunnel_python', software['python'])}",
    ]
    if "pipenet" in software:
        lines.append(
            f"peers: pipenet {software['pipenet']} (Node.js {software.get('node', '?')}), "
            f"PageKite {software.get('pagekite', '?')}, each with its own defaults"
        )
    return lines


def _wake_up_text(round_trip_us: float | None) -> str:
    """The header's note of what a wake-up costs here (older result files lack it)."""
    if round_trip_us is None:
        return ""
    return f"; a round trip between two processes {round_trip_us:.1f} us (two wake-ups)"


def _rounds_text(plan: Plan) -> str:
    """``median of 3 rounds of 5 s, targets taking turns`` or ``one run of 3 s``."""
    if plan.rounds == 1:
        return f"one run of {plan.duration_s} s"
    return f"median of {plan.rounds} rounds of {plan.duration_s} s, targets taking turns,"


def _processes(measured: Measured) -> str:
    """``srv 95 cli 30 ngx 10``: each watched process, 100 being one core."""
    return " ".join(
        f"{_SHORT.get(name, name)} {percent:.0f}"
        for name, percent in measured.process_cpu_percent.items()
    )


def _per_request(measured: Measured) -> str:
    """``srv 140 cli 40 ngx 12``: CPU microseconds per request of each watched process."""
    cells = []
    for name in measured.process_cpu_s:
        value = measured.cpu_us_per_request(name)
        cells.append(f"{_SHORT.get(name, name)} {value:.0f}" if value is not None else "-")
    return " ".join(cells)


def _machine(measured: Measured) -> str:
    """``97 / 2``: all CPUs busy, and the share of other processes (100 is every CPU)."""
    use = measured.machine_cpu
    if use is None:
        return "-"
    others = f"{use.others_percent:.0f}" if use.others_percent is not None else "?"
    return f"{use.busy_percent:.0f} / {others}"


def _server_client_mib(values: dict[str, int | None]) -> str:
    """``31.2 / 30.1 MiB``: the server's and the client's."""
    server, client = values.get("server"), values.get("client")
    if server is None or client is None:
        return "-"
    return f"{server / MIB:.1f} / {client / MIB:.1f} MiB"


def _released(result: StreamsResult) -> str:
    """How the tunnel let go of the streams of visitors who left."""
    if result.closed_s is None:
        return "-"
    if result.heartbeats == 0:
        return f"in {result.closed_s:.1f} s"
    return f"{result.closed_s:.1f} s, {result.heartbeats} heartbeats"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f} MiB"


def _kib(value: float | None) -> str:
    return "-" if value is None else f"{value / 1024:.1f} KiB"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _ms(value_s: float) -> str:
    """A latency in milliseconds, with a precision that suits its size."""
    ms = value_s * 1000
    return f"{ms:.3f} ms" if ms < 10 else f"{ms:.1f} ms"


def _ratio_text(value: float | None) -> str:
    """A ratio with two decimals (two significant digits below 0.1), or ``-``."""
    if value is None:
        return "-"
    return f"{value:.2g}" if value < 0.1 else f"{value:.2f}"
