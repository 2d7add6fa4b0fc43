"""The command line as a user meets it: real processes, exit codes and messages."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import READY, ClientProcess, ExitServerProcess, Processes, Upstream
from tests.support.ports import free_port
from tests.support.processes import homeport, run_homeport
from tunnel.auth import token_digest


def test_token_prints_a_fresh_256_bit_url_safe_token() -> None:
    first, second = run_homeport("token"), run_homeport("token")
    assert first.returncode == 0
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}\n", first.stdout)
    assert first.stdout != second.stdout


def test_token_output_file_is_created_0600_and_nothing_is_printed(tmp_path: Path) -> None:
    path = tmp_path / "token"
    result = run_homeport("token", "-o", str(path))
    assert result.returncode == 0
    assert result.stdout == ""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}\n", path.read_text())


def test_server_refuses_to_start_without_a_token() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOMEPORT_")}
    result = subprocess.run(
        homeport("server", "--port", "0", "--control-port", "0"),
        capture_output=True, text=True, timeout=30, env=env, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert "needs a token" in result.stderr
    assert "Traceback" not in result.stderr


def test_server_refuses_a_short_token_without_printing_it() -> None:
    result = run_homeport("server", "--port", "0", env={"HOMEPORT_TOKEN": "tooShort123"})
    assert result.returncode == 2
    assert "shorter than 16 characters" in result.stderr
    assert "tooShort123" not in result.stderr


EMPTY_CREDENTIALS = {
    "an empty --token": ("--token", None, ""),
    "an empty token file": ("--token-file", "token", ""),
    "a token file holding a line end": ("--token-file", "token", "\n"),
    "an empty --token-hash": ("--token-hash", None, ""),
    "an empty hash file": ("--token-hash-file", "token.sha256", ""),
}


@pytest.mark.parametrize("case", EMPTY_CREDENTIALS.values(), ids=EMPTY_CREDENTIALS.keys())
def test_the_server_refuses_to_start_with_an_empty_credential(
    tmp_path: Path, case: tuple[str, str | None, str]
) -> None:
    flag, file_name, content = case
    value = content
    if file_name is not None:
        path = tmp_path / file_name
        path.write_text(content)
        path.chmod(0o600)
        value = str(path)
    result = run_homeport("server", "--port", "0", "--control-port", "0", flag, value)
    assert result.returncode == 2
    assert "token" in result.stderr.lower()
    assert "Traceback" not in result.stderr


def test_token_and_token_file_on_the_command_line_conflict(token_file: Path, token: str) -> None:
    result = run_homeport("server", "--token", token, "--token-file", str(token_file))
    assert result.returncode == 2
    assert "give only one token source: --token or --token-file" in result.stderr
    assert token not in result.stderr + result.stdout


def test_an_unreadable_token_file_is_a_clear_error(tmp_path: Path) -> None:
    result = run_homeport("server", "--token-file", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert "cannot read the token file" in result.stderr


def test_settings_come_from_flags_over_environment_over_config_file(
    processes: Processes, token_file: Path, tmp_path: Path
) -> None:
    from_file, from_env, from_flag = free_port(), free_port(), free_port()
    config = tmp_path / "server.toml"
    config.write_text(
        f"port = {from_file}\n"
        f"control-port = {free_port()}\n"
        'bind = "127.0.0.1"\n'
        f'token-file = "{token_file}"\n'
    )
    server = processes.start("server", homeport("server", "--config", str(config)))
    assert int(server.wait_for(READY).group(1)) == from_file
    server.stop()

    server = processes.start(
        "server", homeport("server", "--config", str(config)), env={"HOMEPORT_PORT": str(from_env)}
    )
    assert int(server.wait_for(READY).group(1)) == from_env
    server.stop()

    server = processes.start(
        "server",
        homeport("server", "--config", str(config), "--port", str(from_flag)),
        env={"HOMEPORT_PORT": str(from_env)},
    )
    assert int(server.wait_for(READY).group(1)) == from_flag


def test_an_unknown_setting_in_the_config_file_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text("prot = 80\n")
    result = run_homeport("server", "--config", str(config))
    assert result.returncode == 2
    assert "unknown setting(s) prot" in result.stderr
    assert "valid settings:" in result.stderr


def test_a_config_file_that_is_not_toml_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text("port = = 80\n")
    result = run_homeport("server", "--config", str(config))
    assert result.returncode == 2
    assert "is not valid TOML" in result.stderr


def test_a_port_in_use_is_reported_plainly(token_file: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_homeport(
            "server", "--bind", "127.0.0.1", "--port", str(port), "--token-file", str(token_file)
        )
    assert result.returncode == 1
    assert "already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_exit_server_runs_on_one_thread(
    start_server: Callable[..., ExitServerProcess],
) -> None:
    """No resolver thread pool: the bind address is resolved before the loop runs."""
    server = start_server()
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    assert re.search(r"^Threads:\s+1$", status, re.MULTILINE), status


def test_client_refuses_plain_ws_to_a_remote_server(token_file: Path) -> None:
    result = run_homeport(
        "client", "--url", "ws://203.0.113.10:8123", "--token-file", str(token_file),
        "--upstream", "http://127.0.0.1:8080",
    )  # fmt: skip
    assert result.returncode == 2
    assert "refusing ws:// to a remote server" in result.stderr


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ftp://127.0.0.1:21", "must start with http://"),
        ("http://127.0.0.1:8080/path", "must not have a path"),
        ("bad host=http://127.0.0.1:8080", "not a valid host name"),
        ("http://127.0.0.1:99999", "not a valid URL"),
    ],
)
def test_client_explains_a_malformed_upstream(token_file: Path, spec: str, message: str) -> None:
    result = run_homeport(
        "client",
        "--url",
        "ws://127.0.0.1:8123",
        "--token-file",
        str(token_file),
        "--upstream",
        spec,
    )
    assert result.returncode == 2
    assert message in result.stderr


def test_client_needs_at_least_one_upstream(token_file: Path) -> None:
    result = run_homeport("client", "--url", "ws://127.0.0.1:8123", "--token-file", str(token_file))
    assert result.returncode == 2
    assert "give at least one --upstream" in result.stderr


def test_help_documents_every_option_with_its_environment_variable() -> None:
    for command in ("server", "client"):
        result = run_homeport(command, "--help")
        assert result.returncode == 0
        text = " ".join(result.stdout.split())
        options = set(re.findall(r"^\s+(--[a-z-]+)", result.stdout, re.M)) - {"--help"}
        assert len(options) > 8
        for option in options:
            name = option[2:].removeprefix("no-").upper().replace("-", "_")
            assert f"HOMEPORT_{name}" in text, option


async def test_the_demo_serves_its_page_and_stops_cleanly_on_ctrl_c(processes: Processes) -> None:
    demo = processes.start("demo", homeport("demo", "--port", "0"))
    url = (await demo.wait_for_async(r"Open (http://127\.0\.0\.1:\d+/)")).group(1)
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        assert "came through the homeport tunnel" in await response.text()
    demo.send_signal(signal.SIGINT)
    assert await demo.wait_async(15) == 0
    assert "Traceback" not in demo.output


async def test_server_and_client_tell_systemd_they_are_ready_and_ping_its_watchdog(
    processes: Processes, token_file: Path, upstream: Upstream, tmp_path: Path
) -> None:
    """What Type=notify and WatchdogSec=30 in deploy/civo-exit-node's units rely on."""
    loop = asyncio.get_running_loop()
    sockets = {}
    for who in ("server", "client"):
        sockets[who] = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sockets[who].bind(str(tmp_path / f"{who}.notify"))
        sockets[who].setblocking(False)

    def systemd(who: str) -> dict[str, str]:  # WATCHDOG_PID unset: any process may ping
        return {"NOTIFY_SOCKET": str(tmp_path / f"{who}.notify"), "WATCHDOG_USEC": "400000"}

    async def next_message(who: str) -> bytes:
        async with asyncio.timeout(10):
            return await loop.sock_recv(sockets[who], 4096)

    try:
        server = processes.start(
            "server",
            homeport("server", "--bind", "127.0.0.1", "--port", "0", "--control-port", "0",
                     "--token-file", str(token_file)),
            env=systemd("server"),
        )  # fmt: skip
        assert await next_message("server") == b"READY=1"  # sent once its ports are bound
        control_port = server.wait_for(READY).group(2)
        client = processes.start(
            "client",
            homeport("client", "--url", f"ws://127.0.0.1:{control_port}",
                     "--token-file", str(token_file), "--upstream", upstream.url),
            env=systemd("client"),
        )  # fmt: skip
        assert await next_message("client") == b"READY=1"
        for who in ("server", "client"):
            assert {await next_message(who) for _ in range(3)} == {b"WATCHDOG=1"}
        server.send_signal(signal.SIGTERM)
        while (message := await next_message("server")) == b"WATCHDOG=1":
            pass
        assert message == b"STOPPING=1"
        assert await server.wait_async(15) == 0
        client.send_signal(signal.SIGTERM)
        while (message := await next_message("client")) == b"WATCHDOG=1":
            pass
        assert message == b"STOPPING=1"
        assert await client.wait_async(15) == 0
    finally:
        for listener in sockets.values():
            listener.close()


def test_python_dash_m_homeport_is_the_same_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "homeport", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    assert result.stdout.startswith("homeport, version ")


async def test_a_full_session_at_debug_level_never_logs_the_token(
    start_server: Callable[..., ExitServerProcess],
    start_client: Callable[..., ClientProcess],
    upstream: Upstream,
    token: str,
) -> None:
    server = start_server("--log-level", "debug")
    client = start_client(server, upstream.url, flags=("--log-level", "debug"))
    async with aiohttp.ClientSession() as http:
        async with http.get(
            f"{server.url}/echo", headers={"Authorization": f"Bearer {token}"}
        ) as response:
            assert response.status == 200
        bad = f"http://127.0.0.1:{server.control_port}/connect?token={token}"
        async with http.get(bad) as response:
            assert response.status == 400
        async with http.get(
            f"http://127.0.0.1:{server.control_port}/status",
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            assert response.status == 200
    client.process.stop()
    server.process.stop()
    for output in (server.process.output, client.process.output):
        assert "DEBUG" in output
        assert token not in output
        assert token_digest(token).hex() not in output


def test_config_keys_are_the_long_option_names_even_for_repeated_options(
    tmp_path: Path, token_file: Path
) -> None:
    config = tmp_path / "client.toml"
    config.write_text(
        'url = "ws://203.0.113.10:8123"\n'
        f'token-file = "{token_file}"\n'
        'upstream = ["http://127.0.0.1:8080", "fn.example.com=http://127.0.0.1:8081"]\n'
        'allow-path = ["default=/function/"]\n'
    )
    result = run_homeport("client", "--config", str(config))
    # Everything was understood: what stops it is only the remote ws:// URL.
    assert result.returncode == 2
    assert "refusing ws:// to a remote server" in result.stderr
    config.write_text('upstreams = ["http://127.0.0.1:8080"]\n')
    result = run_homeport("client", "--config", str(config))
    assert "unknown setting(s) upstreams" in result.stderr
