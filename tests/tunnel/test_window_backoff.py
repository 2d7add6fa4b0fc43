"""Receive windows and reconnect backoff: small pure pieces, driven directly."""

from __future__ import annotations

import random

import pytest

from tunnel.backoff import Backoff
from tunnel.errors import ErrorCode, ProtocolError
from tunnel.window import ReceiveWindow


def test_window_update_waits_for_a_quarter_of_the_window() -> None:
    window = ReceiveWindow(1000)
    window.receive(1, 600)
    assert window.consume(200) == 0
    assert window.consume(50) == 250
    assert window.available == 650
    assert window.held == 350


def test_receiving_beyond_the_credit_is_a_flow_control_error() -> None:
    window = ReceiveWindow(1000)
    window.receive(1, 1000)
    with pytest.raises(ProtocolError) as raised:
        window.receive(1, 1)
    assert raised.value.code is ErrorCode.FLOW_CONTROL_ERROR


def test_consuming_more_than_was_received_is_a_local_bug() -> None:
    with pytest.raises(ValueError, match="only 0 held"):
        ReceiveWindow(1000).consume(1)


def test_backoff_grows_to_the_cap_with_jitter_and_a_floor() -> None:
    backoff = Backoff(base_s=1.0, max_s=30.0, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(12)]
    assert all(1.0 <= d <= 30.0 for d in delays)
    ceilings = [min(30.0, 2.0 ** (n + 1)) for n in range(12)]
    assert all(d <= c for d, c in zip(delays, ceilings, strict=True))
    assert max(delays[6:]) > 10.0  # it does grow


def test_backoff_is_reproducible_with_a_seeded_rng_and_resets() -> None:
    first = Backoff(rng=random.Random(42))
    second = Backoff(rng=random.Random(42))
    assert [first.next_delay() for _ in range(5)] == [second.next_delay() for _ in range(5)]
    first.reset()
    assert 1.0 <= first.next_delay() <= 2.0


def test_clients_dropped_together_do_not_come_back_in_step() -> None:
    firsts = [Backoff(rng=random.Random(seed)).next_delay() for seed in range(100)]
    assert all(1.0 <= d <= 2.0 for d in firsts)
    assert max(firsts) - min(firsts) > 0.8  # spread over the first second of jitter
    assert len({round(d, 2) for d in firsts}) > 50


def test_backoff_rejects_nonsense_bounds() -> None:
    with pytest.raises(ValueError, match="0 < base_s <= max_s"):
        Backoff(base_s=5, max_s=1)
