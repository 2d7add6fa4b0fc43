"""install-client.sh against a scratch root: what it writes, that it never echoes the token."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from client.upstreams import parse_upstreams
from homeport.cli import client
from homeport.exitnode.render import template
from tests.deploy.helpers import TEMPLATES, FakeBin, Written, parse_env_file, run_script, snapshot

SCRIPT = TEMPLATES / "install-client.sh"
TOKEN = "pi-token-Zx9_" + "k" * 30
FINGERPRINT = "sha256:" + "ab" * 32
UNIT = "homeport-client.service"
PIP = ["pip", "install", "--no-cache-dir", "--disable-pip-version-check"]


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def install(
    tmp_path: Path, fakebin: FakeBin, *args: str, stdin: str = "", **env: str
) -> tuple[Path, str, str, int]:
    root = tmp_path / "pi"
    root.mkdir(exist_ok=True)
    result = run_script(SCRIPT, root, fakebin, *args, stdin=stdin, **env)
    return root, result.stdout, result.stderr, result.returncode


BASIC = ("--url", "wss://203.0.113.10:8123", "--fingerprint", FINGERPRINT)


def client_options(client_env: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The real `homeport client` options, read from the environment systemd gives the unit."""
    for key, value in parse_env_file(client_env).items():
        monkeypatch.setenv(key, value)
    return client.make_context("client", []).params


def test_install_writes_token_settings_and_unit_and_starts_it(
    tmp_path: Path, fakebin: FakeBin, token_file: Path
) -> None:
    root, out, err, code = install(
        tmp_path,
        fakebin,
        *BASIC,
        *("--token-file", str(token_file), "--name", "garden-pi"),
        *("--upstream", "http://127.0.0.1:8080", "--upstream", "fn.example.com=http://10.0.0.5:80"),
        *("--allow-path", "default=/function/", "--allow-path", "default=/async-function/"),
        *("--tcp", "2222=127.0.0.1:22", "--tcp", "5432=[fd00::5]:5432"),
    )

    assert code == 0, err
    uid, gid = os.getuid(), os.getgid()
    written = snapshot(root)
    assert written["/etc/homeport"] == Written(0o700, uid, gid, None)
    assert written["/etc/homeport/token"] == Written(0o600, uid, gid, f"{TOKEN}\n".encode())
    env = (
        "HOMEPORT_URL=wss://203.0.113.10:8123\n"
        f"HOMEPORT_FINGERPRINT={FINGERPRINT}\n"
        'HOMEPORT_UPSTREAM="http://127.0.0.1:8080 fn.example.com=http://10.0.0.5:80"\n'
        'HOMEPORT_TCP="2222=127.0.0.1:22 5432=[fd00::5]:5432"\n'
        'HOMEPORT_ALLOW_PATH="default=/function/ default=/async-function/"\n'
        "HOMEPORT_NAME=garden-pi\n"
        "HOMEPORT_CONNECTIONS=2\n"
    )
    assert written["/etc/homeport/client.env"] == Written(0o600, uid, gid, env.encode())
    unit = written[f"/etc/systemd/system/{UNIT}"]
    assert unit == Written(0o644, uid, gid, template(UNIT).encode())
    assert fakebin.commands() == [
        ["python3", "-c", "import ensurepip, venv"],
        ["python3", "-c", "import sys; sys.exit(sys.version_info < (3, 11))"],
        ["python3", "-m", "venv", "/opt/homeport/venv"],
        [*PIP, "homeport==0.1.0"],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", UNIT],
        ["systemctl", "restart", UNIT],
    ]
    assert TOKEN not in out + err


def test_install_is_idempotent(tmp_path: Path, fakebin: FakeBin, token_file: Path) -> None:
    args = (*BASIC, "--token-file", str(token_file))
    root, *_ = install(tmp_path, fakebin, *args)
    first = snapshot(root)
    fakebin.clear()

    root, _, err, code = install(tmp_path, fakebin, *args)

    assert code == 0, err
    assert snapshot(root) == first
    assert ["python3", "-m", "venv", "/opt/homeport/venv"] not in fakebin.commands()
    assert fakebin.commands()[-1] == ["systemctl", "restart", UNIT]


def test_install_reads_the_token_from_stdin_and_defaults_the_upstream(
    tmp_path: Path, fakebin: FakeBin
) -> None:
    root, out, err, code = install(
        tmp_path, fakebin, *BASIC, "--token-file", "-", stdin=TOKEN + "\r\n"
    )

    assert code == 0, err
    assert (root / "etc/homeport/token").read_text() == TOKEN + "\n"
    env = (root / "etc/homeport/client.env").read_text()
    assert 'HOMEPORT_UPSTREAM="http://127.0.0.1:8080"' in env
    assert "HOMEPORT_ALLOW_PATH" not in env
    assert TOKEN not in out + err


def test_install_with_only_tcp_ports_serves_no_http_upstream(
    tmp_path: Path, fakebin: FakeBin, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _, err, code = install(
        tmp_path,
        fakebin,
        *(*BASIC, "--token-file", str(token_file)),
        *("--tcp", "2222=127.0.0.1:22", "--tcp", "65535=nas.lan:1"),
    )

    assert code == 0, err
    client_env = root / "etc/homeport/client.env"
    assert client_env.read_text() == (
        "HOMEPORT_URL=wss://203.0.113.10:8123\n"
        f"HOMEPORT_FINGERPRINT={FINGERPRINT}\n"
        'HOMEPORT_TCP="2222=127.0.0.1:22 65535=nas.lan:1"\n'
        "HOMEPORT_CONNECTIONS=2\n"
    )
    options = client_options(client_env, monkeypatch)
    assert options["upstreams"] == ()
    assert options["tcp_upstreams"] == ("2222=127.0.0.1:22", "65535=nas.lan:1")
    assert parse_upstreams(options["upstreams"], tcp=options["tcp_upstreams"])


def test_install_passes_the_proxy_protocol_on_to_the_client(
    tmp_path: Path, fakebin: FakeBin, token_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _, err, code = install(
        tmp_path,
        fakebin,
        *(*BASIC, "--token-file", str(token_file)),
        *("--tcp", "443=127.0.0.1:443", "--tcp", "25=127.0.0.1:25", "--tcp", "2222=127.0.0.1:22"),
        *("--proxy-protocol", "443=v2", "--proxy-protocol", "25=v1"),
    )

    assert code == 0, err
    client_env = root / "etc/homeport/client.env"
    assert 'HOMEPORT_PROXY_PROTOCOL="443=v2 25=v1"\n' in client_env.read_text()
    options = client_options(client_env, monkeypatch)
    assert options["proxy_protocol"] == ("443=v2", "25=v1")
    served = parse_upstreams(
        (), tcp=options["tcp_upstreams"], proxy_protocol=options["proxy_protocol"]
    )
    assert [(u.tcp_port, u.proxy_protocol) for u in served] == [(443, 2), (25, 1), (2222, 0)]


def test_install_refuses_a_tcp_port_given_twice(
    tmp_path: Path, fakebin: FakeBin, token_file: Path
) -> None:
    root, _, err, code = install(
        tmp_path,
        fakebin,
        *(*BASIC, "--token-file", str(token_file)),
        *("--tcp", "2222=127.0.0.1:22", "--tcp", "2222=10.0.0.5:22"),
    )

    assert code == 1
    assert "--tcp port 2222 is given twice" in err
    assert fakebin.commands() == []
    assert list(root.iterdir()) == []


def test_install_installs_venv_support_when_python_lacks_it(
    tmp_path: Path, fakebin: FakeBin, token_file: Path
) -> None:
    _, _, err, code = install(
        tmp_path, fakebin, *BASIC, "--token-file", str(token_file), FAKE_PYTHON_NO_VENV="1"
    )

    assert code == 0, err
    apt = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-q"]
    assert fakebin.commands()[1:3] == [
        [*apt, "update"],
        [*apt, "install", "-y", "--no-install-recommends", "python3", "python3-venv"],
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--url", "wss://1.2.3.4:8123/$(touch {pwned})"), "--url is malformed"),
        (("--url", "ws://1.2.3.4:8123"), "--url is malformed"),
        (("--fingerprint", "sha256:" + "AB" * 32), "--fingerprint is malformed"),
        (("--upstream", 'http://127.0.0.1:8080" X="1'), "--upstream is malformed"),
        (("--upstream", "http://127.0.0.1:8080\nHOMEPORT_INSECURE=1"), "--upstream is malformed"),
        (("--allow-path", "default=/f/$(touch {pwned})"), "--allow-path is malformed"),
        (("--tcp", "2222"), "--tcp is malformed"),
        (("--tcp", "127.0.0.1:22"), "--tcp is malformed"),
        (("--tcp", "2222=127.0.0.1"), "--tcp is malformed"),
        (("--tcp", "2222=http://127.0.0.1:22"), "--tcp is malformed"),
        (("--tcp", "0=127.0.0.1:22"), "--tcp is malformed"),
        (("--tcp", "2222=127.0.0.1:0"), "--tcp is malformed"),
        (("--tcp", "070000=127.0.0.1:22"), "--tcp is malformed"),
        (("--tcp", "70000=127.0.0.1:22"), "--tcp has a port over 65535"),
        (("--tcp", "2222=127.0.0.1:65536"), "--tcp has a port over 65535"),
        (("--tcp", "2222=$(touch {pwned}):22"), "--tcp is malformed"),
        (("--tcp", '2222=127.0.0.1:22" X="1'), "--tcp is malformed"),
        (("--tcp", "2222=127.0.0.1:22\nHOMEPORT_INSECURE=1"), "--tcp is malformed"),
        (("--name", "a b"), "--name is malformed"),
        (("--connections", "9"), "--connections is malformed"),
        (("--connections", "2\nHOMEPORT_INSECURE=1"), "--connections is malformed"),
        (("--package", "homeport==1;touch {pwned}"), "--package is malformed"),
    ],
)
def test_install_refuses_malformed_values_and_changes_nothing(
    tmp_path: Path,
    fakebin: FakeBin,
    token_file: Path,
    args: tuple[str, str],
    message: str,
) -> None:
    pwned = tmp_path / "pwned"
    given = dict(zip(BASIC[::2], BASIC[1::2], strict=True))
    given[args[0]] = args[1].format(pwned=pwned)
    flat = [item for pair in given.items() for item in pair]

    root, _, err, code = install(tmp_path, fakebin, *flat, "--token-file", str(token_file))

    assert code == 1
    assert message in err
    assert not pwned.exists()
    assert fakebin.commands() == []
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--tcp", "443=127.0.0.1:443", "--proxy-protocol", "443=v3"),
            "--proxy-protocol is malformed",
        ),
        (
            ("--tcp", "443=127.0.0.1:443", "--proxy-protocol", "443"),
            "--proxy-protocol is malformed",
        ),
        (
            ("--tcp", "443=127.0.0.1:443", "--proxy-protocol", "443=v1\nHOMEPORT_INSECURE=1"),
            "--proxy-protocol is malformed",
        ),
        (
            ("--tcp", "443=127.0.0.1:443", "--proxy-protocol", "444=v2"),
            "port 444 is not a --tcp port",
        ),
        (("--proxy-protocol", "443=v2"), "port 443 is not a --tcp port"),
        (
            (
                "--tcp",
                "443=127.0.0.1:443",
                "--proxy-protocol",
                "443=v1",
                "--proxy-protocol",
                "443=v2",
            ),
            "--proxy-protocol port 443 is given twice",
        ),
    ],
)
def test_install_refuses_a_bad_proxy_protocol_and_changes_nothing(
    tmp_path: Path, fakebin: FakeBin, token_file: Path, args: tuple[str, ...], message: str
) -> None:
    root, _, err, code = install(tmp_path, fakebin, *BASIC, "--token-file", str(token_file), *args)

    assert code == 1
    assert message in err
    assert fakebin.commands() == []
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("token", ["short", "has space inside it", "tab\there-is-long-enough", ""])
def test_install_refuses_a_malformed_token_without_printing_it(
    tmp_path: Path, fakebin: FakeBin, token: str
) -> None:
    root, out, err, code = install(tmp_path, fakebin, *BASIC, "--token-file", "-", stdin=token)

    assert code == 1
    assert "token" in err
    if token:
        assert token not in out + err
    assert list(root.iterdir()) == []


def test_install_without_the_required_options_prints_usage(
    tmp_path: Path, fakebin: FakeBin
) -> None:
    _, _, err, code = install(tmp_path, fakebin, "--url", "wss://203.0.113.10:8123")
    assert code == 2
    assert "sudo bash install-client.sh" in err
