"""``GET /metrics`` on the control port: the exit server's Prometheus metrics, end to end."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.e2e.conftest import ClientProcess, ExitServerProcess, scrape_metrics
from tunnel.version import __version__

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
