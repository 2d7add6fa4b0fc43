"""The faults a Pi behind NAT meets, on the test bed: outages, power cuts, restarts, bad links.

Heartbeats: where a test is about how fast a dead link is noticed, both ends
run with a 2 s heartbeat interval and a 6 s timeout instead of the defaults
(10 s and 20 s), and the client with a reconnect cap of 3 s instead of 30 s,
so that the faults play out in seconds. The power-cut and restart tests use
the defaults, because what they show does not depend on the heartbeat.
"""

from __future__ import annotations

import hashlib
import json
import re
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.topology.bed import PUBLIC_IP, WAN_IP
from tests.topology.conftest import Topology, record_figure
from tests.topology.services import (
    LARGE_FILE,
    LARGE_FILE_BYTES,
    Answer,
    ExitServer,
    visitor_load,
    visitor_results,
)

HEARTBEAT_INTERVAL_S = 2.0
HEARTBEAT_TIMEOUT_S = 6.0
RECONNECT_MAX_DELAY_S = 3.0
FAST_HEARTBEAT = (
    "--heartbeat-interval", str(HEARTBEAT_INTERVAL_S),
    "--heartbeat-timeout", str(HEARTBEAT_TIMEOUT_S),
)  # fmt: skip
FAST_RECONNECT = ("--reconnect-max-delay", str(RECONNECT_MAX_DELAY_S))
#: the longest the server can take to notice silence: the timeout, plus up to one
#: interval for the timer that records the last frame heard, plus scheduling slack
NOTICED_WITHIN_S = HEARTBEAT_TIMEOUT_S + HEARTBEAT_INTERVAL_S + 1.0
LINK_DEAD = r"nothing heard for [\d.]+ s, the link is dead"
OUTAGE_S = 20.0
#: an error answered at once: well under the heartbeat interval
FAST_ANSWER_S = 1.0
MAX_VISITS_DURING_A_DOWNLOAD = 200
TCP_KEEPALIVE_S = 1
#: the kernel gives up 10 x --tcp-keepalive after the visitor's last packet; plus slack
VANISHED_DROPPED_WITHIN_S = 10 * TCP_KEEPALIVE_S + 8.0
#: the bulk TCP sink's port on the exit node (the exit server uses 80 and 8123)
BULK_PORT = 9000


def wait_no_leaks(server: ExitServer, within: float = 20.0) -> dict[str, Any]:
    """Wait until the server holds nothing for finished requests: streams, bytes, visitors.

    Pooled streams retire after 4 s idle, so this takes a few seconds after traffic stops.
    """
    deadline = time.monotonic() + within
    while True:
        status = server.status()
        clients = status["clients"]
        drained = (
            len(clients) == 1
            and all(
                clients[0][key] == 0
                for key in ("streams", "idle_streams", "mux_streams", "held_bytes", "queued_bytes")
            )
            and status["requests_in_flight"] == 0
            and status["visitor_connections"] == 0
        )
        if drained:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"state left on the server after {within} s: {json.dumps(status)}")
        time.sleep(0.2)


def describe(records: list[dict[str, Any]]) -> str:
    counts = Counter(str(r["status"] or "no answer") for r in records)
    return ", ".join(f"{n}x {status}" for status, n in sorted(counts.items()))


@pytest.mark.timeout(120)
def test_uplink_down_for_20_s_visitors_get_errors_fast_and_the_client_comes_back(
    topology: Topology,
) -> None:
    server = topology.start_server(*FAST_HEARTBEAT)
    client = topology.start_client(server, *FAST_HEARTBEAT, *FAST_RECONNECT)
    probe = visitor_load(
        topology.processes, topology.bed, f"http://{PUBLIC_IP}/?probe={{id}}",
        "--rate", "4", "--duration", str(OUTAGE_S + 10), "--timeout", "15",
    )  # fmt: skip
    probe.wait_for('"status": 200', 10)
    server_mark, client_mark = server.process.mark(), client.process.mark()

    down_at = time.monotonic()
    topology.bed.uplink_down()
    try:
        server.process.wait_for(LINK_DEAD, NOTICED_WITHIN_S, server_mark)
        noticed_at = time.monotonic()
        time.sleep(max(0.0, down_at + OUTAGE_S - time.monotonic()))  # hold the outage
    finally:
        topology.bed.uplink_up()
    up_at = time.monotonic()
    client.wait_connected(within=RECONNECT_MAX_DELAY_S + 5, since=client_mark)
    reconnected_at = time.monotonic()
    assert probe.wait(60) == 0
    records = visitor_results(probe)

    assert noticed_at - down_at <= NOTICED_WITHIN_S
    assert reconnected_at - up_at <= RECONNECT_MAX_DELAY_S + 2, "the client came back late"
    before = [r for r in records if r["end"] < down_at]
    assert before, "the probe saw no traffic before the outage"
    assert all(r["status"] == 200 for r in before), describe(before)
    assert all(r["status"] in (200, 502, 503) for r in records), (
        f"a visitor hung or was reset: {describe(records)}"
    )
    errors = [r for r in records if r["status"] != 200]
    assert errors, "the outage went unnoticed by visitors"
    for r in errors:
        if r["start"] > noticed_at:  # the server knew: it answers at once
            assert r["status"] == 503, r
            assert r["end"] - r["start"] < FAST_ANSWER_S, r
        else:  # caught on the dying session: answered as soon as it was declared dead
            assert r["end"] < noticed_at + FAST_ANSWER_S, r
    after = [r for r in records if r["start"] > reconnected_at + 0.5]
    assert after, "the probe ended before the client came back"
    assert all(r["status"] == 200 for r in after), describe(after)
    slowest_503 = max(r["end"] - r["start"] for r in errors if r["start"] > noticed_at)
    wait_no_leaks(server)
    record_figure(
        f"uplink down {OUTAGE_S:.0f} s (heartbeat {HEARTBEAT_INTERVAL_S:.0f}/"
        f"{HEARTBEAT_TIMEOUT_S:.0f} s): server noticed after {noticed_at - down_at:.1f} s; "
        f"503s answered in <= {slowest_503 * 1000:.0f} ms; client back "
        f"{reconnected_at - up_at:.1f} s after the link; visitors: {describe(records)}"
    )


def test_after_a_power_cut_the_new_session_replaces_the_ghost(topology: Topology) -> None:
    server = topology.start_server()
    client = topology.start_client(server)
    old_session = client.wait_connected()
    assert topology.visit("/").status == 200
    old_port = topology.bed.client_port()
    (ghost,) = server.status()["clients"]  # as the server sees the Pi: through the NAT
    server_mark = server.process.mark()

    # The power goes: the Pi's packets stop mid-flight (no FIN, no RST: the old
    # connection's packets keep vanishing, as its owner is gone), its programs die.
    topology.bed.drop_pi_traffic(tcp_port=old_port)
    try:
        client.process.kill()
        topology.pi.power_cut()
        # The power comes back: the services start, then the client.
        topology.pi.start()
        started_at = time.monotonic()
        new_client = topology.start_client(server)
        new_session = new_client.wait_connected()
        replaced = server.process.wait_for(
            rf"client pi reconnected from {WAN_IP}:\d+; closing its previous session from (\S+)",
            10,
            server_mark,
        )
        replaced_after = time.monotonic() - started_at
        server.process.wait_for(
            rf"client pi disconnected \(session {old_session}\): REPLACED", 10, server_mark
        )
    finally:
        topology.bed.restore_pi_traffic()

    assert new_session != old_session
    since_cut = "\n".join(server.process.lines[server_mark:])
    assert not re.search(LINK_DEAD, since_cut), "the ghost timed out instead of being replaced"
    assert since_cut.index("reconnected from") < since_cut.index(f"session {old_session}")
    assert replaced.group(1) == ghost["remote_addr"]
    assert topology.visit("/").status == 200
    status = wait_no_leaks(server)
    assert [(c["name"], c["session_id"]) for c in status["clients"]] == [("pi", new_session)]
    record_figure(
        f"power cut: the new session replaced the ghost {replaced_after:.1f} s after the "
        "client started (default heartbeats: the ghost would otherwise stay up to 30 s)"
    )


def test_a_silently_cut_link_is_noticed_within_the_heartbeat_timeout(topology: Topology) -> None:
    server = topology.start_server(*FAST_HEARTBEAT)
    client = topology.start_client(server, *FAST_HEARTBEAT, *FAST_RECONNECT)
    assert topology.visit("/").status == 200
    server_mark, client_mark = server.process.mark(), client.process.mark()

    cut_at = time.monotonic()
    topology.bed.drop_pi_traffic()
    try:
        server.process.wait_for(LINK_DEAD, NOTICED_WITHIN_S + 1, server_mark)
        noticed_s = time.monotonic() - cut_at
        server.process.wait_for(r"client pi disconnected \(session \w+\): HEARTBEAT_TIMEOUT", 5)
        refused = topology.visit("/")
        client.process.wait_for(
            "disconnected from the exit server: HEARTBEAT_TIMEOUT", NOTICED_WITHIN_S, client_mark
        )
        client_noticed_s = time.monotonic() - cut_at
    finally:
        topology.bed.restore_pi_traffic()
    restored_at = time.monotonic()
    client.wait_connected(within=15, since=client_mark)
    back_s = time.monotonic() - restored_at

    assert noticed_s <= NOTICED_WITHIN_S
    assert (refused.status, refused.seconds < FAST_ANSWER_S) == (503, True), refused
    assert topology.visit("/").status == 200
    wait_no_leaks(server)
    record_figure(
        f"silent cut (heartbeat {HEARTBEAT_INTERVAL_S:.0f}/{HEARTBEAT_TIMEOUT_S:.0f} s): "
        f"server noticed after {noticed_s:.1f} s, client after {client_noticed_s:.1f} s; "
        f"client back {back_s:.1f} s after the link was restored"
    )


def wait_visitors(server: ExitServer, connections: int, in_flight: int, within: float) -> float:
    """Wait until the server holds ``connections`` visitors and ``in_flight`` requests; when."""
    deadline = time.monotonic() + within
    while True:
        status = server.status()
        if (status["visitor_connections"], status["requests_in_flight"]) == (
            connections,
            in_flight,
        ):
            return time.monotonic()
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not {connections} visitors and {in_flight} requests after {within} s: "
                f"{json.dumps(status)}"
            )
        time.sleep(0.1)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("path", "logged"),
    [
        # nothing sent to the visitor: the kernel's keep-alive probes go unanswered
        ("/function/record?ms=60000&id=vanish", r'"GET /function/record" .*status=499'),
        # events sent and never acknowledged: TCP_USER_TIMEOUT (keep-alive does not
        # probe while data is in flight; the kernel would retransmit for ~15 minutes)
        ("/function/ticks?ms=60000&id=vanish", r'"GET /function/ticks" .*status=200'),
    ],
    ids=["long-poll", "event-stream"],
)
def test_a_visitor_that_vanishes_mid_request_is_dropped_by_tcp_keepalive(
    topology: Topology, path: str, logged: str
) -> None:
    """A visitor that lost its network: nothing else would end its request for a minute."""
    server = topology.start_server("--tcp-keepalive", str(TCP_KEEPALIVE_S))
    topology.start_client(server)
    assert topology.visit("/").status == 200
    wait_visitors(server, connections=0, in_flight=0, within=10)
    server_mark = server.process.mark()

    sent_at = time.monotonic()
    visitor = topology.processes.start(
        "vanishing-visitor",
        topology.bed.visitor.argv(
            "curl", "-sS", "-N", "--max-time", "90", f"http://{PUBLIC_IP}{path}"
        ),
    )
    try:
        wait_visitors(server, connections=1, in_flight=1, within=10)
        topology.bed.drop_visitor_traffic()
        cut_at = time.monotonic()
        try:
            dropped_at = wait_visitors(
                server, connections=0, in_flight=0, within=VANISHED_DROPPED_WITHIN_S
            )
        finally:
            topology.bed.restore_visitor_traffic()
    finally:
        visitor.kill()

    # The kernel gives up 10 x --tcp-keepalive after the visitor's last packet: its
    # request (or its last acknowledgement), which came after sent_at and before cut_at.
    assert dropped_at - sent_at >= 10 * TCP_KEEPALIVE_S - 0.5, dropped_at - sent_at
    assert dropped_at - cut_at <= VANISHED_DROPPED_WITHIN_S
    server.process.wait_for(logged, 5, server_mark)  # the access log names no query
    wait_no_leaks(server)
    record_figure(
        f"vanished visitor, {path.split('?')[0]} (--tcp-keepalive {TCP_KEEPALIVE_S}): "
        f"dropped {dropped_at - cut_at:.1f} s after its network went, its stream reset"
    )


@pytest.mark.timeout(120)
def test_an_exit_server_restarted_under_load_duplicates_nothing(topology: Topology) -> None:
    server = topology.start_server()
    client = topology.start_client(server, "--reconnect-max-delay", "2")
    functions = topology.pi.functions
    assert functions is not None
    functions_mark = functions.mark()
    url = f"http://{PUBLIC_IP}/function/record?id={{id}}&ms=400"
    common = ("--duration", "12", "--timeout", "30")
    loads = [
        visitor_load(
            topology.processes, topology.bed, url, "--method", "POST", "--rate", "10",
            "--prefix", "post-", *common,
        ),
        visitor_load(
            topology.processes, topology.bed, url, "--method", "GET", "--rate", "5",
            "--prefix", "get-", *common,
        ),
    ]  # fmt: skip
    for load in loads:
        load.wait_for('"status": 200', 10)
    client_mark = client.process.mark()

    term_at = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(40) == 0
    server = topology.start_server()
    ready_at = time.monotonic()
    client.wait_connected(within=10, since=client_mark)
    reconnected_at = time.monotonic()
    for load in loads:
        assert load.wait(60) == 0
    records = [r for load in loads for r in visitor_results(load)]
    invoked = Counter(
        re.findall(r"invoked record id=(\S+)", "\n".join(functions.lines[functions_mark:]))
    )

    assert [i for i, n in invoked.items() if n > 1] == [], "a request reached the function twice"
    ok = [r for r in records if r["status"] == 200]
    for r in ok:
        assert r["body"] == f"done {r['id']}", r
        assert invoked[r["id"]] == 1, r
    failed = [r for r in records if r["status"] != 200]
    for r in failed:  # refused while no server listened, or 503 until the client was back
        assert r["status"] in (502, 503) or (r["status"] == 0 and "Timeout" not in r["error"]), r
    drained = [r for r in ok if r["start"] < term_at - 0.1 < term_at < r["end"]]
    assert drained, "no request in flight at SIGTERM was let finish"
    assert [r for r in ok if r["start"] > reconnected_at], "nothing got through after the restart"
    wait_no_leaks(server)
    record_figure(
        f"exit server restart under load: {len(records)} requests: {describe(records)}; "
        f"{len(drained)} in flight at SIGTERM finished; none duplicated; client back "
        f"{reconnected_at - ready_at:.1f} s after the new server was ready"
    )


def download(topology: Topology, path: Path) -> Answer:
    answer = topology.visit(f"/{LARGE_FILE}", "-o", str(path), max_time=150)
    assert answer.status == 200, answer
    return answer


@pytest.mark.timeout(200)
def test_a_large_download_over_a_bad_uplink_arrives_bit_exact(
    topology: Topology, tmp_path: Path
) -> None:
    server = topology.start_server()
    client = topology.start_client(server)
    client_mark = client.process.mark()
    clean = download(topology, tmp_path / "clean.bin")

    with topology.bed.impaired_uplink(delay_ms=100, jitter_ms=20, loss_percent=1) as how:
        # The first request after the switch shares the session's one TCP
        # connection with whatever recovery the switch set off: once in some
        # forty runs (a machine busy with other tests) its answer took over
        # 10 s. Here it only shows that the uplink is impaired.
        small = topology.visit("/style.css", max_time=30)
        bad = download(topology, tmp_path / "bad.bin")

    assert small.status == 200
    assert small.seconds >= 0.15, f"the uplink does not look impaired: {small.seconds:.3f} s"
    expected = topology.pi.large_file_sha256
    for name in ("clean.bin", "bad.bin"):
        assert hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() == expected, name
    assert "disconnected" not in "\n".join(client.process.lines[client_mark:])
    wait_no_leaks(server)

    def mbit_s(answer: Answer) -> float:
        return float(answer.info["speed_download"]) * 8 / 1e6

    record_figure(
        f"bad uplink via {how}: 100 ms ± 20 ms each way, 1% loss each way: "
        f"{LARGE_FILE_BYTES // 2**20} MiB bit-exact in {bad.seconds:.1f} s = "
        f"{mbit_s(bad):.2f} Mbit/s (same download on the clean bed: {mbit_s(clean):.0f} Mbit/s); "
        f"a small request took {small.seconds * 1000:.0f} ms"
    )


def bulk_tcp_rates(topology: Topology, *, size: int, count: int) -> list[float]:
    """Rates (Mbit/s) of ``count`` transfers of ``size`` bytes, one after another on one
    TCP connection from the Pi to the exit node: the tunnel's own path and shape,
    without the tunnel (tests/topology/bulk.py)."""
    bulk = [sys.executable, str(Path(__file__).with_name("bulk.py"))]
    sink = topology.processes.start(
        "bulk-sink", topology.bed.exit.argv(*bulk, "sink", str(BULK_PORT))
    )
    sink.wait_for("sink up")
    sent = topology.bed.pi.run(
        *bulk, "send", PUBLIC_IP, str(BULK_PORT), "--bytes", str(size), "--count", str(count),
        timeout=200,
    )  # fmt: skip
    sink.stop(timeout=5)
    rates: list[float] = json.loads(sent.stdout)["mbit_s"]
    return rates


@pytest.mark.timeout(300)
def test_a_session_started_over_a_bad_uplink_grows_its_windows_and_stays_bit_exact(
    topology: Topology, tmp_path: Path
) -> None:
    # The session starts on the bad link, so its first PING measures that
    # round trip and a stream's window may grow (auto-tuning, protocol.md
    # §6) while the downloads that follow reuse the stream. The figures say
    # what that buys against TCP alone over the same path (the Pi sending to
    # the exit node on one connection, as the tunnel does); the assertions
    # are about the bytes, never the speed.
    server = topology.start_server()
    with topology.bed.impaired_uplink(delay_ms=100, jitter_ms=20, loss_percent=1) as how:
        client = topology.start_client(server)
        client_mark = client.process.mark()
        rates = []
        for attempt in range(3):
            answer = download(topology, tmp_path / f"bad-{attempt}.bin")
            digest = hashlib.sha256((tmp_path / f"bad-{attempt}.bin").read_bytes()).hexdigest()
            assert digest == topology.pi.large_file_sha256, attempt
            rates.append(float(answer.info["speed_download"]) * 8 / 1e6)
        tcp = bulk_tcp_rates(topology, size=LARGE_FILE_BYTES, count=3)
    assert "disconnected" not in "\n".join(client.process.lines[client_mark:])
    wait_no_leaks(server)
    record_figure(
        f"session started over the bad uplink ({how}): three {LARGE_FILE_BYTES // 2**20} MiB "
        f"downloads bit-exact at {', '.join(f'{rate:.1f}' for rate in rates)} Mbit/s; "
        f"TCP alone over the same path (three transfers on one connection from the Pi "
        f"to the exit node): {', '.join(f'{rate:.1f}' for rate in tcp)} Mbit/s"
    )


@dataclass
class Visit:
    """A small request made while a large download ran."""

    seconds: float
    #: when the download's stream was busy, on one connection, from before
    #: this request to after it: that connection, and the one this took
    download_on: int | None = None
    took: int | None = None


def connections_now(server: ExitServer) -> dict[int, tuple[bool, int]]:
    """Each of the client's connections: whether it carries an exchange, its bytes so far."""
    return {
        s["connection"]: (s["streams"] > s["idle_streams"], s["bytes_to_client"])
        for s in server.status()["clients"]
    }


def visits_during_a_download(
    topology: Topology, server: ExitServer, path: Path
) -> tuple[Answer, list[Visit]]:
    """Small requests, one after another, while a large download runs."""
    done: list[Answer] = []
    downloading = threading.Thread(target=lambda: done.append(download(topology, path)))
    downloading.start()
    visits = []
    before = connections_now(server)
    while downloading.is_alive() and len(visits) < MAX_VISITS_DURING_A_DOWNLOAD:
        answer = topology.visit("/style.css", max_time=30)
        assert answer.status == 200, answer
        after = connections_now(server)
        visit = Visit(answer.seconds)
        busy = [n for n, (carrying, _) in before.items() if carrying]
        if len(busy) == 1 and busy == [n for n, (carrying, _) in after.items() if carrying]:
            visit.download_on = busy[0]
            grew = [n for n in after if n in before and after[n][1] > before[n][1]]
            visit.took = grew[0] if len(grew) == 1 else None
        visits.append(visit)
        before = after
    downloading.join()
    return done[0], visits


@pytest.mark.timeout(300)
def test_with_two_connections_a_download_over_a_bad_uplink_holds_back_no_one(
    topology: Topology, tmp_path: Path
) -> None:
    # One TCP connection delivers in order: while a download runs over a
    # lossy link, whatever follows a lost packet waits for its repair, the
    # small answers of other visitors too. With --connections 2 they take
    # the connection the download is not on (the least busy one).
    server = topology.start_server()
    figures = []
    with topology.bed.impaired_uplink(delay_ms=100, jitter_ms=20, loss_percent=1) as how:
        for connections in (1, 2):
            client = topology.start_client(server, "--connections", str(connections), wait=False)
            wait_sessions(server, connections)
            answer, visits = visits_during_a_download(
                topology, server, tmp_path / f"over-{connections}.bin"
            )
            digest = hashlib.sha256((tmp_path / f"over-{connections}.bin").read_bytes())
            assert digest.hexdigest() == topology.pi.large_file_sha256, connections
            if connections == 2:
                during = [v for v in visits if v.download_on is not None]
                assert during, "no small request was made while the download's stream was busy"
                assert all(v.took not in (None, v.download_on) for v in during), during
            seconds = [v.seconds for v in visits]
            figures.append(
                f"{connections} connection{'s' if connections > 1 else ''}: "
                f"{len(seconds)} small answers during a {LARGE_FILE_BYTES // 2**20} MiB download "
                f"({float(answer.info['speed_download']) * 8 / 1e6:.1f} Mbit/s) in "
                f"{statistics.median(seconds):.2f} s median, {max(seconds):.2f} s at most"
            )
            client.process.stop()
            wait_sessions(server, 0)
    record_figure(f"bad uplink ({how}): " + "; ".join(figures))


def wait_sessions(server: ExitServer, count: int, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while len(server.status()["clients"]) != count:
        assert time.monotonic() < deadline, f"not {count} sessions within {within} s"
        time.sleep(0.1)
