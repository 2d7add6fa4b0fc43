"""Through the tunnel as directly: the same bytes, the same answer (issue 3).

Each case is a raw request sent twice, once straight to the upstream and once
through the exit server, with the same ``Host``. Both answers must agree in
status, end-to-end headers (names, case, order, repeats, values) and body;
and where the upstream reports what it received (``/inspect``), it must have
received the same request, except what a proxy must change: hop-by-hop
headers and ``X-Forwarded-*``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.e2e.conftest import CONNECTED, READY, Processes
from tests.support.processes import homeport
from tests.support.rawhttp import RawResponse, request
from tunnel.auth import generate_token, write_secret_file

HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"te",
    b"trailer",
    b"upgrade",
    b"proxy-connection",
}
VOLATILE = {b"date"}
BINARY = bytes(range(256)) * 40


@dataclass(frozen=True)
class Setup:
    upstream_port: int
    tunnel_port: int


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    processes = Processes()
    token_file = tmp_path_factory.mktemp("conformance") / "token"
    write_secret_file(token_file, generate_token())
    try:
        upstream = processes.start("upstream", [sys.executable, "-m", "tests.support.upstream"])
        upstream_port = int(upstream.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        server = processes.start(
            "server",
            homeport("server", "--bind", "127.0.0.1", "--port", "0", "--control-port", "0",
                     "--token-file", str(token_file)),
        )  # fmt: skip
        ready = server.wait_for(READY)
        client = processes.start(
            "client",
            homeport("client", "--url", f"ws://127.0.0.1:{ready.group(2)}", "--token-file", str(token_file),
                     "--upstream", f"http://127.0.0.1:{upstream_port}", "--name", "conformance"),
        )  # fmt: skip
        client.wait_for(CONNECTED)
        yield Setup(upstream_port, int(ready.group(1)))
    finally:
        processes.stop_all()


@dataclass(frozen=True)
class Case:
    name: str
    raw: bytes
    head_only: bool = False
    body_after_continue: bytes | None = None


def req(head: str, body: bytes = b"") -> bytes:
    return head.replace("\n", "\r\n").encode("latin-1") + b"\r\n" + body


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


CASES = [
    Case("GET", req("GET /inspect HTTP/1.1\nHost: app.example\n")),
    Case(
        "raw target kept byte for byte",
        req(
            "GET /inspect/a%2Fb%20c/%7Euser/%2e%2e/x?q=1&q=2&q=%2F&empty=&flag HTTP/1.1\nHost: app.example\n"
        ),
    ),
    Case(
        "repeated request headers stay separate and in order",
        req(
            "GET /inspect HTTP/1.1\nHost: app.example\nX-Foo: 1\nx-foo: 2\nX-FOO: three, four\nAccept: */*\n"
        ),
    ),
    Case(
        "Authorization and cookies pass as they are",
        req(
            "GET /inspect HTTP/1.1\nHost: app.example\nAuthorization: Basic YWRtaW46c2VjcmV0\n"
            "Cookie: a=1; b=2\nCookie: c=3\n"
        ),
    ),
    Case(
        "header values exact (spaces, obs-text)",
        req("GET /inspect HTTP/1.1\nHost: app.example\nX-Odd: a  b\t c é\n"),
    ),
    Case(
        "POST with a binary body",
        req(f"POST /inspect HTTP/1.1\nHost: app.example\nContent-Length: {len(BINARY)}\n", BINARY),
    ),
    Case("PUT", req("PUT /inspect HTTP/1.1\nHost: app.example\nContent-Length: 5\n", b"hello")),
    Case(
        "PATCH",
        req(
            "PATCH /inspect HTTP/1.1\nHost: app.example\nContent-Type: application/json\nContent-Length: 8\n",
            b'{"a": 1}',
        ),
    ),
    Case("DELETE", req("DELETE /inspect?id=7 HTTP/1.1\nHost: app.example\n")),
    Case(
        "OPTIONS",
        req("OPTIONS /inspect HTTP/1.1\nHost: app.example\nOrigin: https://other.example\n"),
    ),
    Case("an unknown method", req("PURGE /inspect HTTP/1.1\nHost: app.example\n")),
    Case(
        "chunked request body",
        req(
            "POST /inspect HTTP/1.1\nHost: app.example\nTransfer-Encoding: chunked\n",
            chunked(b"abc", BINARY, b"z"),
        ),
    ),
    Case("HTTP/1.0 request", req("GET /inspect HTTP/1.0\nHost: app.example\n")),
    Case("HTTP/1.0 without Host", req("GET / HTTP/1.0\n")),
    Case(
        "Expect: 100-continue upload",
        req(
            "POST /inspect HTTP/1.1\nHost: app.example\nExpect: 100-continue\nContent-Length: 11\n"
        ),
        body_after_continue=b"after a 100",
    ),
    Case(
        "HEAD keeps the length and sends no body",
        req("HEAD /files/data.bin HTTP/1.1\nHost: app.example\n"),
        head_only=True,
    ),
    Case("204 has no body", req("GET /status/204 HTTP/1.1\nHost: app.example\n")),
    Case(
        "304 for a conditional GET",
        req(
            "GET /files/data.bin HTTP/1.1\nHost: app.example\nIf-Modified-Since: Fri, 01 Jan 2100 00:00:00 GMT\n"
        ),
    ),
    Case(
        "Range request gets 206",
        req("GET /files/data.bin HTTP/1.1\nHost: app.example\nRange: bytes=1000-1999\n"),
    ),
    Case(
        "open-ended Range",
        req("GET /files/data.bin HTTP/1.1\nHost: app.example\nRange: bytes=-500\n"),
    ),
    Case(
        "unsatisfiable Range gets 416",
        req("GET /files/data.bin HTTP/1.1\nHost: app.example\nRange: bytes=999999-\n"),
    ),
    Case("whole file", req("GET /files/data.bin HTTP/1.1\nHost: app.example\n")),
    Case(
        "gzip passes through undecoded",
        req("GET /gzip HTTP/1.1\nHost: app.example\nAccept-Encoding: gzip, br\n"),
    ),
    Case(
        "br passes through undecoded",
        req("GET /br HTTP/1.1\nHost: app.example\nAccept-Encoding: br\n"),
    ),
    Case("two Set-Cookie and two X-Foo", req("GET /cookies HTTP/1.1\nHost: app.example\n")),
    Case("chunked response", req("GET /chunked?n=50 HTTP/1.1\nHost: app.example\n")),
    Case("404 from the upstream", req("GET /no/such/page HTTP/1.1\nHost: app.example\n")),
    Case("500 from the upstream", req("GET /status/500 HTTP/1.1\nHost: app.example\n")),
    Case("503 from the upstream is not ours", req("GET /status/503 HTTP/1.1\nHost: app.example\n")),
    Case("301 with its Location", req("GET /files HTTP/1.1\nHost: app.example\n")),
    Case(
        "faasd-style basic auth refused", req("GET /system/functions HTTP/1.1\nHost: app.example\n")
    ),
    Case(
        "faasd-style basic auth accepted",
        req(
            "GET /system/functions HTTP/1.1\nHost: app.example\nAuthorization: Basic YWRtaW46c2VjcmV0\n"
        ),
    ),
    Case(
        "a long query string",
        req(f"GET /inspect?{'k=v&' * 1500}end=1 HTTP/1.1\nHost: app.example\n"),
    ),
]


def end_to_end(response: RawResponse, *, inspect: bool) -> list[tuple[bytes, bytes]]:
    """The response's headers a proxy must not change, in order."""
    ignored = HOP_BY_HOP | VOLATILE | ({b"content-length"} if inspect else set())
    return [(name, value) for name, value in response.headers if name.lower() not in ignored]


def upstream_view(response: RawResponse) -> dict:
    """What /inspect says the upstream received, minus what a proxy must change."""
    seen = json.loads(response.body)
    seen["headers"] = [
        [name, value]
        for name, value in seen["headers"]
        if name.lower().encode() not in HOP_BY_HOP and not name.lower().startswith("x-forwarded-")
    ]
    seen.pop("version")  # the exit server always speaks HTTP/1.1 to upstreams
    return seen


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_the_tunnel_answers_as_the_upstream_does(setup: Setup, case: Case) -> None:
    options = {"head_only": case.head_only, "body_after_continue": case.body_after_continue}
    direct = await request("127.0.0.1", setup.upstream_port, case.raw, **options)  # type: ignore[arg-type]
    tunnelled = await request("127.0.0.1", setup.tunnel_port, case.raw, **options)  # type: ignore[arg-type]

    assert tunnelled.status == direct.status
    assert tunnelled.reason == direct.reason
    assert tunnelled.complete
    assert direct.complete
    assert tunnelled.informational == direct.informational
    inspect = (
        direct.header("Content-Type") == b"application/json; charset=utf-8"
        and b"raw_path" in direct.body
    )
    assert end_to_end(tunnelled, inspect=inspect) == end_to_end(direct, inspect=inspect)
    if inspect:
        assert upstream_view(tunnelled) == upstream_view(direct)
    else:
        assert tunnelled.body == direct.body
    if direct.header("Content-Length") is not None and not inspect:
        assert tunnelled.header("Content-Length") == direct.header("Content-Length")
    assert tunnelled.chunked == direct.chunked


async def test_the_upstream_sees_forwarding_headers_replaced(setup: Setup) -> None:
    raw = req(
        "GET /inspect HTTP/1.1\nHost: App.Example:8080\nX-Forwarded-For: 10.9.9.9\nX-Real-IP: 10.9.9.9\nForwarded: for=10.9.9.9\n"
    )
    seen = json.loads((await request("127.0.0.1", setup.tunnel_port, raw)).body)
    headers = [(name.lower(), value) for name, value in seen["headers"]]
    assert ("x-forwarded-for", "127.0.0.1") in headers
    assert ("x-forwarded-proto", "http") in headers
    assert ("x-forwarded-host", "App.Example:8080") in headers
    assert ("host", "App.Example:8080") in headers
    assert not any(value == "10.9.9.9" or "10.9.9.9" in value for _, value in headers)
