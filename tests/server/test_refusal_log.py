"""Connections refused by a limit are summed up in the log once a minute (server/app.py).

Each refusal is only counted as it happens: a line per refused connection
would let a flood fill the log. A real ExitServer on 127.0.0.1 refuses real
connections; the summary is asked for directly, and once by its timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator

import pytest

from server import app
from server.app import ExitServer
from server.config import ServerConfig
from server.control import MAX_HANDSHAKES, MAX_HANDSHAKES_PER_ADDRESS
from server.limits import MAX_REFUSED_ADDRESSES, ConnectionsPerAddress, Refusals
from tests.support.waiting import wait_until
from tunnel.auth import generate_token, token_digest


@contextlib.asynccontextmanager
async def exit_server(**settings: object) -> AsyncIterator[ExitServer]:
    config = ServerConfig(
        token_digest=token_digest(generate_token()),
        bind="127.0.0.1",
        port=0,
        control_port=0,
        **settings,  # type: ignore[arg-type]
    )
    server = ExitServer(config)
    await server.start()
    try:
        yield server
    finally:
        await server.shutdown()


async def dial(port: int, source: str) -> asyncio.StreamWriter:
    _, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    return writer


async def log_in(port: int, source: str) -> int:
    """``GET /status`` on the control port with a wrong token; the answer's status."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    wrong = b"w" * 43
    writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n\r\n" % wrong)
    status_line = await asyncio.wait_for(reader.readline(), timeout=10)
    writer.close()
    return int(status_line.split()[1])


AT_CAPACITY = re.compile(r"(\d+) visitor connections? at --max-connections \(2 open\)")
BEYOND_HANDSHAKES = re.compile(
    rf"(\d+) control connections? beyond the {MAX_HANDSHAKES}"
    r" that may be in their handshake at once"
)


def summaries(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused in")]


async def test_refused_connections_are_summed_up_in_one_line_by_limit_and_address(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="homeport.server")
    async with exit_server(max_connections_per_address=1, max_auth_failures=1) as server:
        [(_, public_port)] = server.public_addresses
        [(_, control_port)] = server.control_addresses
        writers = [await dial(public_port, "127.0.0.1")]  # held: the address's one
        await wait_until(lambda: len(server.public.connections) == 1)
        writers += [await dial(public_port, "127.0.0.1") for _ in range(3)]
        writers += [await dial(public_port, "127.0.0.2") for _ in range(2)]  # one refused
        callers = MAX_HANDSHAKES_PER_ADDRESS + 4
        writers += [await dial(control_port, "127.0.0.3") for _ in range(callers)]
        # A wrong token, then two more tries: past --max-auth-failures, 429.
        assert [await log_in(control_port, "127.0.0.4") for _ in range(3)] == [401, 429, 429]
        await wait_until(
            lambda: (
                server.public.per_address.refused == 4
                and server.control.handshake_addresses.refused == 4
            )
        )
        server._log_refusals()
        assert summaries(caplog) == [
            "refused in the last 60 s: 4 visitor connections from addresses at"
            " --max-connections-per-address (127.0.0.1: 3, 127.0.0.2: 1); 4 control"
            " connections from addresses at their handshake limit (127.0.0.3: 4);"
            " 2 logins from addresses at --max-auth-failures, answered 429 (127.0.0.4: 2)"
        ]
        # Nothing refused since: nothing to say.
        server._log_refusals()
        assert len(summaries(caplog)) == 1
        for writer in writers:
            writer.close()


async def test_refusals_at_capacity_are_summed_up_and_the_timer_logs_on_its_own(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.WARNING, logger="homeport.server")
    monkeypatch.setattr(app, "REFUSALS_LOG_INTERVAL_S", 0.2)
    async with exit_server(max_connections=2) as server:
        [(_, public_port)] = server.public_addresses
        [(_, control_port)] = server.control_addresses
        writers = [await dial(public_port, "127.0.0.1") for _ in range(2)]
        await wait_until(lambda: len(server.public.connections) == 2)
        writers += [await dial(public_port, f"127.0.0.{n}") for n in range(2, 7)]
        # The control port's handshakes, every address within its own share:
        # the last address's calls are the ones beyond the total.
        sources = -(-MAX_HANDSHAKES // MAX_HANDSHAKES_PER_ADDRESS) + 1
        for n in range(sources):
            for _ in range(MAX_HANDSHAKES_PER_ADDRESS):
                writers.append(await dial(control_port, f"127.0.1.{n + 1}"))
        beyond = sources * MAX_HANDSHAKES_PER_ADDRESS - MAX_HANDSHAKES
        await wait_until(
            lambda: (
                server.public.refused_at_capacity.total == 5
                and server.control.handshakes_refused_at_capacity.total == beyond
            )
        )

        def told() -> tuple[int, int]:
            """Refusals summed up so far (a busy machine may split them over two lines)."""
            visitors = callers = 0
            for line in summaries(caplog):
                for part in line.removeprefix("refused in the last 0.2 s: ").split("; "):
                    if match := AT_CAPACITY.fullmatch(part):
                        visitors += int(match.group(1))
                    elif match := BEYOND_HANDSHAKES.fullmatch(part):
                        callers += int(match.group(1))
                    else:
                        raise AssertionError(f"not a summary of refusals at capacity: {line}")
            return visitors, callers

        await wait_until(lambda: told() == (5, beyond))
        for writer in writers:
            writer.close()


def test_a_summary_names_the_addresses_refused_most_and_counts_the_rest() -> None:
    limit = ConnectionsPerAddress(limit=1)
    for address, refused in (("203.0.113.7", 9), ("198.51.100.1", 5), ("192.0.2.1", 1)):
        for _ in range(refused + 1):
            limit.admit(address)
    for n in range(4):
        limit.admit(f"2001:db8:0:{n}::1")
        limit.admit(f"2001:db8:0:{n}::2")  # the same /64: refused
    count, by_address = limit.refusals.take()
    assert count == 19
    assert app._most_refused(by_address) == (
        "203.0.113.7: 9, 198.51.100.1: 5, 192.0.2.1: 1, and 4 more"
    )
    assert limit.refusals.take() == (0, {})  # taken: the next summary starts afresh
    assert limit.refused == 19  # the running total stays, for GET /status


def test_refusals_are_told_apart_for_a_bounded_number_of_addresses() -> None:
    refusals = Refusals()
    for n in range(MAX_REFUSED_ADDRESSES + 10):
        refusals.count(f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}")
    refusals.count("10.0.0.0")  # one told apart already: counted with it
    count, by_address = refusals.take()
    assert count == refusals.total == MAX_REFUSED_ADDRESSES + 11
    assert len(by_address) == MAX_REFUSED_ADDRESSES
    assert by_address["10.0.0.0"] == 2
