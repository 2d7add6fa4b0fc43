"""The PROXY protocol on raw TCP ports (``client --proxy-protocol``), read by a real nginx.

nginx listens with ``proxy_protocol`` on, as a Pi's nginx or Caddy would
behind the tunnel, and answers each request with the address the header
named (``$proxy_protocol_addr:$proxy_protocol_port``) beside the one its
socket saw (``$remote_addr``, the client's, on the same machine). nginx
refuses a connection whose header is missing or malformed, so an answer
at all says the header was right.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.conftest import ClientProcess, ExitServerProcess, Processes
from tests.support.ports import free_port
from tests.support.processes import homeport

TIMEOUT_S = 20.0

NGINX_CONF = """\
daemon off;
master_process off;
pid {work}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen 127.0.0.1:{port} proxy_protocol;
        location / {{
            default_type text/plain;
            return 200 "visitor $proxy_protocol_addr:$proxy_protocol_port seen from $remote_addr\\n";
        }}
    }}
}}
"""


@pytest.fixture
def proxy_nginx(processes: Processes, tmp_path: Path) -> int:
    """nginx on 127.0.0.1, reading a PROXY protocol header on every connection: its port."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    config = tmp_path / "nginx.conf"
    config.write_text(NGINX_CONF.format(work=tmp_path, port=port))
    processes.start("nginx", [nginx, "-e", "stderr", "-p", str(tmp_path), "-c", str(config)])
    return port


async def get_through(port: int) -> tuple[str, int]:
    """GET / over a plain TCP connection to ``port``: the answer's body, and our own port."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        own_port = writer.get_extra_info("sockname")[1]
        writer.write(b"GET / HTTP/1.1\r\nHost: pi\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(TIMEOUT_S):
            answer = await reader.read()
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    return body.decode(), own_port


async def wait_serving(port: int) -> None:
    """nginx answers through the tunnel (it may still be starting)."""
    deadline = asyncio.get_running_loop().time() + TIMEOUT_S
    while True:
        try:
            await get_through(port)
            return
        except (OSError, AssertionError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_the_upstream_learns_the_visitors_address_and_port(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    proxy_nginx: int,
    version: str,
) -> None:
    port = free_port()
    server = start_server("--tcp-port", str(port))
    client = start_client(
        server,
        flags=("--tcp", f"{port}=127.0.0.1:{proxy_nginx}", "--proxy-protocol", f"{port}={version}"),
    )
    await wait_serving(port)
    body, own_port = await get_through(port)
    # The header named us, address and source port, not the client that dialled nginx.
    assert body == f"visitor 127.0.0.1:{own_port} seen from 127.0.0.1\n"
    assert f"TCP port {port} -> 127.0.0.1:{proxy_nginx} (PROXY protocol {version})" in (
        client.process.output
    )
    await server.process.wait_for_async(rf"serving TCP port {port} \(PROXY protocol {version}\)")


async def test_without_the_option_no_header_is_sent(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    proxy_nginx: int,
) -> None:
    """The same nginx, reached without --proxy-protocol, refuses: it wanted a header."""
    port = free_port()
    server = start_server("--tcp-port", str(port))
    start_client(server, flags=("--tcp", f"{port}=127.0.0.1:{proxy_nginx}"))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: pi\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(TIMEOUT_S):
            try:
                answer = await reader.read()
            except ConnectionResetError:
                answer = b""
    finally:
        writer.close()
    assert answer == b""  # nginx closed it: "broken header"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--tcp", "2222=127.0.0.1:22", "--proxy-protocol", "2222=v3"), "the version is v1 or v2"),
        (("--tcp", "2222=127.0.0.1:22", "--proxy-protocol", "2222"), "must be PORT=v1 or PORT=v2"),
        (("--tcp", "2222=127.0.0.1:22", "--proxy-protocol", "²=v1"), "must be PORT=v1 or PORT=v2"),
        (("--tcp", "2222=127.0.0.1:22", "--proxy-protocol", "2223=v1"), "which no --tcp serves"),
        (
            (
                "--tcp",
                "2222=127.0.0.1:22",
                "--proxy-protocol",
                "2222=v1",
                "--proxy-protocol",
                "2222=v2",
            ),
            "port 2222 is given twice",
        ),
        (("--tcp", "²=127.0.0.1:22"), "must be PUBLIC_PORT=ADDRESS:PORT"),
        (("--tcp", "9" * 5000 + "=127.0.0.1:22"), "must be PUBLIC_PORT=ADDRESS:PORT"),
    ],
)
def test_a_bad_proxy_protocol_flag_is_refused_with_a_clear_message(
    flags: tuple[str, ...], message: str
) -> None:
    result = subprocess.run(
        homeport("client", "--url", "ws://127.0.0.1:1", "--token", "t" * 43, *flags),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    assert result.returncode != 0, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
