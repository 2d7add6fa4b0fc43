"""The access log's lines, written to a pipe as the exit server writes them to stderr."""

from __future__ import annotations

import asyncio
import os
import re
import time

from hypothesis import example, given, settings
from hypothesis import strategies as st

from server.accesslog import AccessLog
from tunnel.log import escape

LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d INFO    homeport\.server\.access: (?P<client>\S+) "
    r'"(?P<method>[A-Z]+) (?P<path>.*)" host=(?P<host>\S+) status=(?P<status>\d+) '
    r"in=(?P<in>\d+) out=(?P<out>\d+) ms=(?P<ms>\d+\.\d)$"
)


def logged(path: bytes, *, host: str | None = "example.com", ago_s: float = 0.0) -> str:
    """The one line the access log writes for a GET of ``path`` begun ``ago_s`` ago."""
    read_end, write_end = os.pipe()
    try:

        async def record() -> None:
            log = AccessLog(write_end, enabled=True)
            now = time.monotonic()
            log.record("pi", b"GET", path, host, 200, 12, 1024, now - ago_s, now)
            await asyncio.sleep(0)  # the line leaves at the end of the loop iteration

        asyncio.run(record())
        os.set_blocking(read_end, False)
        data = os.read(read_end, 1 << 16)
    finally:
        os.close(read_end)
        os.close(write_end)
    text = data.decode("utf-8")
    assert text.endswith("\n"), text
    assert text.count("\n") == 1, text
    return text[:-1]


def test_a_line_names_the_client_request_host_status_and_sizes() -> None:
    match = LINE.match(logged(b"/function/figlet"))
    assert match is not None
    assert match.group("client", "method", "path", "host", "status", "in", "out") == (
        "pi", "GET", "/function/figlet", "example.com", "200", "12", "1024",
    )  # fmt: skip
    assert float(match.group("ms")) < 60_000


def test_the_duration_is_in_milliseconds_to_a_tenth() -> None:
    match = LINE.match(logged(b"/", ago_s=2.5))
    assert match is not None
    assert 2500.0 <= float(match.group("ms")) < 2600.0  # the line is written microseconds later


def test_a_request_without_a_host_is_logged_with_a_dash() -> None:
    match = LINE.match(logged(b"/", host=None))
    assert match is not None
    assert match.group("host") == "-"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
@example(b'/a"b\\c\x1b[2J\x7f')
@example(b"/\x85\xa0\xff")  # latin-1's C1 controls and the rest pass as escape() leaves them
@example(b"/" + b"a" * 600)  # cut to 512 and marked, as escape() does
def test_the_path_is_shown_exactly_as_escape_shows_it(path: bytes) -> None:
    line = logged(path)
    assert f' "GET {escape(path)}" host=example.com ' in line
    # Nothing a visitor sends can start a line of its own or break the quotes.
    assert "\n" not in line
    assert "\r" not in line
