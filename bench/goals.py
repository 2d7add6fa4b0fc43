"""The targets issue 5 sets, each checked against a figure of this run.

Throughput and latency targets are ratios to direct nginx measured in the same
run; memory targets are absolute. They are checked here, in the benchmark and
its report, never as timed assertions in the test suite: on a shared 2-core
machine a figure can miss because of other load, which the report's warnings
say.

Each target is checked for homeport (the table's verdict column) and, for
comparison, for ssh -R (in the JSON and the chart).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from bench.measure import HttpPoint, Transfers
from bench.streams import StreamsResult
from bench.transfer import MIB

KIB: Final = 1024
AT_LEAST: Final = ">="
AT_MOST: Final = "<="


@dataclass(frozen=True)
class GoalSpec:
    """One target: which figure, which way, what limit."""

    key: str  # its name in the JSON
    text: str  # how the table shows the limit
    comparison: str  # AT_LEAST or AT_MOST
    limit: float


@dataclass(frozen=True)
class Goal:
    """One target checked for one tunnel."""

    spec: GoalSpec
    value: float | None  # None: not measured in this run

    @property
    def passed(self) -> bool | None:
        """Whether the figure meets the target; None when it was not measured."""
        if self.value is None:
            return None
        if self.spec.comparison == AT_LEAST:
            return self.value >= self.spec.limit
        return self.value <= self.spec.limit

    @property
    def verdict(self) -> str:
        """``PASS``, ``MISS`` or ``n/a``."""
        return {True: "PASS", False: "MISS", None: "n/a"}[self.passed]


C1_RPS: Final = GoalSpec("c1_requests_per_s_ratio", "ratio >= 0.45", AT_LEAST, 0.45)
C100_RPS: Final = GoalSpec("c100_requests_per_s_ratio", "ratio >= 0.35", AT_LEAST, 0.35)
C100_ERRORS: Final = GoalSpec("c100_errors", "= 0", AT_MOST, 0)
C100_P99: Final = GoalSpec("c100_latency_p99_ratio", "ratio <= 3", AT_MOST, 3.0)
NEW_CONNECTION_RATE: Final = GoalSpec(
    "new_connection_requests_per_s_ratio", "ratio >= 0.15", AT_LEAST, 0.15
)
DOWNLOAD_RATE: Final = GoalSpec("download_mib_per_s_ratio", "ratio >= 0.35", AT_LEAST, 0.35)
UPLOAD_RATE: Final = GoalSpec("upload_mib_per_s_ratio", "ratio >= 0.35", AT_LEAST, 0.35)
IDLE_RSS: Final = {
    "server": GoalSpec("idle_rss_server_bytes", "<= 30 MiB", AT_MOST, 30 * MIB),
    "client": GoalSpec("idle_rss_client_bytes", "<= 30 MiB", AT_MOST, 30 * MIB),
}
STREAM_LIMIT_BYTES: Final = {"server": 32 * KIB, "client": 16 * KIB}
OPEN_STREAMS: Final = 10_000


def per_stream_spec(side: str, count: int) -> GoalSpec:
    """The target for one more idle stream on ``side``, measured at ``count`` streams."""
    limit = STREAM_LIMIT_BYTES[side]
    return GoalSpec(f"per_stream_{side}_bytes_at_{count}", f"<= {limit // KIB} KiB", AT_MOST, limit)


def open_streams_spec(count: int) -> GoalSpec:
    """The target that ``count`` concurrent idle streams through one client all work."""
    return GoalSpec(f"open_streams_{count}", f"all {count:,}", AT_LEAST, count)


@dataclass(frozen=True)
class Figures:
    """The figures of one run that the targets are about."""

    http: list[HttpPoint]
    new_connection: HttpPoint | None
    downloads: Transfers
    uploads: Transfers
    idle_rss_bytes: dict[str, dict[str, int | None]]  # target -> side -> bytes
    streams: dict[str, StreamsResult]  # target -> result
    stream_counts: tuple[int, ...]


def ratio(value: float | None, direct: float | None) -> float | None:
    """value / direct, or None when either is missing or direct is zero."""
    if value is None or direct is None or direct == 0:
        return None
    return value / direct


def check_goals(figures: Figures, target: str) -> list[Goal]:
    """Every target of issue 5, checked for ``target`` (``homeport`` or ``ssh_r``)."""
    goals = [
        Goal(C1_RPS, _wrk_ratio(figures.http, 1, target, "requests_per_s")),
        Goal(C100_RPS, _wrk_ratio(figures.http, 100, target, "requests_per_s")),
        Goal(C100_ERRORS, _c100_errors(figures.http, target)),
        Goal(C100_P99, _wrk_ratio(figures.http, 100, target, "latency_p99_s")),
        Goal(NEW_CONNECTION_RATE, _new_connection_ratio(figures.new_connection, target)),
        Goal(DOWNLOAD_RATE, _transfer_ratio(figures.downloads, target)),
        Goal(UPLOAD_RATE, _transfer_ratio(figures.uploads, target)),
    ]
    idle = figures.idle_rss_bytes.get(target, {})
    goals += [Goal(spec, _float(idle.get(side))) for side, spec in IDLE_RSS.items()]
    streams = figures.streams.get(target)
    for count in figures.stream_counts:
        point = (
            next((point for point in streams.points if point.count == count), None)
            if streams
            else None
        )
        for side in STREAM_LIMIT_BYTES:
            value = point.per_stream_bytes.get(side) if point else None
            goals.append(Goal(per_stream_spec(side, count), value))
    if OPEN_STREAMS in figures.stream_counts:
        opened = None
        if streams is not None:
            opened = float(OPEN_STREAMS) if streams.all_opened(OPEN_STREAMS) else _opened(streams)
        goals.append(Goal(open_streams_spec(OPEN_STREAMS), opened))
    return goals


def _float(value: int | None) -> float | None:
    return None if value is None else float(value)


def _opened(streams: StreamsResult) -> float:
    """The most streams that were open and confirmed at once (short of the target)."""
    return float(max((min(p.opened, p.upstream_open) for p in streams.points), default=0))


def _point(http: list[HttpPoint], connections: int) -> HttpPoint | None:
    return next((point for point in http if point.connections == connections), None)


def _wrk_ratio(http: list[HttpPoint], connections: int, target: str, field: str) -> float | None:
    point = _point(http, connections)
    if point is None or target not in point.by_target:
        return None
    value = getattr(point.by_target[target].result, field)
    return ratio(value, getattr(point.by_target["direct"].result, field))


def _c100_errors(http: list[HttpPoint], target: str) -> float | None:
    point = _point(http, 100)
    if point is None or target not in point.by_target:
        return None
    return float(point.by_target[target].result.errors)


def _new_connection_ratio(point: HttpPoint | None, target: str) -> float | None:
    if point is None or target not in point.by_target:
        return None
    return ratio(
        point.by_target[target].result.requests_per_s,
        point.by_target["direct"].result.requests_per_s,
    )


def _transfer_ratio(transfers: Transfers, target: str) -> float | None:
    return ratio(transfers.median_mib_per_s(target), transfers.median_mib_per_s("direct"))
