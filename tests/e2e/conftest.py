"""Fixtures that start real homeport processes and a real upstream on 127.0.0.1."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import Process, homeport
from tunnel.auth import generate_token, write_secret_file

READY = r"exit server ready: visitors on http://127\.0\.0\.1:(\d+)/, clients on wss?://127\.0\.0\.1:(\d+)/connect"
CONNECTED = r"connected to wss?://\S+ as (\S+) \(session (\w+)\)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)


@dataclass
class Upstream:
    process: Process
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class ExitServerProcess:
    process: Process
    port: int
    control_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def control_url(self) -> str:
        return f"ws://127.0.0.1:{self.control_port}"


async def scrape_metrics(server: ExitServerProcess, token: str) -> dict[tuple[str, str], float]:
    """``GET /metrics`` with the token, read with prometheus_client's parser: every sample's
    value by its name and its labels written ``k=v,…`` in order (``""`` for none)."""
    url = f"http://127.0.0.1:{server.control_port}/metrics"
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = await response.text()
    return {
        (sample.name, ",".join(f"{k}={v}" for k, v in sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@dataclass
class ClientProcess:
    process: Process

    def wait_connected(self, timeout: float = 15.0, since: int = 0) -> str:
        """Wait for a session; return its id."""
        return self.process.wait_for(CONNECTED, timeout, since).group(2)


class Processes:
    """Everything a test started, ended at teardown by PID."""

    def __init__(self) -> None:
        self.started: list[Process] = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Process:
        process = Process(name, args, env).start()
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.started):
            process.stop(timeout=10)


@pytest.fixture
def processes() -> Iterator[Processes]:
    running = Processes()
    yield running
    running.stop_all()


@pytest.fixture
def token() -> str:
    return generate_token()


@pytest.fixture
def token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "token"
    write_secret_file(path, token)
    return path


@pytest.fixture
def start_upstream(processes: Processes) -> Callable[..., Upstream]:
    def start(name: str = "upstream") -> Upstream:
        process = processes.start(
            name, [sys.executable, "-m", "tests.support.upstream", "--name", name]
        )
        port = int(process.wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1))
        return Upstream(process, port)

    return start


@pytest.fixture
def upstream(start_upstream: Callable[..., Upstream]) -> Upstream:
    return start_upstream()


@pytest.fixture
def start_server(processes: Processes, token_file: Path) -> Callable[..., ExitServerProcess]:
    def start(
        *flags: str,
        port: int = 0,
        control_port: int = 0,
        token_path: Path | None = None,
        auth: tuple[str, ...] | None = None,
    ) -> ExitServerProcess:
        process = processes.start(
            "server",
            homeport(
                "server",
                "--bind", "127.0.0.1",
                "--port", str(port),
                "--control-port", str(control_port),
                *(auth if auth is not None else ("--token-file", str(token_path or token_file))),
                *flags,
            ),
        )  # fmt: skip
        match = process.wait_for(READY)
        return ExitServerProcess(process, int(match.group(1)), int(match.group(2)))

    return start


@pytest.fixture
def start_client(processes: Processes, token_file: Path) -> Callable[..., ClientProcess]:
    def start(
        server: ExitServerProcess,
        *upstreams: str,
        name: str = "pi",
        token_path: Path | None = None,
        flags: tuple[str, ...] = (),
        wait: bool = True,
        url: str | None = None,
    ) -> ClientProcess:
        args = [
            "client",
            "--url", url or server.control_url,
            "--token-file", str(token_path or token_file),
            "--name", name,
            "--reconnect-max-delay", "2",
            *flags,
        ]  # fmt: skip
        for spec in upstreams:
            args += ["--upstream", spec]
        client = ClientProcess(processes.start(f"client-{name}", homeport(*args)))
        if wait:
            client.wait_connected()
        return client

    return start


@pytest.fixture
def tunnel(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
) -> tuple[ExitServerProcess, ClientProcess]:
    """An exit server with one client serving the upstream on the default route."""
    server = start_server()
    client = start_client(server, upstream.url)
    return server, client
