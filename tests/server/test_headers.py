"""Header kinds: found from a name in any case, through a cache that stays bounded."""

from __future__ import annotations

from server.headers import (
    CONTENT_LENGTH,
    HOP,
    KIND_AS_SENT,
    TRANSFER_ENCODING,
    kind_of,
)


def test_a_header_kind_is_found_whatever_the_case_of_its_name() -> None:
    assert kind_of(b"Content-Length") == CONTENT_LENGTH
    assert kind_of(b"cOnTeNt-LeNgTh") == CONTENT_LENGTH
    assert kind_of(b"Keep-Alive") == HOP
    assert kind_of(b"X-Request-Id") == 0
    # Asked again, now from the cache: the same answers.
    assert kind_of(b"Content-Length") == CONTENT_LENGTH
    assert kind_of(b"X-Request-Id") == 0


def test_names_a_visitor_invents_cannot_grow_the_cache_or_change_an_answer() -> None:
    long_name = b"X-" + b"a" * 100
    assert kind_of(long_name) == 0
    assert long_name not in KIND_AS_SENT  # long names are never kept
    for number in range(1000):
        assert kind_of(b"X-Invented-%d" % number) == 0
    assert len(KIND_AS_SENT) <= 256
    # Once the cache is full, a name it has not seen still gets its kind.
    assert kind_of(b"TRANSFER-encoding") == TRANSFER_ENCODING
    assert kind_of(b"tRaNsFeR-eNcOdInG") == TRANSFER_ENCODING
