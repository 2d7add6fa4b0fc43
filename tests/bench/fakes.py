"""Stand-ins for what a measurement reads: a wrk report, and a process whose clocks stand still."""

from __future__ import annotations

from bench.wrk import WrkResult


class StillChild:
    """A watched process whose CPU clock stands still and whose peak RSS is unknown."""

    def tree_cpu_seconds(self) -> float:
        return 0.0

    def tree_peak_rss_bytes(self) -> int | None:
        return None

    def reset_tree_peak_rss(self) -> bool:
        return True


def wrk_result(requests_per_s: float, p99_s: float | None = None, timeouts: int = 0) -> WrkResult:
    """wrk's figures for a run at ``requests_per_s``: p99 ``p99_s`` (default 2 / rate), p50 half."""
    p99 = 2 / requests_per_s if p99_s is None else p99_s
    return WrkResult(
        requests=int(requests_per_s),
        duration_s=1.0,
        requests_per_s=requests_per_s,
        bytes_read=0,
        latency_avg_s=None,
        latency_max_s=None,
        latency_p50_s=p99 / 2,
        latency_p75_s=None,
        latency_p90_s=None,
        latency_p99_s=p99,
        non_2xx_3xx=0,
        connect_errors=0,
        read_errors=0,
        write_errors=0,
        timeouts=timeouts,
    )
