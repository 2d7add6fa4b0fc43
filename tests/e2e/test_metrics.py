"""``GET /metrics`` on the control port: the exit server's Prometheus metrics, end to end."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import ClientProcess, ExitServerProcess, Upstream, scrape_metrics
from tests.support.processes import refused_setting
from tunnel.auth import generate_token, write_secret_file
from tunnel.version import __version__
from tunnel.websocket import SUBPROTOCOL

DURATION = "homeport_http_request_duration_seconds"


async def test_metrics_need_the_token_and_no_query(
    tunnel: tuple[ExitServerProcess, ClientProcess], token: str
) -> None:
    server, _ = tunnel
    url = f"http://127.0.0.1:{server.control_port}/metrics"
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            assert response.status == 401
            assert b"homeport_" not in await response.read()
        async with http.get(url, headers={"Authorization": "Bearer wrong-token-wrong"}) as response:
            assert response.status == 401
        headers = {"Authorization": f"Bearer {token}"}
        async with http.get(f"{url}?x=1", headers=headers) as response:
            assert response.status == 400
    metrics = await scrape_metrics(server, token)
    assert metrics["homeport_auth_failures_total", ""] == 2


async def test_requests_through_the_tunnel_are_counted_by_client_status_and_duration(
    tunnel: tuple[ExitServerProcess, ClientProcess], token: str
) -> None:
    server, _ = tunnel
    async with aiohttp.ClientSession() as http:
        for path in ["/"] * 4 + ["/status/404"] * 2 + ["/slow?seconds=0.3"]:
            async with http.get(f"{server.url}{path}") as response:
                await response.read()
        async with http.get(f"{server.url}/", headers={"Host": "no-such.example"}) as response:
            pass  # served by the default route all the same
    metrics = await scrape_metrics(server, token)
    assert metrics["homeport_http_requests_total", "client=pi,code=200"] == 6  # /, /slow, no-such
    assert metrics["homeport_http_requests_total", "client=pi,code=404"] == 2
    assert metrics[f"{DURATION}_count", "client=pi"] == 8
    assert metrics[f"{DURATION}_bucket", "client=pi,le=0.25"] == 7  # all but the slow one
    assert metrics[f"{DURATION}_bucket", "client=pi,le=1.0"] == 8
    assert metrics[f"{DURATION}_sum", "client=pi"] >= 0.3
    assert metrics["homeport_visitor_bytes_total", "client=pi,way=out"] > 5 * len(
        b"hello from upstream\n"
    )
    assert metrics["homeport_client_connections", "client=pi"] == 1
    assert metrics["homeport_requests_in_flight", ""] == 0
    assert metrics["homeport_build_info", f"version={__version__}"] == 1


async def test_gauges_follow_what_is_open_and_the_process_metrics_are_the_servers(
    tunnel: tuple[ExitServerProcess, ClientProcess], token: str
) -> None:
    server, _ = tunnel
    async with aiohttp.ClientSession() as http:
        slow = asyncio.create_task(http.get(f"{server.url}/slow?seconds=5"))
        try:
            deadline = asyncio.get_running_loop().time() + 10
            while (await scrape_metrics(server, token))["homeport_requests_in_flight", ""] != 1:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
            metrics = await scrape_metrics(server, token)
            assert metrics["homeport_visitor_connections", "kind=http"] == 1
            assert metrics["homeport_client_streams", "client=pi"] == 1
        finally:
            slow.cancel()
    resident = metrics["process_resident_memory_bytes", ""]
    assert abs(resident - server.process.rss_bytes()) < 4 * 1024 * 1024
    assert metrics["process_cpu_seconds_total", ""] > 0
    assert metrics["process_open_fds", ""] >= 4  # stdio, the listeners, the client's socket


async def test_a_metrics_token_reads_the_metrics_and_status_and_opens_no_tunnel(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
    token: str,
    tmp_path: Path,
) -> None:
    metrics_token = generate_token()
    metrics_file = tmp_path / "metrics-token"
    write_secret_file(metrics_file, metrics_token)
    server = start_server("--metrics-token-file", str(metrics_file))
    start_client(server, upstream.url)
    metrics = await scrape_metrics(server, metrics_token)
    assert metrics["homeport_client_connections", "client=pi"] == 1
    control = f"127.0.0.1:{server.control_port}"
    reader = {"Authorization": f"Bearer {metrics_token}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://{control}/status", headers=reader) as response:
            assert response.status == 200
            assert [c["name"] for c in (await response.json())["clients"]] == ["pi"]
        # As a client it is refused outright: not a failed login, a token for something else.
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await http.ws_connect(
                f"ws://{control}/connect", headers=reader, protocols=(SUBPROTOCOL,)
            )
        assert refused.value.status == 403
    server.process.wait_for(r"refused a tunnel from .*: its token is the metrics token")
    assert metrics_token not in server.process.output
    # The tunnel token still reads everything, and nothing was counted as a failed login.
    metrics = await scrape_metrics(server, token)
    assert metrics["homeport_auth_failures_total", ""] == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--metrics-token-hash", "12ab"), "is not 64 hex digits"),
        (
            ("--metrics-token-file", "{token_file}"),
            "the metrics token must not be the tunnel token",
        ),
        (("--metrics-token-file", "{missing}"), "cannot read"),
    ],
)
def test_a_bad_metrics_token_stops_the_server_with_a_message(
    token_file: Path, tmp_path: Path, flags: tuple[str, str], message: str
) -> None:
    value = flags[1].format(token_file=token_file, missing=tmp_path / "missing")
    assert message in refused_setting("server", "--token-file", str(token_file), flags[0], value)
