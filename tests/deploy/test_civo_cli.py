"""``homeport exit-node`` against the fake Civo API, as a user runs it (real processes).

The whole story runs offline: ``create`` talks to the fake API; the fake
"boots" the VM by running the very bootstrap script it was sent against a
scratch root and starting the installed unit's command line (a real
``homeport server`` with the TLS key and token hash the script wrote), and
reports 127.0.0.1 as the public IP; so ``create``'s readiness check and
certificate pinning are real. Then the printed Pi command runs
install-client.sh into another scratch root, the installed client unit
starts, and a request to the public port reaches an upstream through the
tunnel. ``list`` and ``delete`` finish the story.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shlex
import ssl
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from server.certificates import store_dir
from tests.deploy.fakecivo import FakeCivo
from tests.deploy.helpers import (
    ROOT,
    FakeBin,
    parse_env_file,
    reload_unit,
    require,
    run_script,
    start_unit,
)
from tests.e2e.conftest import Processes
from tests.support.pebble import Pebble, start_pebble
from tests.support.ports import free_port
from tests.support.processes import Process
from tests.support.tcp_upstream import GREETING

pytestmark = pytest.mark.e2e  # real processes on 127.0.0.1

GOLDEN = Path(__file__).parent / "golden" / "create-dry-run.txt"
NAME = "pi-exit"


async def homeport(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run ``homeport ARGS`` as a user would; return its exit status, stdout and stderr."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("CIVO_", "HOMEPORT_"))}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "homeport",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**environment, **(env or {})},
        cwd=ROOT,
    )
    async with asyncio.timeout(100):
        out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def cli_env(fake: FakeCivo, config_dir: Path, key: str | None = None) -> dict[str, str]:
    return {
        "CIVO_TOKEN": fake.api_key if key is None else key,
        "CIVO_API_URL": fake.url,
        "HOMEPORT_CONFIG_DIR": str(config_dir),
    }


FAST = ("--poll-interval", "0.05")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    """A LAN service on the 'Pi'."""

    async def hello(_request: web.Request) -> web.Response:
        return web.Response(text="hello from the pi")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


@pytest.fixture
def started() -> Iterator[list[Process]]:
    processes: list[Process] = []
    yield processes
    for process in reversed(processes):
        process.stop(timeout=10)


@pytest.fixture
def tcp_upstream(started: list[Process]) -> str:
    """A raw TCP service on the 'Pi' (it greets, echoes, and sums up on the half-close)."""
    process = Process("tcp-upstream", [sys.executable, "-m", "tests.support.tcp_upstream"])
    started.append(process.start())
    return process.wait_for(r"tcp upstream listening on (127\.0\.0\.1:\d+)").group(1)


async def test_create_install_on_the_pi_browse_list_and_delete(
    tmp_path: Path,
    fake_civo: FakeCivo,
    fakebin: FakeBin,
    upstream: str,
    tcp_upstream: str,
    started: list[Process],
) -> None:
    public_port, control_port, tcp_port = free_port(), free_port(), free_port()
    vm_root, pi_root, config_dir = tmp_path / "vm", tmp_path / "pi", tmp_path / "config"
    vm_root.mkdir()
    pi_root.mkdir()

    async def boot(instance: dict[str, Any]) -> None:
        """The VM's first boot: run the script Civo was given, then start the unit."""
        script = tmp_path / "civo-script.sh"
        script.write_text(instance["script"])
        result = await asyncio.to_thread(run_script, script, vm_root, fakebin)
        assert result.returncode == 0, result.stderr
        started.append(
            start_unit(vm_root, "homeport-exit.service", tmp_path, HOMEPORT_BIND="127.0.0.1")
        )

    fake_civo.on_instance_created = boot
    fake_civo.public_ip = "127.0.0.1"

    code, out, err = await homeport(
        "exit-node",
        "create",
        *("--name", NAME, "--port", str(public_port), "--control-port", str(control_port)),
        *("--tcp-port", str(tcp_port), "--allow-ssh-from", "198.51.100.7"),
        *("--timeout", "60", *FAST),
        env=cli_env(fake_civo, config_dir),
    )

    assert code == 0, err
    assert f"exit node {NAME} is ready: visitors on http://127.0.0.1:{public_port}/" in out
    assert f"raw TCP port {tcp_port} on 127.0.0.1" in out
    assert f"add --tcp PORT=ADDRESS:PORT for each before the &&, e.g. --tcp {tcp_port}=" in out
    folder = config_dir / "exit-nodes" / NAME
    token = (folder / "token").read_text().strip()
    assert stat.S_IMODE((folder / "token").stat().st_mode) == 0o600
    assert token not in out + err
    assert fake_civo.api_key not in out + err
    # The firewall opens the three ports to all, SSH to one address, nothing else in.
    (firewall,) = fake_civo.firewalls.values()
    ingress = {
        (r["start_port"], tuple(r["cidr"]))
        for r in firewall["rules"]
        if r["direction"] == "ingress"
    }
    assert ingress == {
        (str(public_port), ("0.0.0.0/0",)),
        (str(control_port), ("0.0.0.0/0",)),
        (str(tcp_port), ("0.0.0.0/0",)),
        ("22", ("198.51.100.7/32",)),
    }
    exit_env = parse_env_file(vm_root / "etc/homeport/exit.env")
    assert exit_env["HOMEPORT_TCP_PORT"] == str(tcp_port)

    # On the Pi: the printed command, with the token and installer copied next to it.
    (pi_line,) = [line for line in out.splitlines() if "sudo bash install-client.sh" in line]
    pi_args = shlex.split(pi_line.split("&&")[0])[3:]
    pi_args[pi_args.index("--token-file") + 1] = str(folder / "token")
    pi_args[pi_args.index("--upstream") + 1] = upstream
    pi_args += ["--tcp", f"{tcp_port}={tcp_upstream}"]
    installed = await asyncio.to_thread(
        run_script, folder / "install-client.sh", pi_root, fakebin, *pi_args
    )
    assert installed.returncode == 0, installed.stderr
    client = start_unit(pi_root, "homeport-client.service", tmp_path)
    started.append(client)
    await client.wait_for_async(r"connected to wss://127\.0\.0\.1", within=30)

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{public_port}/") as response,
    ):
        assert response.status == 200
        assert await response.text() == "hello from the pi"
    # The raw TCP port, through the same tunnel: greeted, echoed, summed up at the half-close.
    reader, writer = await asyncio.open_connection("127.0.0.1", tcp_port)
    try:
        writer.write(b"ping")
        writer.write_eof()
        async with asyncio.timeout(30):
            answer = await reader.read()
    finally:
        writer.close()
    assert answer == GREETING + b"ping" + f"got 4 bytes, sha256 {sha256(b'ping')}\n".encode()

    code, out, err = await homeport("exit-node", "list", env=cli_env(fake_civo, config_dir))
    assert code == 0, err
    (row,) = [line for line in out.splitlines() if line.startswith(NAME)]
    assert row.split()[2:4] == ["ACTIVE", "127.0.0.1"]
    assert f"homeport-{NAME}" in row

    code, out, err = await homeport(
        "exit-node", "delete", NAME, *FAST, env=cli_env(fake_civo, config_dir)
    )
    assert code == 0, err
    assert fake_civo.instances == {}
    assert fake_civo.firewalls == {}
    assert not folder.exists()


@pytest.fixture
def pebble_port() -> int:
    """The VM's port 80 in these tests: where Pebble looks for the HTTP-01 answers."""
    return free_port()


@pytest.fixture
def pebble(tmp_path: Path, pebble_port: int) -> Iterator[Pebble]:
    """Let's Encrypt's test CA (Pebble), validating for real on ``pebble_port``."""
    processes = Processes()
    try:
        yield start_pebble(processes, tmp_path / "pebble", pebble_port)
    finally:
        processes.stop_all()


async def https_status(port: int, name: str, root_pem: str) -> tuple[str, list[str]]:
    """A visitor's GET over HTTPS, trusting only ``root_pem``: the status line, the cert's names."""
    context = ssl.create_default_context(cadata=root_pem)
    async with asyncio.timeout(30):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname=name
        )
        try:
            writer.write(f"GET / HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n".encode())
            status = (await reader.readline()).decode().strip()
            cert = writer.get_extra_info("peercert")
        finally:
            writer.close()
    return status, [value for kind, value in cert["subjectAltName"] if kind == "DNS"]


async def http_answer(port: int, name: str, target: str) -> tuple[str, str | None]:
    """A visitor's plain HTTP GET: the status line and the Location header, if any."""
    async with asyncio.timeout(30):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            request = f"GET {target} HTTP/1.1\r\nHost: {name}\r\nConnection: close\r\n\r\n"
            writer.write(request.encode())
            head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
        finally:
            writer.close()
    fields = dict(line.split(": ", 1) for line in head[1:] if line)
    return head[0], fields.get("Location")


@pytest.mark.parametrize("redirect", [False, True], ids=["http-served", "http-redirected"])
async def test_create_with_letsencrypt_serves_visitors_over_https(
    tmp_path: Path,
    fake_civo: FakeCivo,
    fakebin: FakeBin,
    pebble: Pebble,
    pebble_port: int,
    started: list[Process],
    redirect: bool,
) -> None:
    control_port, https_port = free_port(), free_port()
    vm_root, config_dir = tmp_path / "vm", tmp_path / "config"
    vm_root.mkdir()
    names = ("fn.homeport.test", "www.homeport.test")

    async def boot(instance: dict[str, Any]) -> None:
        """First boot as on Civo; but here the VM's port 80 is pebble_port, its 443 a free
        port, and its Let's Encrypt is Pebble (the other settings are the script's)."""
        script = tmp_path / "civo-script.sh"
        script.write_text(instance["script"])
        result = await asyncio.to_thread(run_script, script, vm_root, fakebin)
        assert result.returncode == 0, result.stderr
        env_file = vm_root / "etc/homeport/exit.env"
        env = env_file.read_text()
        assert "HOMEPORT_PORT=80\n" in env
        env_file.write_text(env.replace("HOMEPORT_PORT=80\n", f"HOMEPORT_PORT={pebble_port}\n"))
        started.append(
            start_unit(
                vm_root,
                "homeport-exit.service",
                tmp_path,
                HOMEPORT_BIND="127.0.0.1",
                HOMEPORT_HTTPS_PORT=str(https_port),
                HOMEPORT_ACME_DIRECTORY=pebble.directory,
                HOMEPORT_ACME_CA_FILE=str(pebble.ca_file),
            )
        )

    fake_civo.on_instance_created = boot
    fake_civo.public_ip = "127.0.0.1"

    code, out, err = await homeport(
        "exit-node",
        "create",
        *("--name", NAME, "--control-port", str(control_port)),
        *("--letsencrypt-domain", "FN.homeport.test.", "--letsencrypt-domain", names[1]),
        *("--letsencrypt-email", "owner@homeport.test", "--timeout", "60", *FAST),
        *(["--https-redirect"] if redirect else []),
        env=cli_env(fake_civo, config_dir),
    )

    assert code == 0, err
    assert f"point the DNS A record of {', '.join(names)} at 127.0.0.1 now" in err
    said = " ".join(out.split())
    assert "HTTPS: https://fn.homeport.test/, https://www.homeport.test/ with a cert" in said
    assert f"once the DNS A record of {', '.join(names)} is 127.0.0.1." in said
    assert ("Plain HTTP is answered with a redirect (308)" in said) is redirect
    if redirect:  # http://127.0.0.1/ would lead to https://127.0.0.1/, which no cert names
        assert "Then browse https://fn.homeport.test/\n" in out
    else:
        assert "Then browse https://fn.homeport.test/ (or http://127.0.0.1/)" in out
    (firewall,) = fake_civo.firewalls.values()
    assert {r["start_port"] for r in firewall["rules"] if r["direction"] == "ingress"} == {
        "80",
        "443",
        str(control_port),
    }
    exit_env = parse_env_file(vm_root / "etc/homeport/exit.env")
    assert exit_env["HOMEPORT_LETSENCRYPT_DOMAIN"] == " ".join(names)
    assert exit_env["HOMEPORT_LETSENCRYPT_EMAIL"] == "owner@homeport.test"
    assert exit_env["HOMEPORT_LETSENCRYPT_ISSUER"] == "production"
    assert exit_env["HOMEPORT_HTTPS_REDIRECT"] == ("true" if redirect else "")
    record = json.loads((config_dir / "exit-nodes" / NAME / "node.json").read_text())
    assert record["letsencrypt_domains"] == list(names)
    assert record["https_redirect"] is redirect

    # The exit server got its certificate, answering the HTTP-01 challenges on
    # "port 80" (redirect or not: they are excepted), and keeps it in the unit's
    # StateDirectory.
    (server,) = started
    await server.wait_for_async(r"HTTPS certificate \(new\) for fn\.homeport\.test", within=60)
    state = vm_root / "var/lib/homeport"
    assert (store_dir(state, pebble.directory) / "cert.pem").is_file()
    # A visitor over HTTPS, trusting only the CA's root: no Pi yet, so the exit server's 503.
    root_pem = await asyncio.to_thread(pebble.root_pem)
    status, sans = await https_status(https_port, names[1], root_pem)
    assert status.startswith("HTTP/1.1 503")
    assert sorted(sans) == sorted(names)
    # A visitor over plain HTTP: sent to the same URL over HTTPS, or served (503, no Pi).
    status, location = await http_answer(pebble_port, names[0], "/function/x?a=1")
    if redirect:
        assert status.startswith("HTTP/1.1 308")
        assert location == f"https://{names[0]}:{https_port}/function/x?a=1"
    else:
        assert status.startswith("HTTP/1.1 503")
        assert location is None

    # `systemctl reload homeport-exit`: the server takes the SIGHUP and goes on serving.
    await asyncio.to_thread(reload_unit, vm_root, "homeport-exit.service", server)
    status, _ = await https_status(https_port, names[0], root_pem)
    assert status.startswith("HTTP/1.1 503")
    assert server.popen is not None
    assert server.popen.poll() is None

    code, out, err = await homeport("exit-node", "list", env=cli_env(fake_civo, config_dir))
    assert code == 0, err
    header, row = out.splitlines()
    assert header.split()[:6] == ["NAME", "REGION", "STATUS", "PUBLIC", "IP", "HTTPS"]
    assert row.split()[2:5] == [
        "ACTIVE",
        "127.0.0.1",
        "https://fn.homeport.test/,https://www.homeport.test/",
    ]
    assert ("https://www.homeport.test/ (http redirected)  " in row) is redirect


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("create", ["--letsencrypt-domain", "*.example.com"], "a wildcard needs a DNS-01"),
        ("userdata", ["--letsencrypt-domain", "*.example.com"], "a wildcard needs a DNS-01"),
        ("create", ["--letsencrypt-domain", "203.0.113.7"], "certifies names, not IP addresses"),
        ("userdata", ["--letsencrypt-domain", "203.0.113.7"], "certifies names, not IP"),
        (
            "create",
            ["--letsencrypt-domain", "fn.example.com", "--letsencrypt-email", "you at example"],
            "--letsencrypt-email 'you at example' is not an email address",
        ),
        (
            "create",
            ["--letsencrypt-domain", "fn.example.com", "--letsencrypt-email", "y'$(id)'@a.com"],
            "an exit node takes letters, digits and ._+- before the @",
        ),
        (
            "create",
            ["--letsencrypt-domain", "fn.example.com", "--port", "8080"],
            "--letsencrypt-domain needs --port 80, not 8080",
        ),
        (
            "userdata",
            ["--letsencrypt-domain", "fn.example.com", "--port", "8080"],
            "--letsencrypt-domain needs --port 80, not 8080",
        ),
        (
            "create",
            ["--letsencrypt-domain", "fn.example.com", "--tcp-port", "443"],
            "--tcp-port 443 is the HTTPS port of --letsencrypt-domain already",
        ),
        (
            "create",
            ["--letsencrypt-email", "you@example.com"],
            "--letsencrypt-email goes with --letsencrypt-domain",
        ),
        (
            "create",
            ["--letsencrypt-domain", "fn.example.com", "--letsencrypt-issuer", "prod"],
            "Invalid value for '--letsencrypt-issuer': 'prod' is not one of",
        ),
        ("create", ["--https-redirect"], "--https-redirect goes with --letsencrypt-domain"),
        ("userdata", ["--https-redirect"], "--https-redirect goes with --letsencrypt-domain"),
        (
            "create",
            ["--https-redirect", "--letsencrypt-email", "you@example.com"],
            "--letsencrypt-email goes with --letsencrypt-domain",
        ),
        (
            "create",
            ["--https-redirect=yes", "--letsencrypt-domain", "fn.example.com"],
            "Option '--https-redirect' does not take a value",
        ),
    ],
)
async def test_bad_https_settings_are_refused_before_anything_is_created(
    tmp_path: Path, fake_civo: FakeCivo, command: str, args: list[str], message: str
) -> None:
    output = tmp_path / "user-data.yaml"
    if command == "userdata":
        args = [*args, "-o", str(output)]

    code, out, err = await homeport(
        "exit-node", command, *args, env=cli_env(fake_civo, tmp_path / "config")
    )

    assert code in (1, 2), out
    assert message in err
    assert "Traceback" not in err
    assert fake_civo.calls == []
    assert not (tmp_path / "config").exists()
    assert not output.exists()


async def test_dry_run_with_letsencrypt_shows_port_443_opened(tmp_path: Path) -> None:
    code, out, err = await homeport(
        "exit-node",
        "create",
        *("--dry-run", "--letsencrypt-domain", "fn.example.com"),
        *("--api-url", "https://api.civo.com", "--package", "homeport==0.1.0"),
        env={"HOMEPORT_CONFIG_DIR": str(tmp_path)},
    )

    assert code == 0, err
    https_rule = '"end_port": "443",\n      "label": "homeport https",'
    assert https_rule in out
    assert not any(tmp_path.iterdir())  # noqa: ASYNC240 - one tiny listing


async def test_a_bad_api_key_is_reported_plainly(tmp_path: Path, fake_civo: FakeCivo) -> None:
    wrong = "not-the-key-0123456789"
    code, out, err = await homeport(
        "exit-node", "create", env=cli_env(fake_civo, tmp_path, key=wrong)
    )

    assert code == 1
    assert "the Civo API refused the API key (HTTP 401" in err
    assert "Traceback" not in err
    assert wrong not in out + err
    assert not (tmp_path / "exit-nodes").exists()
    assert fake_civo.firewalls == {}
    assert fake_civo.instances == {}


async def test_no_api_key_at_all_says_where_to_give_it(tmp_path: Path) -> None:
    code, _, err = await homeport("exit-node", "list", env={"HOMEPORT_CONFIG_DIR": str(tmp_path)})
    assert code == 1
    assert "give --api-key-file FILE or set CIVO_TOKEN" in err


async def test_a_missing_disk_image_lists_the_available_ones(
    tmp_path: Path, fake_civo: FakeCivo
) -> None:
    code, _, err = await homeport(
        "exit-node", "create", "--image", "ubuntu-warty", env=cli_env(fake_civo, tmp_path)
    )

    assert code == 1
    assert "no disk image 'ubuntu-warty'" in err
    assert "debian-12, ubuntu-noble" in err
    assert fake_civo.firewalls == {}


async def test_an_instance_that_never_gets_an_ip_times_out_and_says_how_to_delete_it(
    tmp_path: Path, fake_civo: FakeCivo
) -> None:
    fake_civo.public_ip = None

    code, _, err = await homeport(
        "exit-node",
        "create",
        *("--name", NAME, "--timeout", "1", *FAST),
        env=cli_env(fake_civo, tmp_path),
    )

    assert code == 1
    assert "the instance is ACTIVE but has no public IP" in err
    (instance_id,) = fake_civo.instances
    (firewall_id,) = fake_civo.firewalls
    assert f"instance {NAME} (id {instance_id})" in err
    assert f"firewall homeport-{NAME} (id {firewall_id})" in err
    assert f"Delete them with: homeport exit-node delete {NAME} --region lon1" in err

    code, _, err = await homeport(
        "exit-node", "delete", NAME, *FAST, env=cli_env(fake_civo, tmp_path)
    )

    assert code == 0, err
    assert fake_civo.instances == {}
    assert fake_civo.firewalls == {}


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        ((403, "quota_limit_reached", "instance quota reached"), "Civo quota exceeded (HTTP 403"),
        ((503, "server_error", "maintenance"), "failed on POST /v2/instances (HTTP 503"),
    ],
)
async def test_a_refused_instance_takes_its_firewall_away_again(
    tmp_path: Path, fake_civo: FakeCivo, failure: tuple[int, str, str], message: str
) -> None:
    fake_civo.fail_next[("POST", "/v2/instances")] = failure

    code, _, err = await homeport("exit-node", "create", env=cli_env(fake_civo, tmp_path))

    assert code == 1
    assert message in err
    assert "Nothing was left in Civo." in err
    assert fake_civo.firewalls == {}
    assert not (tmp_path / "exit-nodes" / "exit").exists()


async def test_a_failing_firewall_call_is_reported_plainly(
    tmp_path: Path, fake_civo: FakeCivo
) -> None:
    fake_civo.fail_next[("POST", "/v2/firewalls")] = (500, "internal", "boom")

    code, _, err = await homeport("exit-node", "create", env=cli_env(fake_civo, tmp_path))

    assert code == 1
    assert "the Civo API failed on POST /v2/firewalls (HTTP 500: boom); try again" in err
    assert "Traceback" not in err


async def test_a_taken_name_is_refused(tmp_path: Path, fake_civo: FakeCivo) -> None:
    fake_civo.public_ip = None
    await homeport(
        "exit-node", "create", "--timeout", "1", *FAST, env=cli_env(fake_civo, tmp_path / "a")
    )

    code, _, err = await homeport("exit-node", "create", env=cli_env(fake_civo, tmp_path / "b"))

    assert code == 1
    assert "already has an instance named exit" in err
    assert len(fake_civo.firewalls) == 1


@pytest.mark.parametrize("command", ["create", "userdata"])
@pytest.mark.parametrize(
    ("ports", "message"),
    [
        (["0"], "Invalid value for '--tcp-port': 0 is not in the range 1<=x<=65535"),
        (["2222", "70000"], "Invalid value for '--tcp-port': 70000 is not in the range"),
        (["80"], "--tcp-port 80 is the --port already"),
        (["2222", "8123"], "--tcp-port 8123 is the --control-port already"),
        (["2222", "5432", "2222"], "--tcp-port 2222 is given twice"),
        (["two"], "Invalid value for '--tcp-port': 'two' is not a valid integer"),
    ],
)
async def test_bad_tcp_ports_are_refused_before_anything_is_created(
    tmp_path: Path, fake_civo: FakeCivo, command: str, ports: list[str], message: str
) -> None:
    output = tmp_path / "user-data.yaml"
    args = [arg for port in ports for arg in ("--tcp-port", port)]
    if command == "userdata":
        args += ["-o", str(output)]

    code, out, err = await homeport(
        "exit-node", command, *args, env=cli_env(fake_civo, tmp_path / "config")
    )

    assert code in (1, 2), out
    assert message in err
    assert "Traceback" not in err
    assert fake_civo.calls == []
    assert not (tmp_path / "config").exists()
    assert not output.exists()


async def test_list_pages_through_instances_and_shows_only_homeports(
    tmp_path: Path, fake_civo: FakeCivo
) -> None:
    fake_civo.page_size = 1
    fake_civo.public_ip = None
    fake_civo.instances["other-1"] = {
        "id": "other-1",
        "hostname": "db",
        "status": "ACTIVE",
        "public_ip": "203.0.113.99",
        "firewall_id": "",
        "tags": [],
        "_polls": 0,
        "_deleting": False,
    }
    env = cli_env(fake_civo, tmp_path)
    for name in ("one", "two"):
        code, _, err = await homeport(
            "exit-node", "create", "--name", name, "--timeout", "1", *FAST, env=env
        )
        assert "no public IP" in err

    code, out, err = await homeport("exit-node", "list", env=env)

    assert code == 0, err
    names = [line.split()[0] for line in out.splitlines()[1:]]
    assert names == ["one", "two"]
    pages = [c.query.get("page") for c in fake_civo.calls if c.path == "/v2/instances"]
    assert pages[-3:] == ["1", "2", "3"]


async def test_dry_run_prints_the_golden_calls_and_makes_none(
    tmp_path: Path, fake_civo: FakeCivo
) -> None:
    code, out, err = await homeport(
        "exit-node",
        "create",
        *("--dry-run", "--name", NAME, "--allow-ssh-from", "198.51.100.0/24"),
        *("--api-url", "https://api.civo.com", "--package", "homeport==0.1.0"),
        env={"HOMEPORT_CONFIG_DIR": str(tmp_path)},
    )

    assert code == 0, err
    if os.environ.get("HOMEPORT_UPDATE_GOLDEN"):
        GOLDEN.write_text(out)
    assert out == GOLDEN.read_text(), f"dry run output changed; see {GOLDEN}"
    assert "BEGIN" not in out
    assert fake_civo.calls == []
    assert not any(tmp_path.iterdir())  # noqa: ASYNC240 - one tiny listing


async def test_userdata_writes_a_valid_cloud_config_and_keeps_the_token_local(
    tmp_path: Path,
) -> None:
    output = tmp_path / "user-data.yaml"
    config_dir = tmp_path / "config"

    code, out, err = await homeport(
        "exit-node",
        "userdata",
        *("--name", "lab", "--format", "cloud-config", "-o", str(output)),
        *("--tcp-port", "2222", "--tcp-port", "5432"),
        env={"HOMEPORT_CONFIG_DIR": str(config_dir)},
    )

    assert code == 0, err
    token = (config_dir / "exit-nodes" / "lab" / "token").read_text().strip()
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    text = output.read_text()
    assert text.startswith("#cloud-config\n")
    assert token not in text + out + err
    assert "--url wss://PUBLIC_IP:8123" in out
    assert '      HOMEPORT_TCP_PORT="2222 5432"\n' in text
    assert '      HOMEPORT_HTTPS_REDIRECT=""\n' in text
    assert "(to serve the raw TCP ports 2222, 5432, add --tcp PORT=ADDRESS:PORT" in out
    assert "HTTPS" not in out
    schema = await asyncio.to_thread(
        subprocess.run,
        [require("cloud-init"), "schema", "--config-file", str(output)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert schema.returncode == 0, schema.stdout + schema.stderr


async def test_userdata_with_letsencrypt_carries_the_names_and_says_what_to_open(
    tmp_path: Path,
) -> None:
    output = tmp_path / "user-data.sh"
    config_dir = tmp_path / "config"

    code, out, err = await homeport(
        "exit-node",
        "userdata",
        *("--name", "lab", "--format", "script", "-o", str(output)),
        *("--letsencrypt-domain", "Fn.Example.com", "--letsencrypt-issuer", "staging"),
        env={"HOMEPORT_CONFIG_DIR": str(config_dir)},
    )

    assert code == 0, err
    text = output.read_text()
    assert "LETSENCRYPT_DOMAINS='fn.example.com'\n" in text
    assert "LETSENCRYPT_ISSUER='staging'\n" in text
    assert "HTTPS_REDIRECT=''\n" in text
    said = " ".join(out.split())
    assert "HTTPS: https://fn.example.com/ with a certificate from Let's Encrypt's staging" in said
    assert "once the DNS A record of fn.example.com is PUBLIC_IP" in said
    assert "redirect" not in said
    record = json.loads((config_dir / "exit-nodes" / "lab" / "node.json").read_text())
    assert (record["letsencrypt_domains"], record["letsencrypt_issuer"]) == (
        ["fn.example.com"],
        "staging",
    )
    assert record["https_redirect"] is False


async def test_userdata_with_https_redirect_writes_it_to_the_cloud_config(
    tmp_path: Path,
) -> None:
    output = tmp_path / "user-data.yaml"
    config_dir = tmp_path / "config"

    code, out, err = await homeport(
        "exit-node",
        "userdata",
        *("--name", "lab", "--format", "cloud-config", "-o", str(output)),
        *("--letsencrypt-domain", "fn.example.com", "--https-redirect"),
        env={"HOMEPORT_CONFIG_DIR": str(config_dir)},
    )

    assert code == 0, err
    text = output.read_text()
    assert '      HOMEPORT_LETSENCRYPT_DOMAIN="fn.example.com"\n' in text
    assert '      HOMEPORT_HTTPS_REDIRECT="true"\n' in text
    said = " ".join(out.split())
    assert (
        "once the DNS A record of fn.example.com is PUBLIC_IP. Plain HTTP is answered with a "
        "redirect (308) to the same URL over HTTPS (Let's Encrypt's checks excepted), so "
        "visitors wait for the certificate too."
    ) in said
    record = json.loads((config_dir / "exit-nodes" / "lab" / "node.json").read_text())
    assert record["https_redirect"] is True
    schema = await asyncio.to_thread(
        subprocess.run,
        [require("cloud-init"), "schema", "--config-file", str(output)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert schema.returncode == 0, schema.stdout + schema.stderr


async def test_the_fake_api_rejects_malformed_requests(fake_civo: FakeCivo) -> None:
    auth = {"Authorization": f"bearer {fake_civo.api_key}"}
    base = fake_civo.url
    good_rule = {
        "protocol": "tcp",
        "start_port": "80",
        "end_port": "80",
        "cidr": ["0.0.0.0/0"],
        "direction": "ingress",
        "action": "allow",
        "label": "web",
    }
    firewall = {
        "name": "x",
        "region": "lon1",
        "network_id": "net-default",
        "create_rules": False,
        "rules": [good_rule],
    }
    cases: list[tuple[str, str, dict[str, str], Any, int]] = [
        ("GET", "/v2/networks?region=lon1", {}, None, 401),
        ("GET", "/v2/networks", auth, None, 400),
        ("POST", "/v2/firewalls?region=lon1", auth, {**firewall, "extra": 1}, 400),
        ("POST", "/v2/firewalls?region=lon1", auth, {**firewall, "create_rules": "no"}, 400),
        (
            "POST",
            "/v2/firewalls?region=lon1",
            auth,
            {**firewall, "rules": [{**good_rule, "cidr": ["0.0.0.0"], "end_port": "70"}]},
            400,
        ),
        ("POST", "/v2/instances?region=lon1", auth, {"hostname": "a", "region": "lon1"}, 400),
        ("DELETE", "/v2/instances/nope?region=lon1", auth, None, 404),
        ("POST", "/v2/firewalls?region=lon1", auth, firewall, 200),
    ]
    async with aiohttp.ClientSession() as session:
        for method, path, headers, body, status in cases:
            async with session.request(method, base + path, headers=headers, json=body) as answer:
                assert answer.status == status, (method, path, body, await answer.text())
