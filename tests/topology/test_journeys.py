"""What a visitor does, across the simulated internet, to a Pi behind NAT."""

from __future__ import annotations

import base64
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support.waiting import wait_until_sync
from tests.topology.bed import PI_IP, PUBLIC_IP, WAN_IP, Namespace
from tests.topology.browser import Browser
from tests.topology.conftest import ARTIFACTS, Topology
from tests.topology.functions import BASIC_AUTH_PASSWORD, BASIC_AUTH_USER
from tests.topology.services import FUNCTIONS_PORT, LARGE_FILE, NGINX_PORT, curl

SITE_PATHS = ("/", "/style.css", "/app.js", "/logo.png", "/badge.svg")
#: the exit node's raw TCP port (it serves visitors on 80, clients on 8123)
TCP_PORT = 2222


def test_curl_on_the_visitor_gets_the_site_from_the_pi(topology: Topology) -> None:
    server = topology.start_server()
    topology.start_client(server)

    page = topology.visit("/")
    assert page.status == 200, page
    assert b'<h1 id="title">Served from the Pi</h1>' in page.body
    assert page.info["remote_ip"] == PUBLIC_IP

    logo = topology.visit("/logo.png")
    assert logo.status == 200
    assert logo.info["content_type"] == "image/png"
    assert logo.body == (topology.pi.site / "logo.png").read_bytes()


def test_a_browser_on_the_visitor_renders_the_page_with_everything_through_the_tunnel(
    topology: Topology, tmp_path: Path
) -> None:
    server = topology.start_server()
    topology.start_client(server)
    screenshot = ARTIFACTS / "visitor-browser.png"
    screenshot.unlink(missing_ok=True)

    with Browser(topology.bed.visitor, tmp_path / "profile", tmp_path / "chromium.log") as browser:
        page = browser.open(f"http://{PUBLIC_IP}/")
        page.wait_until(
            "document.readyState === 'complete' && document.body.dataset.state !== 'pending'",
            within=30,
        )
        page.screenshot(screenshot)
        rendered = page.evaluate(
            """JSON.stringify({
                state: document.body.dataset.state,
                title: document.getElementById("title").textContent,
                titleColor: getComputedStyle(document.getElementById("title")).color,
                fetched: document.getElementById("fetch-result").textContent,
                echoed: document.getElementById("ws-result").textContent,
                images: [...document.images].map(i => [i.id, i.complete, i.naturalWidth]),
            })"""
        )
        responses = page.network("Network.responseReceived")
        handshakes = page.network("Network.webSocketHandshakeResponseReceived")
        websockets = page.network("Network.webSocketCreated")

    wait_until_sync(lambda: not topology.bed.visitor.pids(), timeout=10)  # Chromium is gone
    dom = json.loads(rendered)
    assert dom["state"] == "ready", dom
    assert dom["title"] == "Served from the Pi"
    assert dom["titleColor"] == "rgb(10, 110, 60)"  # style.css was applied
    assert dom["fetched"] == "Hello, browser!"  # fetch() reached the function on the Pi
    assert dom["echoed"] == "echo: ping from the browser"  # and so did the WebSocket
    assert dom["images"] == [["logo", True, 64], ["badge", True, 160]]

    seen = {
        r["response"]["url"].removeprefix(f"http://{PUBLIC_IP}"): r["response"] for r in responses
    }
    for path in (*SITE_PATHS, "/function/hello"):
        assert seen[path]["status"] == 200, (path, seen[path]["status"])
        assert seen[path]["remoteIPAddress"] == PUBLIC_IP
    assert [w["url"] for w in websockets] == [f"ws://{PUBLIC_IP}/ws"]
    assert [h["response"]["status"] for h in handshakes] == [101]
    assert screenshot.stat().st_size > 1000


def test_the_lan_is_private_the_tunnel_is_the_only_way_in(topology: Topology) -> None:
    server = topology.start_server()
    topology.start_client(server)
    bed = topology.bed
    lan_urls = [f"http://{PI_IP}:{port}/" for port in (NGINX_PORT, FUNCTIONS_PORT)]
    wan_urls = [f"http://{WAN_IP}:{port}/" for port in (NGINX_PORT, FUNCTIONS_PORT)]

    def reach(namespace: Namespace, url: str) -> tuple[str, str, int, str]:
        answer = curl(namespace, url, "--connect-timeout", "3", max_time=5)
        return namespace.name, url, answer.status, answer.error

    probes = [(ns, url) for ns in (bed.exit, bed.visitor) for url in (*lan_urls, *wan_urls)]
    probes += [(ns, url) for ns in (bed.pi, bed.router) for url in lan_urls]
    with ThreadPoolExecutor(len(probes)) as pool:
        results = list(pool.map(lambda probe: reach(*probe), probes))

    for name, url, status, error in results:
        on_the_lan = name.endswith(("-pi", "-router"))
        if on_the_lan:
            assert status in (200, 404), f"{url} from {name} should answer on the LAN: {error}"
        else:
            assert status == 0, f"{url} answered {status} from {name}: the LAN is not private"
            assert error, f"{url} from {name}: no answer, and no error either"
    assert topology.visit("/").status == 200  # while the tunnel carries visitors in


def test_functions_are_invoked_through_the_tunnel_as_on_faasd(
    topology: Topology, tmp_path: Path
) -> None:
    server = topology.start_server()
    topology.start_client(server)
    functions = topology.pi.functions
    assert functions is not None

    hello = topology.visit("/function/hello", "--data-binary", "tunnel")
    assert (hello.status, hello.body) == (200, b"Hello, tunnel!")

    payload = tmp_path / "payload.bin"
    payload.write_bytes(bytes(range(256)) * 4096)  # 1 MiB
    digest = topology.visit("/function/sha256", "--data-binary", f"@{payload}")
    assert digest.status == 200
    assert json.loads(digest.body) == {
        "sha256": hashlib.sha256(payload.read_bytes()).hexdigest(),
        "size": payload.stat().st_size,
    }

    mark = functions.mark()
    queued = topology.visit("/async-function/hello", "--data-binary", "later", "-D", "-")
    assert queued.status == 202
    headers = queued.body.decode("latin-1").lower()
    call_id = headers.split("x-call-id:", 1)[1].split()[0]
    functions.wait_for(f"async hello call_id={call_id} done: Hello, later!", 10, mark)

    refused = topology.visit("/system/functions", "-D", "-")
    assert refused.status == 401
    assert b'www-authenticate: basic realm="restricted"' in refused.body.lower()
    credentials = base64.b64encode(f"{BASIC_AUTH_USER}:{BASIC_AUTH_PASSWORD}".encode()).decode()
    listed = topology.visit("/system/functions", "-H", f"Authorization: Basic {credentials}")
    assert listed.status == 200
    counts = {f["name"]: f["invocationCount"] for f in json.loads(listed.body)}
    assert counts["hello"] >= 2
    assert counts["sha256"] >= 1


def test_a_raw_tcp_port_reaches_the_pi_through_the_nat(topology: Topology) -> None:
    """``--tcp-port`` on the exit node, ``--tcp`` on the Pi: its nginx, spoken to over raw TCP.

    The exit server parses nothing on that port: curl's request and nginx's
    answer cross as bytes (the access log counts a connection, not a request).
    """
    server = topology.start_server("--tcp-port", str(TCP_PORT))
    topology.start_client(server, "--tcp", f"{TCP_PORT}=127.0.0.1:{NGINX_PORT}")

    page = curl(topology.bed.visitor, f"http://{PUBLIC_IP}:{TCP_PORT}/")
    assert page.status == 200, page
    assert b'<h1 id="title">Served from the Pi</h1>' in page.body
    large = curl(topology.bed.visitor, f"http://{PUBLIC_IP}:{TCP_PORT}/{LARGE_FILE}")
    assert large.status == 200, large
    assert hashlib.sha256(large.body).hexdigest() == topology.pi.large_file_sha256
    server.process.wait_for(rf'pi "TCP :{TCP_PORT}" host=- status=200 ')
    assert topology.visit("/").status == 200  # HTTP on port 80 beside it, as before
