"""bench.measure runs each wrk test in rounds, the targets taking turns, and keeps the median."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import pytest

from bench import measure
from bench.errors import BenchError
from bench.measure import Plan, measure_http
from bench.processes import Child
from bench.report import _Table
from bench.targets import DIRECT, HOMEPORT, HOMEPORT_WSS, PIPENET, SSH_R, Target
from bench.tools import ToolPaths
from bench.wrk import WrkResult
from tests.bench.fakes import StillChild, wrk_result


def _plan(rounds: int) -> Plan:
    return Plan(
        duration_s=5,
        warmup_s=1,
        rounds=rounds,
        concurrencies=(100,),
        max_wrk_threads=1,
        new_connection_connections=10,
        transfers=1,
        access_log_connections=None,
        stream_counts=(),
        ssh=True,
        quick=False,
    )


@pytest.fixture
def wrk_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Every wrk run as (port, seconds); a measured run's rate is scripted by port and round."""
    calls: list[tuple[int, int]] = []
    # port -> the req/s of its measured rounds, in order
    rates = {
        1: [30_000.0, 20_000.0, 25_000.0],
        2: [9_000.0, 8_000.0, 10_000.0],
        3: [3.0, 2.0, 1.0],
        4: [6_000.0, 8_000.0, 7_000.0],
    }

    def fake_wrk(tools: ToolPaths, target: Target, load: Any, seconds: int) -> WrkResult:
        port = target.port
        calls.append((port, seconds))
        measured = sum(1 for p, s in calls if p == port and s == 5)
        return wrk_result(rates[port][measured - 1] if seconds == 5 else 1.0)

    monkeypatch.setattr(measure, "_wrk", fake_wrk)
    return calls


def _targets() -> Sequence[Target]:
    nginx = cast(Child, StillChild())
    return [Target(DIRECT, 1, nginx), Target(HOMEPORT, 2, nginx), Target(SSH_R, 3, nginx)]


def test_targets_take_turns_each_round_and_warm_up_once(wrk_calls: list[tuple[int, int]]) -> None:
    measure_http(_plan(3), cast(ToolPaths, None), _targets(), 100)
    assert wrk_calls == [
        (1, 1), (1, 5), (2, 1), (2, 5), (3, 1), (3, 5),  # round 1, each after its warm-up
        (2, 5), (3, 5), (1, 5),  # round 2: who went first goes last
        (3, 5), (1, 5), (2, 5),
    ]  # fmt: skip


def test_each_target_shows_its_median_round_and_the_ratios_pair_rounds(
    wrk_calls: list[tuple[int, int]],
) -> None:
    point = measure_http(_plan(3), cast(ToolPaths, None), _targets(), 100)
    assert point.by_target[DIRECT].result.requests_per_s == 25_000.0
    assert point.by_target[HOMEPORT].result.requests_per_s == 9_000.0
    assert point.by_target[SSH_R].result.requests_per_s == 2.0
    # The median round whole: its latencies are that round's, not medians of their own.
    assert point.by_target[HOMEPORT].result.latency_p99_s == 2 / 9_000.0
    assert [run.result.requests_per_s for run in point.rounds[HOMEPORT]] == [9e3, 8e3, 10e3]
    assert point.round_ratios(HOMEPORT, DIRECT) == [9e3 / 30e3, 8e3 / 20e3, 10e3 / 25e3]


def test_one_round_is_one_run_per_target(wrk_calls: list[tuple[int, int]]) -> None:
    point = measure_http(_plan(1), cast(ToolPaths, None), _targets(), 100)
    assert wrk_calls == [(1, 1), (1, 5), (2, 1), (2, 5), (3, 1), (3, 5)]
    assert point.by_target[HOMEPORT].result.requests_per_s == 9_000.0


def test_an_even_count_of_rounds_shows_the_lower_middle() -> None:
    runs = [
        measure.Measured(wrk_result(rate), {}, None, {}, True, {}) for rate in (4.0, 1.0, 3.0, 2.0)
    ]
    assert measure.median_round(runs).result.requests_per_s == 2.0


def test_the_access_log_run_takes_as_many_rounds_and_keeps_the_median(
    wrk_calls: list[tuple[int, int]],
) -> None:
    homeport = _targets()[1]
    point = measure.measure_access_log(_plan(3), cast(ToolPaths, None), homeport, 100)
    assert wrk_calls == [(2, 1), (2, 5), (2, 5), (2, 5)]
    assert point.tunnel.result.requests_per_s == 9_000.0


def test_the_tunnel_over_wss_takes_its_turn_and_shows_under_homeport(
    wrk_calls: list[tuple[int, int]],
) -> None:
    nginx = cast(Child, StillChild())
    targets = [*_targets(), Target(HOMEPORT_WSS, 4, nginx)]
    point = measure_http(_plan(3), cast(ToolPaths, None), targets, 100)
    assert [port for port, seconds in wrk_calls if seconds == 5] == [
        1, 2, 3, 4,  # every round measures every target, the tunnel over wss included
        2, 3, 4, 1,
        3, 4, 1, 2,
    ]  # fmt: skip
    assert point.by_target[HOMEPORT_WSS].result.requests_per_s == 7_000.0
    table = _Table([HOMEPORT, SSH_R], {})
    table.wrk_rows(point, peak_rss=False)
    table.wss_rows(point)
    over_wss = "\n".join(table.lines).split("over wss")[1]
    req_s = over_wss.splitlines()[0]
    assert "7,000" in req_s  # its req/s, in homeport's column,
    assert f"{7_000 / 25_000:.2f}" in req_s  # its ratio to direct's median round,
    assert f"{7_000 / 9_000:.2f}" in over_wss.split("req/s vs ws")[1]  # and to homeport over ws


def test_a_peer_that_fails_leaves_the_run_and_the_others_go_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []

    def fake_wrk(tools: ToolPaths, target: Target, load: Any, seconds: int) -> WrkResult:
        calls.append(target.port)
        if target.port == 5 and calls.count(5) == 3:  # its warm-up, round 1, then round 2
            raise BenchError("pipenet client exited (status 0)")
        return wrk_result(1_000.0 * target.port)

    monkeypatch.setattr(measure, "_wrk", fake_wrk)
    nginx = cast(Child, StillChild())
    peer = Target(PIPENET, 5, nginx, host="bench.localhost", optional=True)
    dropouts = measure.Dropouts()
    point = measure_http(
        _plan(3), cast(ToolPaths, None), [*_targets(), peer], 100, dropouts=dropouts
    )
    assert PIPENET not in point.by_target
    assert PIPENET not in point.rounds
    assert [run.result.requests_per_s for run in point.rounds[HOMEPORT]] == [2e3, 2e3, 2e3]
    assert calls.count(5) == 3  # not asked again after it failed
    assert "pipenet client exited" in dropouts.reasons[PIPENET]
    # The next test leaves it out from the start.
    calls.clear()
    measure_http(_plan(1), cast(ToolPaths, None), [*_targets(), peer], 10, dropouts=dropouts)
    assert 5 not in calls


def test_homeport_failing_ends_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_wrk(tools: ToolPaths, target: Target, load: Any, seconds: int) -> WrkResult:
        if target.key == HOMEPORT:
            raise BenchError("homeport client exited")
        return wrk_result(1_000.0)

    monkeypatch.setattr(measure, "_wrk", fake_wrk)
    with pytest.raises(BenchError, match="homeport client exited"):
        measure_http(_plan(1), cast(ToolPaths, None), _targets(), 100, dropouts=measure.Dropouts())
