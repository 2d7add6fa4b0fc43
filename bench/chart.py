"""The chart: the report's figures as a PNG, every tunnel side by side, with issue 5's targets.

Four panels: throughput as a ratio to direct (higher is better), p99 latency as
a multiple of direct (lower is better), memory (idle RSS and per idle stream)
and CPU seconds per GiB carried. A target is a red line across its figure's
bars. matplotlib is imported here only (``pip install -e '.[bench]'``), with
its non-interactive Agg backend; without it the run still prints its table and
writes its JSON, and says the chart was skipped.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

from bench.errors import BenchError
from bench.goals import IDLE_RSS, KIB, STREAM_LIMIT_BYTES, Goal
from bench.measure import HttpPoint
from bench.peers import PAGEKITE, PIPENET
from bench.report import LATEST_NAME, TUNNELS, Report, iso_utc, stamp
from bench.targets import DIRECT, HOMEPORT, LABELS, RELAYS, SIDES, SSH_R
from bench.transfer import MIB

LATEST_CHART: Final = Path(LATEST_NAME).with_suffix(".png").name
COLORS: Final = {
    HOMEPORT: "#1f77b4",
    SSH_R: "#7f7f7f",
    PIPENET: "#2ca02c",
    PAGEKITE: "#ff7f0e",
    RELAYS: "#c7c7c7",
}
TARGET_COLOR: Final = "#d62728"
#: the bars of one group together span at most this much of the space between groups
_GROUP_WIDTH: Final = 0.8
_MAX_BAR_WIDTH: Final = 0.38


def write_chart(report: Report, results_dir: Path) -> list[Path]:
    """Draw the chart into ``latest.png`` and a timestamped copy; return both paths.

    Raises:
        BenchError: matplotlib is not installed.
    """
    try:
        import matplotlib as mpl

        mpl.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError(
            "matplotlib is not installed (pip install -e '.[bench]'); no chart"
        ) from None
    tunnels: list[str] = [target for target in TUNNELS if target in report.targets]
    goals = {goal.spec.key: goal for goal in report.goals(HOMEPORT)}
    figure, axes = plt.subplots(2, 2, figsize=(15, 10))
    _throughput(axes[0][0], report, tunnels, goals)
    _latency(axes[0][1], report, tunnels, goals)
    _memory(axes[1][0], report, tunnels)
    _cpu(axes[1][1], report, tunnels)
    git = report.software.get("git") or {}
    title = (
        f"homeport benchmark {iso_utc(report.started_at)}, git {git.get('commit', '?')[:10]}"
        f"{' (dirty)' if git.get('dirty') else ''}, {report.machine['nproc']} CPUs"
        f"{', quick run' if report.plan.quick else ''}"
    )
    figure.suptitle(title, fontsize=13)
    handles, labels = axes[0][0].get_legend_handles_labels()
    # Under the panels: four tunnels' names beside the title would run into it.
    figure.legend(handles, labels, loc="lower center", ncols=len(tunnels), fontsize=10)
    if report.interfered():
        figure.text(
            0.5,
            0.935,
            "other load on the machine during this run: some figures are low (see the JSON)",
            ha="center",
            color=TARGET_COLOR,
            fontsize=11,
        )
    figure.tight_layout(rect=(0, 0.04, 1, 0.93))
    results_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in (f"{stamp(iso_utc(report.started_at))}.png", LATEST_CHART):
        path = results_dir / name
        temporary = path.with_name(path.name + ".tmp.png")
        figure.savefig(temporary, dpi=100)
        os.replace(temporary, path)
        written.append(path)
    plt.close(figure)
    return written


def _bars(
    axis: Any,
    groups: list[str],
    values: dict[str, list[float | None]],
    tunnels: list[str],
    label_format: str,
    spans: dict[str, list[tuple[float, float] | None]] | None = None,
) -> None:
    """Grouped bars, one per tunnel in each group, each labelled with its value.

    ``spans`` adds a whisker per bar from the lowest to the highest of its rounds.
    """
    width = min(_MAX_BAR_WIDTH, _GROUP_WIDTH / len(tunnels))
    offsets = {
        target: (index - (len(tunnels) - 1) / 2) * width for index, target in enumerate(tunnels)
    }
    for target in tunnels:
        xs = [index + offsets[target] for index in range(len(groups))]
        heights = [value or 0.0 for value in values[target]]
        bars = axis.bar(xs, heights, width, label=LABELS[target], color=COLORS[target])
        for x, span in zip(xs, (spans or {}).get(target, []), strict=False):
            if span is not None:
                axis.vlines(x, span[0], span[1], colors="black", linewidth=1)
        labels = [label_format.format(v) if v is not None else "n/a" for v in values[target]]
        axis.bar_label(bars, labels=labels, fontsize=8, padding=2)
    axis.set_xticks(range(len(groups)), groups, fontsize=9)
    axis.margins(y=0.12)  # room for the labels above the bars


def _target_line(axis: Any, index: int, limit: float) -> None:
    """A red line across group ``index`` at ``limit`` (its label says the target)."""
    axis.hlines(limit, index - 0.45, index + 0.45, colors=TARGET_COLOR, linewidth=2)


def _with_target(group: str, goal: Goal | None) -> str:
    """``group``'s label with the target under it, and homeport's verdict.

    Under the axis, not beside the line, where it would cover the next group's bars.
    """
    if goal is None:
        return group
    return f"{group}\n{goal.spec.text.removeprefix('ratio ')} {goal.verdict}"


def _ratio(value: float | None, direct: float | None) -> float | None:
    return None if value is None or not direct else value / direct


def _point(report: Report, connections: int) -> HttpPoint | None:
    return next((p for p in report.http if p.connections == connections), None)


def _throughput(axis: Any, report: Report, tunnels: list[str], goals: dict[str, Goal]) -> None:
    """Requests/s, new connections/s and MiB/s, as ratios to direct."""
    groups: list[str] = []
    values: dict[str, list[float | None]] = {target: [] for target in tunnels}
    # the lowest and highest ratio of a wrk test's rounds, when it had several
    spans: dict[str, list[tuple[float, float] | None]] = {target: [] for target in tunnels}
    group_goals: list[Goal | None] = []
    points = [(f"req/s c={p.connections}", p, f"c{p.connections}") for p in report.http]
    if report.new_connection is not None:
        points.append(("new conn/s c=10", report.new_connection, "new_connection"))
    for name, point, prefix in points:
        goal = goals.get(f"{prefix}_requests_per_s_ratio")
        groups.append(_with_target(name, goal))
        group_goals.append(goal)
        direct = point.by_target[DIRECT].result.requests_per_s
        for target in tunnels:
            measured = point.by_target.get(target)
            values[target].append(
                _ratio(measured.result.requests_per_s, direct) if measured else None
            )
            rounds = point.round_ratios(target, DIRECT) if measured else []
            spans[target].append((min(rounds), max(rounds)) if len(rounds) > 1 else None)
    for transfers in (report.downloads, report.uploads):
        goal = goals.get(f"{transfers.kind}_mib_per_s_ratio")
        groups.append(_with_target(f"{transfers.kind} MiB/s", goal))
        group_goals.append(goal)
        direct_mib = transfers.median_mib_per_s(DIRECT)
        for target in tunnels:
            values[target].append(_ratio(transfers.median_mib_per_s(target), direct_mib))
            spans[target].append(None)
    _bars(axis, groups, values, tunnels, "{:.2g}", spans)
    for index, goal in enumerate(group_goals):
        if goal is not None:
            _target_line(axis, index, goal.spec.limit)
    axis.axhline(1.0, color="black", linewidth=0.6, linestyle=":")
    axis.set_title(
        "throughput, ratio to direct nginx (higher is better; whiskers: lowest to highest round)"
    )
    axis.set_ylabel("tunnel / direct")
    axis.tick_params(axis="x", labelrotation=15)


def _latency(axis: Any, report: Report, tunnels: list[str], goals: dict[str, Goal]) -> None:
    """p99 latency as a multiple of direct's."""
    points = [*report.http, *([report.new_connection] if report.new_connection else [])]
    c100_goal = goals.get("c100_latency_p99_ratio")
    point_goals = [
        c100_goal if p.kind == "keep-alive" and p.connections == 100 else None for p in points
    ]
    groups = [
        _with_target(f"c={p.connections}" + (" new conn" if p.kind != "keep-alive" else ""), goal)
        for p, goal in zip(points, point_goals, strict=True)
    ]
    values: dict[str, list[float | None]] = {
        target: [
            _ratio(
                p.by_target[target].result.latency_p99_s,
                p.by_target[DIRECT].result.latency_p99_s,
            )
            if target in p.by_target
            else None
            for p in points
        ]
        for target in tunnels
    }
    _bars(axis, groups, values, tunnels, "{:.1f}")
    for index, goal in enumerate(point_goals):
        if goal is not None:
            _target_line(axis, index, goal.spec.limit)
    axis.axhline(1.0, color="black", linewidth=0.6, linestyle=":")
    axis.set_yscale("log")  # ssh -R's p99 can be hundreds of times direct's
    axis.set_title("p99 latency, times direct nginx's (lower is better; log scale)")
    axis.set_ylabel("tunnel p99 / direct p99")


def _memory(axis: Any, report: Report, tunnels: list[str]) -> None:
    """Idle RSS in MiB, and RSS per idle stream in KiB, for each side."""
    groups: list[str] = []
    values: dict[str, list[float | None]] = {target: [] for target in tunnels}
    limits: list[float] = []
    for side in SIDES:
        limit = IDLE_RSS[side].limit / MIB
        groups.append(f"{side} idle\nMiB <= {limit:g}")
        for target in tunnels:
            rss = report.idle_rss_bytes.get(target, {}).get(side)
            values[target].append(rss / MIB if rss is not None else None)
        limits.append(limit)
    for count in report.plan.stream_counts:
        for side in SIDES:
            limit = STREAM_LIMIT_BYTES[side] / KIB
            groups.append(f"{side} per\nstream @{count:,}\nKiB <= {limit:g}")
            for target in tunnels:
                result = report.streams.get(target)
                point = (
                    next((p for p in result.points if p.count == count), None) if result else None
                )
                per_stream = point.per_stream_bytes.get(side) if point else None
                values[target].append(per_stream / KIB if per_stream is not None else None)
            limits.append(limit)
    _bars(axis, groups, values, tunnels, "{:.1f}")
    for index, limit in enumerate(limits):
        _target_line(axis, index, limit)
    axis.set_title("memory: idle RSS (MiB) and RSS per idle open stream (KiB); lower is better")
    axis.tick_params(axis="x", labelsize=8)


def _cpu(axis: Any, report: Report, tunnels: list[str]) -> None:
    """CPU seconds per GiB carried, each side, downloads and uploads."""
    groups: list[str] = []
    values: dict[str, list[float | None]] = {target: [] for target in tunnels}
    for transfers in (report.downloads, report.uploads):
        for side in SIDES:
            groups.append(f"{side}\n{transfers.kind}")
            for target in tunnels:
                values[target].append(transfers.cpu_s_per_gib(target, side))
    _bars(axis, groups, values, tunnels, "{:.2f}")
    axis.set_title("CPU seconds per GiB carried (lower is better; client = the Pi side)")
    axis.set_ylabel("CPU s / GiB")
