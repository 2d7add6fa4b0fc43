"""Fuzzing a session with a rogue authenticated client (issue 4).

Whatever an authenticated client sends, the exit server either keeps the
session or ends it with a protocol close code, never an internal error;
it never crashes; and a well-behaved client on the same server keeps being
served. The server runs in this process so each example costs milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import websockets
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect as ws_connect

from server.app import ExitServer
from tests.support.world import TOKEN, running_world
from tunnel.errors import ErrorCode
from tunnel.frames import HEADER, Data, GoAway, Hello, Open, Ping, Rst, WindowUpdate, encode

PROTOCOL_CLOSE_CODES = {1000, 1002, 1003, 1008, 1009}

VALID_HELLO = encode(Hello({
    "version": 1, "initial_window_bytes": 65536, "max_frame_bytes": 65536,
    "max_concurrent_streams": 100, "client_name": "rogue", "routes": [{"host": "rogue.example"}],
}))  # fmt: skip

stream_ids = st.integers(0, 2**32 - 1)
frames = st.one_of(
    st.builds(
        lambda s, d, e: encode(Data(s, d, e)),
        st.integers(1, 64),
        st.binary(max_size=64),
        st.booleans(),
    ),
    st.builds(
        lambda s, r: encode(Open(s, r)),
        st.integers(1, 64),
        st.sampled_from(["", "rogue.example", "x"]),
    ),
    st.builds(
        lambda s, i: encode(WindowUpdate(s, i)), st.integers(1, 64), st.integers(1, 2**31 - 1)
    ),
    st.builds(lambda s, c: encode(Rst(s, c)), st.integers(1, 64), st.sampled_from(ErrorCode)),
    st.builds(lambda o, a: encode(Ping(o, a)), st.binary(min_size=8, max_size=8), st.booleans()),
    st.builds(
        lambda last, c: encode(GoAway(last, c, "bye")),
        st.integers(0, 64),
        st.sampled_from(ErrorCode),
    ),
    st.builds(
        lambda t, f, s, n, p: HEADER.pack(t, f, s, n) + p,
        st.integers(0, 255),
        st.integers(0, 255),
        stream_ids,
        st.integers(0, 2**32 - 1),
        st.binary(max_size=32),
    ),
    st.binary(max_size=64),
)
messages = st.lists(
    st.one_of(st.lists(frames, min_size=1, max_size=4).map(b"".join), st.text(max_size=10)),
    max_size=6,
)


async def honest_request_works(server: ExitServer) -> bool:
    url = f"http://127.0.0.1:{server.public_addresses[0][1]}/"
    async with (
        aiohttp.ClientSession() as http,
        http.get(url, headers={"Host": "anything.example"}) as response,
    ):
        return response.status == 200 and await response.text() == "fine"


async def one_rogue(server: ExitServer, hello: bool, batch: list[bytes | str]) -> None:
    url = f"ws://127.0.0.1:{server.control_addresses[0][1]}/connect"
    async with ws_connect(
        url,
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        subprotocols=[websockets.Subprotocol("homeport.v1")],
        compression=None,
        ping_interval=None,
        max_size=None,
    ) as ws:
        with contextlib.suppress(websockets.ConnectionClosed):
            if hello:
                await ws.send(VALID_HELLO)
            for message in batch:
                await ws.send(message)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.3):
                    while True:
                        await ws.recv()
        if ws.close_code is not None:
            assert ws.close_code in PROTOCOL_CLOSE_CODES, ws.close_code


def test_rogue_sessions_never_crash_the_server_or_disturb_others() -> None:
    loop = asyncio.new_event_loop()
    stack = contextlib.AsyncExitStack()
    try:
        server = loop.run_until_complete(stack.enter_async_context(running_world())).server

        @settings(deadline=None, max_examples=120, suppress_health_check=list(HealthCheck))
        @given(hello=st.booleans(), batch=messages)
        def rogue(hello: bool, batch: list[bytes | str]) -> None:
            loop.run_until_complete(one_rogue(server, hello, batch))

        rogue()
        assert loop.run_until_complete(honest_request_works(server))
        names = [c.name for c in server.registry.clients()]
        assert names == ["honest"] or sorted(names) == ["honest", "rogue"]
    finally:
        loop.run_until_complete(stack.aclose())
        loop.close()
