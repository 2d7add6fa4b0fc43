"""The multiplexer, driven with real bytes between two instances (no mocks, no sockets)."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
)

from tests.support.muxpair import MuxPair
from tunnel import events as ev
from tunnel.errors import ErrorCode, ProtocolError, StreamClosed
from tunnel.frames import MAX_STREAM_ID, Data, Hello, Open, Ping, Rst, WindowUpdate, encode
from tunnel.mux import (
    DEFAULT_WINDOW_BYTES,
    MAX_AUTOTUNED_WINDOW_BYTES,
    PROTOCOL_VERSION,
    SESSION_WINDOW_GROWTH_BYTES,
    Multiplexer,
    Role,
    Settings,
    StreamState,
)


def of_type(events: list[ev.Event], kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


def received_bytes(events: list[ev.Event], stream_id: int) -> bytes:
    return b"".join(
        bytes(e.data) for e in events if isinstance(e, ev.DataReceived) and e.stream_id == stream_id
    )


# -- handshake --------------------------------------------------------------------------


def test_hello_exchange_shares_settings_and_extra_fields() -> None:
    client = Multiplexer(Role.CLIENT, Settings(initial_window_bytes=100_000))
    server = Multiplexer(Role.SERVER, Settings(max_concurrent_streams=0))
    client.send_hello({"client_name": "pi"})
    (hello,) = server.receive_data(client.data_to_send())
    assert isinstance(hello, ev.HelloReceived)
    assert hello.fields["client_name"] == "pi"
    assert hello.fields["version"] == PROTOCOL_VERSION
    assert server.remote_settings == Settings(initial_window_bytes=100_000)


def test_first_frame_other_than_hello_is_a_protocol_error() -> None:
    server = Multiplexer(Role.SERVER)
    with pytest.raises(ProtocolError, match="expected HELLO"):
        server.receive_data(encode(Ping(b"12345678")))


def test_hello_from_another_protocol_version_names_both_versions() -> None:
    server = Multiplexer(Role.SERVER)
    with pytest.raises(ProtocolError, match="peer speaks protocol version 99; this side speaks 1"):
        server.receive_data(encode(Hello({"version": 99})))


@pytest.mark.parametrize(
    "fields",
    [
        {"version": 1},
        {
            "version": 1,
            "initial_window_bytes": "big",
            "max_frame_bytes": 65536,
            "max_concurrent_streams": 1,
        },
        {
            "version": 1,
            "initial_window_bytes": 10,
            "max_frame_bytes": 65536,
            "max_concurrent_streams": 1,
        },
        {
            "version": 1,
            "initial_window_bytes": 65536,
            "max_frame_bytes": 2**40,
            "max_concurrent_streams": 1,
        },
        {
            "version": 1,
            "initial_window_bytes": True,
            "max_frame_bytes": 65536,
            "max_concurrent_streams": 1,
        },
    ],
)
def test_hello_with_missing_or_bad_settings_is_a_protocol_error(fields: dict) -> None:
    server = Multiplexer(Role.SERVER)
    with pytest.raises(ProtocolError, match="HELLO setting"):
        server.receive_data(encode(Hello(fields)))


def test_second_hello_is_a_protocol_error() -> None:
    pair = MuxPair()
    pair.client._hello_sent = False  # force a second HELLO onto the wire
    pair.client.send_hello()
    with pytest.raises(ProtocolError, match="HELLO received twice"):
        pair.deliver(pair.client, pair.server)


def test_streams_cannot_open_before_the_handshake() -> None:
    server = Multiplexer(Role.SERVER)
    with pytest.raises(StreamClosed):
        server.open_stream("")


# -- streams --------------------------------------------------------------------------------


def test_stream_carries_bytes_both_ways_and_closes_cleanly() -> None:
    pair = MuxPair()
    sid = pair.server.open_stream("fn.example.com")
    assert sid % 2 == 0
    pair.server.send_data(sid, b"GET / HTTP/1.1\r\n\r\n")
    client_events = pair.deliver(pair.server, pair.client)
    assert client_events[0] == ev.StreamOpened(sid, "fn.example.com")
    assert received_bytes(client_events, sid) == b"GET / HTTP/1.1\r\n\r\n"

    pair.client.send_data(sid, b"HTTP/1.1 200 OK\r\n\r\n", end_stream=True)
    server_events = pair.deliver(pair.client, pair.server)
    assert received_bytes(server_events, sid) == b"HTTP/1.1 200 OK\r\n\r\n"
    assert of_type(server_events, ev.StreamEnded) == [ev.StreamEnded(sid)]
    assert pair.server.stream_state(sid) is StreamState.HALF_CLOSED_REMOTE

    pair.server.end_stream(sid)
    assert of_type(pair.deliver(pair.server, pair.client), ev.StreamEnded) == [ev.StreamEnded(sid)]
    for mux in (pair.client, pair.server):
        stats = mux.statistics()
        assert stats.open_streams == 0
        assert stats.buffered_send_bytes == 0


def test_stream_ids_grow_with_the_openers_parity() -> None:
    pair = MuxPair()
    assert [pair.server.open_stream("") for _ in range(3)] == [2, 4, 6]


def test_write_after_end_stream_raises_stream_closed() -> None:
    pair = MuxPair()
    sid = pair.server.open_stream("")
    pair.server.end_stream(sid)
    with pytest.raises(StreamClosed):
        pair.server.send_data(sid, b"late")


def test_reset_drops_buffered_bytes_and_the_peer_sees_the_code() -> None:
    pair = MuxPair()
    sid = pair.server.open_stream("")
    pair.server.send_data(sid, b"x" * 1000)
    pair.server.reset_stream(sid, ErrorCode.CANCEL)
    events = pair.deliver(pair.server, pair.client)
    assert received_bytes(events, sid) == b""
    assert of_type(events, ev.StreamReset) == [ev.StreamReset(sid, ErrorCode.CANCEL)]
    assert pair.server.statistics().open_streams == 0
    assert pair.client.statistics().open_streams == 0


def test_frames_crossing_a_reset_on_the_wire_are_ignored() -> None:
    pair = MuxPair()
    sid = pair.server.open_stream("")
    pair.exchange()
    pair.client.send_data(sid, b"in flight", end_stream=True)  # client has not seen the RST yet
    pair.client._control.append(encode(WindowUpdate(sid, 100)))
    pair.server.reset_stream(sid)
    pair.deliver(pair.server, pair.client)
    assert pair.deliver(pair.client, pair.server) == []


def test_data_on_a_stream_after_its_end_is_a_protocol_error() -> None:
    pair = MuxPair()
    sid = pair.server.open_stream("")
    pair.exchange()
    pair.client.send_data(sid, b"done", end_stream=True)
    pair.deliver(pair.client, pair.server)
    with pytest.raises(ProtocolError) as raised:
        pair.server.receive_data(encode(Data(sid, b"more")))
    assert raised.value.code is ErrorCode.STREAM_CLOSED


def test_data_on_a_stream_that_closed_normally_is_a_protocol_error() -> None:
    pair = MuxPair()
    sid = pair.server.open_stream("")
    pair.server.end_stream(sid)
    pair.exchange()
    pair.client.end_stream(sid)
    pair.exchange()
    with pytest.raises(ProtocolError, match="after it closed"):
        pair.server.receive_data(encode(Data(sid, b"zombie")))


@pytest.mark.parametrize(
    "frame", [Data(40, b"x"), WindowUpdate(40, 5), Rst(40, ErrorCode.CANCEL)], ids=str
)
def test_frames_for_a_stream_never_opened_are_a_protocol_error(frame: Data) -> None:
    pair = MuxPair()
    with pytest.raises(ProtocolError, match="never opened"):
        pair.server.receive_data(encode(frame))


def test_server_refuses_streams_opened_by_a_client() -> None:
    pair = MuxPair()
    with pytest.raises(ProtocolError, match="may not open streams"):
        pair.server.receive_data(encode(Open(1, "")))


@pytest.mark.parametrize("stream_id", [1, 2], ids=["wrong parity", "not increasing"])
def test_open_with_a_bad_stream_id_is_a_protocol_error(stream_id: int) -> None:
    pair = MuxPair()
    pair.client.receive_data(encode(Open(4, "")))
    with pytest.raises(ProtocolError, match="wrong parity or not increasing"):
        pair.client.receive_data(encode(Open(stream_id + 2 if stream_id == 2 else stream_id, "")))


def test_streams_beyond_the_limit_are_refused_without_disturbing_others() -> None:
    pair = MuxPair(client_settings=Settings(max_concurrent_streams=2))
    first = pair.client.receive_data(
        encode(Open(2, "")) + encode(Open(4, "")) + encode(Open(6, ""))
    )
    assert [e.stream_id for e in of_type(first, ev.StreamOpened)] == [2, 4]
    refused = pair.client.data_to_send()
    assert encode(Rst(6, ErrorCode.REFUSED_STREAM)) in refused


def test_opening_more_streams_than_the_peer_allows_is_refused_locally() -> None:
    pair = MuxPair(client_settings=Settings(max_concurrent_streams=1))
    pair.server.open_stream("")
    with pytest.raises(StreamClosed) as raised:
        pair.server.open_stream("")
    assert raised.value.code is ErrorCode.REFUSED_STREAM


def test_rapid_reset_ends_the_session_with_enhance_your_calm() -> None:
    pair = MuxPair(max_resets_per_window=50)
    flood = b"".join(
        encode(Open(sid, "")) + encode(Rst(sid, ErrorCode.CANCEL)) for sid in range(2, 400, 2)
    )
    with pytest.raises(ProtocolError) as raised:
        pair.client.receive_data(flood)
    assert raised.value.code is ErrorCode.ENHANCE_YOUR_CALM


def test_streams_reset_after_they_carried_data_are_abandoned_exchanges_not_a_flood() -> None:
    # The exit server resets a stream when its visitor goes away mid-exchange:
    # the request went out as DATA first. Visitors dropping requests (a
    # browser navigating away, a client timing out, or someone doing it on
    # purpose) must not end the session that serves everyone else.
    pair = MuxPair(max_resets_per_window=50)
    abandoned = b"".join(
        encode(Open(sid, ""))
        + encode(Data(sid, b"GET / HTTP/1.1\r\n\r\n"))
        + encode(Rst(sid, ErrorCode.CANCEL))
        for sid in range(2, 400, 2)
    )
    events = pair.client.receive_data(abandoned)
    assert len(of_type(events, ev.StreamReset)) == 199
    assert pair.client.statistics().open_streams == 0
    # Opening and resetting with nothing in between still counts.
    churn = b"".join(
        encode(Open(sid, "")) + encode(Rst(sid, ErrorCode.CANCEL)) for sid in range(400, 600, 2)
    )
    with pytest.raises(ProtocolError) as raised:
        pair.client.receive_data(churn)
    assert raised.value.code is ErrorCode.ENHANCE_YOUR_CALM


def test_raw_tcp_streams_reset_before_any_byte_are_visitors_that_left_not_a_flood() -> None:
    # A visitor of a raw TCP port may connect and go before either side sent
    # a byte: its stream is reset with no DATA. Counted, a few thousand such
    # connections from anyone would end the session that serves everyone.
    pair = MuxPair(max_resets_per_window=50)
    dropped = b"".join(
        encode(Open(sid, "tcp:2222")) + encode(Rst(sid, ErrorCode.CANCEL))
        for sid in range(2, 400, 2)
    )
    events = pair.client.receive_data(dropped)
    assert len(of_type(events, ev.StreamReset)) == 199
    # A route named like a host is counted as before.
    churn = b"".join(
        encode(Open(sid, "tcp.example")) + encode(Rst(sid, ErrorCode.CANCEL))
        for sid in range(400, 600, 2)
    )
    with pytest.raises(ProtocolError) as raised:
        pair.client.receive_data(churn)
    assert raised.value.code is ErrorCode.ENHANCE_YOUR_CALM


def test_reset_counter_starts_again_each_rate_window() -> None:
    pair = MuxPair(max_resets_per_window=50)
    sid = 2
    for window in range(3):
        for _ in range(40):
            pair.client.receive_data(encode(Open(sid, "")) + encode(Rst(sid, ErrorCode.CANCEL)))
            sid += 2
        pair.client.handle_timer(10.0 * (window + 1))


# -- flow control -----------------------------------------------------------------------------


def test_sender_stops_at_the_window_and_resumes_on_acknowledge() -> None:
    pair = MuxPair()
    sid = pair.server.open_stream("")
    body = bytes(range(256)) * 4096  # 1 MiB
    pair.server.send_data(sid, body)
    first = pair.deliver(pair.server, pair.client)
    assert len(received_bytes(first, sid)) == DEFAULT_WINDOW_BYTES
    assert pair.server.buffered_bytes(sid) == len(body) - DEFAULT_WINDOW_BYTES
    assert pair.deliver(pair.server, pair.client) == []  # no credit, nothing moves

    got = received_bytes(first, sid)
    while len(got) < len(body):
        pair.client.acknowledge(sid, DEFAULT_WINDOW_BYTES)
        server_events = pair.deliver(pair.client, pair.server)
        assert of_type(server_events, ev.WindowUpdated)
        got += received_bytes(pair.deliver(pair.server, pair.client), sid)
    assert got == body


def test_credit_returns_only_when_the_consumer_reads() -> None:
    pair = MuxPair()
    sid = pair.server.open_stream("")
    pair.server.send_data(sid, b"x" * DEFAULT_WINDOW_BYTES)
    pair.exchange()
    assert pair.server.send_window(sid) == 0
    pair.client.acknowledge(sid, DEFAULT_WINDOW_BYTES // 8)  # below the update threshold
    pair.exchange()
    assert pair.server.send_window(sid) == 0
    pair.client.acknowledge(sid, DEFAULT_WINDOW_BYTES // 8)
    pair.exchange()
    assert pair.server.send_window(sid) == DEFAULT_WINDOW_BYTES // 4


def measured_round_trip(pair: MuxPair, receiver: Multiplexer, rtt_s: float) -> None:
    """Let ``receiver`` time a PING, and the second one it sends, answered ``rtt_s`` later."""
    receiver.now = 100.0
    receiver.measure_round_trip()
    for answered_at in (100.0 + rtt_s, 100.0 + 2 * rtt_s):
        pair.deliver(receiver, pair.peer(receiver))
        receiver.now = answered_at
        assert of_type(pair.deliver(pair.peer(receiver), receiver), ev.PingAcknowledged)
    assert receiver.path_round_trip_s == pytest.approx(rtt_s)


def test_the_path_round_trip_needs_a_second_ping_which_goes_out_at_once() -> None:
    pair = MuxPair()
    pair.client.now = 50.0
    pair.client.measure_round_trip()
    pair.deliver(pair.client, pair.server)
    pair.client.now = 50.4  # a peer still busy starting answers late
    pair.deliver(pair.server, pair.client)
    assert pair.client.path_round_trip_s == math.inf
    assert pair.client.has_data_to_send  # the second PING
    pair.deliver(pair.client, pair.server)
    pair.client.now = 50.45
    pair.deliver(pair.server, pair.client)
    assert pair.client.path_round_trip_s == pytest.approx(0.05)
    assert not pair.client.has_data_to_send


def consume_quarters(
    pair: MuxPair, sid: int, quarters: int, *, every_s: float, start_s: float = 200.0
) -> list[int]:
    """The server sends, the client reads a quarter window at a time ``every_s`` apart.

    Returns the increments of the WINDOW_UPDATEs the server received, in order.
    """
    client, server = pair.client, pair.server
    increments: list[int] = []
    now = start_s
    for _ in range(quarters):
        quarter = client.receive_window_size(sid) // 4
        server.send_data(sid, b"x" * quarter)
        pair.deliver(server, client)
        now += every_s
        client.now = now
        client.acknowledge(sid, quarter)
        updates = of_type(pair.deliver(client, server), ev.WindowUpdated)
        increments += [u.increment for u in updates]
    return increments


def test_a_window_that_holds_a_fast_reader_back_doubles_up_to_its_limit() -> None:
    pair = MuxPair()
    sid = pair.server.open_stream("")
    pair.exchange()
    measured_round_trip(pair, pair.client, 0.2)
    # A quarter of the window read every 0.1 s: faster than credit's round trip.
    increments = consume_quarters(pair, sid, 24, every_s=0.1)
    assert increments[0] == DEFAULT_WINDOW_BYTES // 4  # the first update only times the reader
    assert increments[1] == DEFAULT_WINDOW_BYTES // 4 + DEFAULT_WINDOW_BYTES  # and doubles
    assert pair.client.receive_window_size(sid) == MAX_AUTOTUNED_WINDOW_BYTES
    # The sender may use all of it: the credit it holds is the grown window.
    pair.server.send_data(sid, b"y" * (2 * MAX_AUTOTUNED_WINDOW_BYTES))
    pair.deliver(pair.server, pair.client, max_bytes=1 << 30)
    assert pair.server.buffered_bytes(sid) == MAX_AUTOTUNED_WINDOW_BYTES
    assert pair.server.send_window(sid) == 0


def test_a_slow_reader_and_an_unmeasured_link_keep_the_window() -> None:
    slow = MuxPair()
    sid = slow.server.open_stream("")
    slow.exchange()
    measured_round_trip(slow, slow.client, 0.2)
    # A quarter every 0.5 s: the reader, not the window, sets the pace.
    assert set(consume_quarters(slow, sid, 12, every_s=0.5)) == {DEFAULT_WINDOW_BYTES // 4}
    assert slow.client.receive_window_size(sid) == DEFAULT_WINDOW_BYTES

    unmeasured = MuxPair()  # no PING answered yet: no round trip to judge by
    sid = unmeasured.server.open_stream("")
    unmeasured.exchange()
    assert set(consume_quarters(unmeasured, sid, 12, every_s=0.001)) == {DEFAULT_WINDOW_BYTES // 4}

    lan = MuxPair()  # 10 ms: the initial window already carries 800 Mbit/s
    sid = lan.server.open_stream("")
    lan.exchange()
    measured_round_trip(lan, lan.client, 0.010)
    assert set(consume_quarters(lan, sid, 12, every_s=0.0001)) == {DEFAULT_WINDOW_BYTES // 4}


def test_the_round_trip_is_the_shortest_of_the_last_pings() -> None:
    pair = MuxPair()
    measured_round_trip(pair, pair.client, 0.2)

    def ping(at: float, answered_after: float) -> float:
        pair.client.now = at
        pair.client.measure_round_trip()
        pair.deliver(pair.client, pair.server)
        pair.client.now = at + answered_after
        pair.deliver(pair.server, pair.client)
        return pair.client.path_round_trip_s

    assert ping(300.0, 1.5) == pytest.approx(0.2)  # queued behind a transfer, say
    assert ping(310.0, 0.8) == pytest.approx(0.2)
    assert ping(320.0, 0.9) == pytest.approx(0.8)  # the path itself got longer


def test_the_windows_of_a_session_grow_within_its_budget_and_give_it_back() -> None:
    pair = MuxPair()
    measured_round_trip(pair, pair.client, 0.2)
    grown = SESSION_WINDOW_GROWTH_BYTES // (MAX_AUTOTUNED_WINDOW_BYTES - DEFAULT_WINDOW_BYTES)
    sids = [pair.server.open_stream("") for _ in range(grown + 1)]
    pair.exchange()
    for sid in sids:
        consume_quarters(pair, sid, 24, every_s=0.1)
    sizes = [pair.client.receive_window_size(sid) for sid in sids]
    assert sum(size - DEFAULT_WINDOW_BYTES for size in sizes) <= SESSION_WINDOW_GROWTH_BYTES
    assert sizes[-1] < MAX_AUTOTUNED_WINDOW_BYTES  # the budget ran out before the last one
    # A stream that ends gives its growth back for the next one.
    pair.server.reset_stream(sids[0], ErrorCode.CANCEL)
    pair.exchange()
    late = pair.server.open_stream("")
    pair.exchange()
    consume_quarters(pair, late, 24, every_s=0.1)
    assert pair.client.receive_window_size(late) == MAX_AUTOTUNED_WINDOW_BYTES


def test_data_beyond_window_raises_flow_control_error() -> None:
    pair = MuxPair(client_settings=Settings(initial_window_bytes=4096))
    sid = pair.server.open_stream("")
    pair.exchange()
    with pytest.raises(ProtocolError) as raised:
        pair.client.receive_data(encode(Data(sid, b"x" * 4097)))
    assert raised.value.code is ErrorCode.FLOW_CONTROL_ERROR


def test_window_update_overflowing_31_bits_raises_flow_control_error() -> None:
    pair = MuxPair()
    sid = pair.server.open_stream("")
    pair.exchange()
    with pytest.raises(ProtocolError) as raised:
        pair.server.receive_data(encode(WindowUpdate(sid, 2**31 - 1)))
    assert raised.value.code is ErrorCode.FLOW_CONTROL_ERROR


def test_busy_streams_share_each_message_round_robin() -> None:
    pair = MuxPair(client_settings=Settings(max_frame_bytes=1024))
    first, second = pair.server.open_stream(""), pair.server.open_stream("")
    pair.server.send_data(first, b"a" * 100_000)
    pair.server.send_data(second, b"b" * 100_000)
    message = pair.server.data_to_send(max_bytes=8 * 1034 + 100)
    events = pair.client.receive_data(message)
    order = [e.stream_id for e in events if isinstance(e, ev.DataReceived)]
    assert order[:4] == [first, second, first, second]


def test_a_stalled_stream_does_not_hold_back_another() -> None:
    pair = MuxPair()
    stalled, live = pair.server.open_stream(""), pair.server.open_stream("")
    pair.server.send_data(stalled, b"s" * (4 * DEFAULT_WINDOW_BYTES))
    pair.exchange()  # stalled's window is now used up and nobody reads it
    pair.server.send_data(live, b"small response")
    events = pair.deliver(pair.server, pair.client)
    assert received_bytes(events, live) == b"small response"


def test_end_stream_waits_behind_buffered_bytes() -> None:
    pair = MuxPair(client_settings=Settings(initial_window_bytes=2048))
    sid = pair.server.open_stream("")
    pair.server.send_data(sid, b"z" * 5000, end_stream=True)
    events = pair.deliver(pair.server, pair.client)
    assert not of_type(events, ev.StreamEnded)
    got = received_bytes(events, sid)
    while not of_type(events, ev.StreamEnded):
        pair.client.acknowledge(sid, len(received_bytes(events, sid)))
        pair.deliver(pair.client, pair.server)
        events = pair.deliver(pair.server, pair.client)
        got += received_bytes(events, sid)
    assert got == b"z" * 5000


# -- go-away and heartbeat ------------------------------------------------------------------


def test_go_away_stops_new_streams_and_refuses_unseen_ones() -> None:
    pair = MuxPair()
    seen = pair.server.open_stream("")
    pair.exchange()
    unseen = pair.server.open_stream("")  # not yet delivered when the client goes away
    pair.server.data_to_send()  # lost on the wire, say
    pair.client.go_away(ErrorCode.NO_ERROR, "bye")
    events = pair.deliver(pair.client, pair.server)
    assert ev.StreamReset(unseen, ErrorCode.REFUSED_STREAM) in events
    assert ev.GoAwayReceived(seen, ErrorCode.NO_ERROR, "bye") in events
    assert pair.server.stream_state(seen) is StreamState.OPEN
    with pytest.raises(StreamClosed):
        pair.server.open_stream("")


def test_a_side_that_uses_its_last_stream_id_goes_away_with_it() -> None:
    pair = MuxPair()
    pair.server._next_local_id = MAX_STREAM_ID - 1  # the last even id: a billion streams on
    last = pair.server.open_stream("")
    assert last == MAX_STREAM_ID - 1
    events = pair.deliver(pair.server, pair.client)
    assert ev.StreamOpened(last, "") in events
    assert ev.GoAwayReceived(0, ErrorCode.NO_ERROR, "stream ids exhausted") in events
    assert pair.server.stream_state(last) is StreamState.OPEN  # it carries on to its end
    with pytest.raises(StreamClosed, match="going away"):
        pair.server.open_stream("")


def test_heartbeat_pings_and_the_ack_reports_its_send_time() -> None:
    pair = MuxPair(heartbeat_interval_s=10.0, heartbeat_timeout_s=20.0)
    assert pair.server.next_deadline() == 10.0
    assert pair.server.handle_timer(10.0) == []
    pair.deliver(pair.server, pair.client)  # the client answers the PING at once
    events = pair.deliver(pair.client, pair.server)
    assert events == [ev.PingAcknowledged(10.0)]


def test_a_silent_peer_is_declared_dead_within_timeout_plus_one_interval() -> None:
    # The HELLO arrived before t=0; the timer samples traffic, so the last
    # sign of life is dated at the first tick that saw it (t=10) at worst.
    pair = MuxPair(heartbeat_interval_s=10.0, heartbeat_timeout_s=20.0)
    pair.server.handle_timer(10.0)
    pair.server.data_to_send()  # the PING vanishes: the link is dead
    assert pair.server.handle_timer(20.0) == []
    assert pair.server.next_deadline() == 30.0
    (timeout,) = pair.server.handle_timer(30.0)
    assert isinstance(timeout, ev.HeartbeatTimedOut)
    assert timeout.silent_s == 20.0


def test_any_traffic_counts_as_a_sign_of_life() -> None:
    pair = MuxPair(heartbeat_interval_s=10.0, heartbeat_timeout_s=20.0)
    sid = pair.server.open_stream("")
    pair.exchange()
    for now in (10.0, 19.0, 28.0, 37.0):
        pair.client.send_data(sid, b"busy")
        pair.deliver(pair.client, pair.server)
        assert not of_type(pair.server.handle_timer(now), ev.HeartbeatTimedOut)
        pair.server.data_to_send()  # PINGs lost; only the data gets through


# -- the stateful model -------------------------------------------------------------------------


class MuxModel(RuleBasedStateMachine):
    """Any interleaving of opens, data, acknowledgements, ends and resets, both directions.

    Invariants: every stream's bytes arrive complete and in order; no sender
    exceeds its window (the receiver would raise); closed streams leave
    nothing behind.
    """

    streams = Bundle("streams")

    def __init__(self) -> None:
        super().__init__()
        self.pair = MuxPair(
            client_settings=Settings(initial_window_bytes=4096, max_frame_bytes=1024)
        )
        self.sent: dict[tuple[int, str], bytearray] = {}
        self.got: dict[tuple[int, str], bytearray] = {}
        self.unacked: dict[tuple[int, str], int] = {}
        self.ended: set[tuple[int, str]] = set()
        self.reset: set[int] = set()
        for mux in (self.pair.client, self.pair.server):
            mux.path_round_trip_s = 0.05  # as if a PING had been answered: windows may grow

    def mux(self, side: str) -> Multiplexer:
        return self.pair.client if side == "client" else self.pair.server

    def absorb(self, side: str, events: list[ev.Event]) -> None:
        for event in events:
            if isinstance(event, ev.DataReceived):
                key = (event.stream_id, side)
                self.got.setdefault(key, bytearray()).extend(event.data)
                self.unacked[key] = self.unacked.get(key, 0) + len(event.data)
            elif isinstance(event, ev.StreamReset):
                self.reset.add(event.stream_id)

    @rule(target=streams)
    def open_stream(self) -> int:
        return self.pair.server.open_stream("")

    @rule(sid=streams, side=st.sampled_from(["client", "server"]), size=st.integers(1, 6000))
    def send(self, sid: int, side: str, size: int) -> None:
        if sid in self.reset or (sid, side) in self.ended:
            return
        if side == "client" and self.pair.client.stream_state(sid) is StreamState.CLOSED:
            return  # the client has not received the OPEN yet
        key = (sid, side)
        data = bytes([len(self.sent.get(key, b"")) % 251]) * size
        self.mux(side).send_data(sid, data)
        self.sent.setdefault(key, bytearray()).extend(data)

    @rule(sid=streams, side=st.sampled_from(["client", "server"]))
    def end(self, sid: int, side: str) -> None:
        if sid in self.reset or (sid, side) in self.ended:
            return
        if side == "client" and self.pair.client.stream_state(sid) is StreamState.CLOSED:
            return
        self.mux(side).end_stream(sid)
        self.ended.add((sid, side))

    @rule(sid=consumes(streams))
    def reset_stream(self, sid: int) -> None:
        self.pair.server.reset_stream(sid)
        self.reset.add(sid)

    @rule(sid=streams, side=st.sampled_from(["client", "server"]), fraction=st.floats(0, 1))
    def acknowledge(self, sid: int, side: str, fraction: float) -> None:
        receiver = "server" if side == "client" else "client"
        key = (sid, side)
        amount = int(self.unacked.get(key, 0) * fraction)
        if amount:
            self.mux(receiver).acknowledge(sid, amount)
            self.unacked[key] -= amount

    @rule(seconds=st.sampled_from([0.0, 0.01, 0.1]))
    def time_passes(self, seconds: float) -> None:
        # Quick reads (less than the round trip since the last update) grow windows.
        for mux in (self.pair.client, self.pair.server):
            mux.now += seconds

    @rule(budget=st.integers(20, 5000))
    def deliver_some(self, budget: int) -> None:
        message = self.pair.server.data_to_send(budget)
        if message:
            self.absorb("server", self.pair.client.receive_data(message))
        message = self.pair.client.data_to_send(budget)
        if message:
            self.absorb("client", self.pair.server.receive_data(message))

    @invariant()
    def bytes_arrive_in_order_and_never_beyond_what_was_sent(self) -> None:
        for key, got in self.got.items():
            assert self.sent[key].startswith(got)

    @invariant()
    def windows_grow_only_within_the_sessions_budget(self) -> None:
        for mux in (self.pair.client, self.pair.server):
            initial = mux.local_settings.initial_window_bytes
            grown = sum(stream.recv.size - initial for stream in mux._streams.values())
            assert 0 <= grown == SESSION_WINDOW_GROWTH_BYTES - mux._growth_left

    def teardown(self) -> None:
        # Drain everything: read all, deliver all, end all; then nothing may remain.
        for _ in range(10_000):
            for (sid, side), count in list(self.unacked.items()):
                if count:
                    receiver = "server" if side == "client" else "client"
                    self.mux(receiver).acknowledge(sid, count)
                    self.unacked[(sid, side)] = 0
            if not (self.pair.client.has_data_to_send or self.pair.server.has_data_to_send):
                break
            self.deliver_some(1 << 20)
        for key, sent in self.sent.items():
            if key[0] not in self.reset:
                assert self.got.get(key, b"") == sent
        for mux in (self.pair.client, self.pair.server):
            for sid in list(mux._streams):
                mux.reset_stream(sid)
        self.deliver_some(1 << 20)
        for mux in (self.pair.client, self.pair.server):
            stats = mux.statistics()
            assert stats.open_streams == 0
            assert stats.buffered_send_bytes == 0


TestMuxModel = MuxModel.TestCase
TestMuxModel.settings = settings(
    deadline=None,
    max_examples=150,
    stateful_step_count=40,
    suppress_health_check=[HealthCheck.too_slow],
)
