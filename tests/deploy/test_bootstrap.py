"""The exit node's first boot: bootstrap.sh run against a scratch root, and its cloud-config twin."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from homeport.cli import https_options, server
from homeport.exitnode.errors import ExitNodeError
from homeport.exitnode.material import NodeSecrets
from homeport.exitnode.render import (
    LetsEncrypt,
    NodeSettings,
    bootstrap_script,
    cloud_config,
    render,
    template,
)
from server.certificates import LETSENCRYPT, LETSENCRYPT_STAGING
from tests.deploy.helpers import FakeBin, Written, parse_env_file, require, run_script, snapshot

APT = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-q"]
PACKAGES = ["ca-certificates", "python3", "python3-venv", "gcc", "libc6-dev", "python3-dev"]
PYTHON_CHECK = "import sys; sys.exit(sys.version_info < (3, 11))"
PIP = ["pip", "install", "--no-cache-dir", "--disable-pip-version-check"]
NO_WHEEL = ["--no-binary", "homeport", "homeport==0.1.0"]
UNIT = "homeport-exit.service"
NO_HTTPS_ENV = (
    'HOMEPORT_LETSENCRYPT_DOMAIN=""\n'
    'HOMEPORT_LETSENCRYPT_EMAIL=""\n'
    "HOMEPORT_LETSENCRYPT_ISSUER=production\n"
    'HOMEPORT_HTTPS_REDIRECT=""\n'
)
HTTPS = LetsEncrypt(("fn.example.com",), "owner@example.com")
REDIRECTED = LetsEncrypt(("fn.example.com",), https_redirect=True)


def node_settings(secrets: NodeSecrets, **changes: Any) -> NodeSettings:
    values: dict[str, Any] = {
        "package": "homeport==0.1.0",
        "public_port": 80,
        "control_port": 8123,
        "token_hash": secrets.token_hash,
        "tls_cert_pem": secrets.tls_cert_pem,
        "tls_key_pem": secrets.tls_key_pem,
    }
    return NodeSettings(**{**values, **changes})


def boot(tmp_path: Path, fakebin: FakeBin, script_text: str) -> Path:
    """Run a bootstrap script against a fresh scratch root; return the root."""
    script = tmp_path / "bootstrap.sh"
    script.write_text(script_text)
    root = tmp_path / "vm"
    root.mkdir()
    result = run_script(script, root, fakebin)
    assert result.returncode == 0, result.stderr
    return root


def expected_files(secrets: NodeSecrets, env: str) -> dict[str, tuple[int, bytes | None]]:
    return {
        "/etc/homeport": (0o700, None),
        "/etc/homeport/exit.env": (0o600, env.encode()),
        "/etc/homeport/token-hash": (0o600, f"{secrets.token_hash}\n".encode()),
        "/etc/homeport/tls.crt": (0o600, secrets.tls_cert_pem.encode()),
        "/etc/homeport/tls.key": (0o600, secrets.tls_key_pem.encode()),
        f"/etc/systemd/system/{UNIT}": (0o644, template(UNIT).encode()),
    }


def test_bootstrap_writes_config_secrets_and_unit_with_tight_modes(
    tmp_path: Path, fakebin: FakeBin, secrets: NodeSecrets
) -> None:
    root = boot(tmp_path, fakebin, bootstrap_script(node_settings(secrets, public_port=8080)))

    written = snapshot(root)
    expected = expected_files(
        secrets,
        'HOMEPORT_PORT=8080\nHOMEPORT_CONTROL_PORT=8123\nHOMEPORT_TCP_PORT=""\n' + NO_HTTPS_ENV,
    )
    for path, (mode, content) in expected.items():
        assert written[path] == Written(mode, os.getuid(), os.getgid(), content), path
    files = {path for path, item in written.items() if item.content is not None}
    assert files == {path for path, (_, content) in expected.items() if content is not None}
    assert fakebin.commands() == [
        [*APT, "update"],
        [*APT, "install", "-y", "--no-install-recommends", *PACKAGES],
        ["python3", "-c", PYTHON_CHECK],
        ["python3", "-m", "venv", "/opt/homeport/venv"],
        # The exit server's request path compiled (HOMEPORT_COMPILE=1), from source.
        ["env", "HOMEPORT_COMPILE=1", "/opt/homeport/venv/bin/pip", *PIP[1:], *NO_WHEEL],
        ["systemctl", "daemon-reload"],
        ["systemctl", "enable", UNIT],
        ["systemctl", "restart", UNIT],
    ]


@pytest.mark.parametrize(
    ("tcp_ports", "line"),
    [
        ((), 'HOMEPORT_TCP_PORT=""'),
        ((2222,), 'HOMEPORT_TCP_PORT="2222"'),
        ((2222, 5432, 443), 'HOMEPORT_TCP_PORT="2222 5432 443"'),
    ],
)
def test_the_exit_server_reads_the_tcp_ports_bootstrap_writes(
    tmp_path: Path,
    fakebin: FakeBin,
    secrets: NodeSecrets,
    monkeypatch: pytest.MonkeyPatch,
    tcp_ports: tuple[int, ...],
    line: str,
) -> None:
    root = boot(tmp_path, fakebin, bootstrap_script(node_settings(secrets, tcp_ports=tcp_ports)))

    exit_env = root / "etc/homeport/exit.env"
    assert exit_env.read_text().splitlines()[2] == line
    # The environment systemd gives the unit, read by the real `homeport server`
    # options: an empty list is no TCP port at all.
    for key, value in parse_env_file(exit_env).items():
        monkeypatch.setenv(key, value)
    options = server.make_context("server", []).params
    assert (options["port"], options["control_port"]) == (80, 8123)
    assert options["tcp_ports"] == tcp_ports


@pytest.mark.parametrize(
    ("letsencrypt", "lines", "https"),
    [
        (
            LetsEncrypt(),
            NO_HTTPS_ENV,
            {},
        ),
        (
            LetsEncrypt(("fn.example.com",), "owner@example.com"),
            'HOMEPORT_LETSENCRYPT_DOMAIN="fn.example.com"\n'
            'HOMEPORT_LETSENCRYPT_EMAIL="owner@example.com"\n'
            "HOMEPORT_LETSENCRYPT_ISSUER=production\n"
            'HOMEPORT_HTTPS_REDIRECT=""\n',
            {"acme_domains": ("fn.example.com",), "acme_email": "owner@example.com"},
        ),
        (
            LetsEncrypt(("FN.Example.com.", "www.example.com", "fn.example.com"), None, "staging"),
            'HOMEPORT_LETSENCRYPT_DOMAIN="fn.example.com www.example.com"\n'
            'HOMEPORT_LETSENCRYPT_EMAIL=""\n'
            "HOMEPORT_LETSENCRYPT_ISSUER=staging\n"
            'HOMEPORT_HTTPS_REDIRECT=""\n',
            {"acme_domains": ("fn.example.com", "www.example.com"), "acme_email": None},
        ),
        (
            LetsEncrypt(("fn.example.com",), "owner@example.com", https_redirect=True),
            'HOMEPORT_LETSENCRYPT_DOMAIN="fn.example.com"\n'
            'HOMEPORT_LETSENCRYPT_EMAIL="owner@example.com"\n'
            "HOMEPORT_LETSENCRYPT_ISSUER=production\n"
            'HOMEPORT_HTTPS_REDIRECT="true"\n',
            {"acme_domains": ("fn.example.com",), "acme_email": "owner@example.com"},
        ),
    ],
    ids=["no-https", "https", "https-staging", "https-redirect"],
)
def test_the_exit_server_reads_the_https_settings_bootstrap_writes(
    tmp_path: Path,
    fakebin: FakeBin,
    secrets: NodeSecrets,
    monkeypatch: pytest.MonkeyPatch,
    letsencrypt: LetsEncrypt,
    lines: str,
    https: dict[str, Any],
) -> None:
    settings = node_settings(secrets, letsencrypt=letsencrypt)
    root = boot(tmp_path, fakebin, bootstrap_script(settings))

    exit_env = root / "etc/homeport/exit.env"
    assert exit_env.read_text().endswith(lines)
    # What systemd gives the unit, through the real `homeport server` options and
    # the very function that turns them into its HTTPS settings: an empty name
    # list is no HTTPS, an empty email none, an empty redirect none and "true"
    # one (which the server takes only with HTTPS). Off is empty, never "false":
    # click 8.2.0 and 8.2.1 read any non-empty value of a flag's variable as on.
    for key, value in parse_env_file(exit_env).items():
        monkeypatch.setenv(key, value)
    options = server.make_context("server", []).params
    assert (options["port"], options["https_port"]) == (80, 443)
    assert options["https_redirect"] is letsencrypt.https_redirect
    served = https_options(
        domains=options["letsencrypt_domains"],
        email=options["letsencrypt_email"],
        issuer=options["letsencrypt_issuer"],
        directory=options["acme_directory"],
        ca_file=options["acme_ca_file"],
        cert=options["https_cert"],
        key=options["https_key"],
    )
    if not https:
        assert served == {}
    else:
        directory = LETSENCRYPT_STAGING if letsencrypt.issuer == "staging" else LETSENCRYPT
        assert served == {**https, "acme_directory": directory, "acme_ca_file": None}
    assert served or not options["https_redirect"]  # else: "--https-redirect needs HTTPS"


@pytest.mark.parametrize(
    "letsencrypt",
    [
        LetsEncrypt(
            ("xn--bcher-kva.example", "a-b.c0.example.co.uk", "x.io"), "a.b+c_d-e@m-1.example"
        ),
        LetsEncrypt((f"{'a' * 63}.{'b' * 63}.example",), "Owner.Name@Example.COM"),
    ],
)
def test_bootstrap_takes_every_name_and_address_the_laptop_takes(
    tmp_path: Path, fakebin: FakeBin, secrets: NodeSecrets, letsencrypt: LetsEncrypt
) -> None:
    script = bootstrap_script(node_settings(secrets, letsencrypt=letsencrypt))

    root = boot(tmp_path, fakebin, script)

    env = parse_env_file(root / "etc/homeport/exit.env")
    assert env["HOMEPORT_LETSENCRYPT_DOMAIN"] == " ".join(letsencrypt.domains)
    assert env["HOMEPORT_LETSENCRYPT_EMAIL"] == letsencrypt.email


def test_the_script_carries_the_token_hash_never_the_token(secrets: NodeSecrets) -> None:
    script = bootstrap_script(node_settings(secrets))
    assert secrets.token not in script
    assert secrets.token_hash in script


def test_bootstrap_run_twice_leaves_the_same_files(
    tmp_path: Path, fakebin: FakeBin, secrets: NodeSecrets
) -> None:
    root = boot(tmp_path, fakebin, bootstrap_script(node_settings(secrets)))
    first = snapshot(root)
    fakebin.clear()

    result = run_script(tmp_path / "bootstrap.sh", root, fakebin)

    assert result.returncode == 0, result.stderr
    assert snapshot(root) == first
    assert ["python3", "-m", "venv", "/opt/homeport/venv"] not in fakebin.commands()
    assert ["systemctl", "restart", UNIT] in fakebin.commands()


def test_bootstrap_stops_on_an_old_python(
    tmp_path: Path, fakebin: FakeBin, secrets: NodeSecrets
) -> None:
    script = tmp_path / "bootstrap.sh"
    script.write_text(bootstrap_script(node_settings(secrets)))
    root = tmp_path / "vm"
    root.mkdir()

    result = run_script(script, root, fakebin, FAKE_PYTHON_C_EXIT="1")

    assert result.returncode == 1
    assert "needs Python 3.11 or newer" in result.stderr
    assert not (root / "etc").exists()


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PUBLIC_PORT", "80$(touch {pwned})", "public port is malformed"),
        ("CONTROL_PORT", "8123`touch {pwned}`", "control port is malformed"),
        ("TOKEN_HASH", "$(touch {pwned})", "token hash is malformed"),
        ("PACKAGE", "homeport==1 $(touch {pwned})", "package is malformed"),
        ("PUBLIC_PORT", "8123", "two different numbers"),
        ("TCP_PORTS", "2222 $(touch {pwned})", "TCP ports is malformed"),
        ("TCP_PORTS", "2222\nHOMEPORT_INSECURE=1", "TCP ports is malformed"),
        ("TCP_PORTS", "2222  5432", "TCP ports is malformed"),
        ("TCP_PORTS", "0", "TCP ports is malformed"),
        ("TCP_PORTS", "70000", "TCP port 70000 is over 65535"),
        ("TCP_PORTS", "2222 80", "TCP port 80 is over 65535, given twice, or the public"),
        ("TCP_PORTS", "8123", "TCP port 8123 is over 65535, given twice, or the public"),
        ("TCP_PORTS", "2222 5432 2222", "TCP port 2222 is over 65535, given twice"),
        ("TCP_PORTS", "2222 443", "TCP port 443 is over 65535, given twice, or the public, cont"),
        ("LETSENCRYPT_DOMAINS", "fn.example.com $(touch {pwned})", "domain list is malformed"),
        ("LETSENCRYPT_DOMAINS", "`touch {pwned}`.example.com", "domain list is malformed"),
        ("LETSENCRYPT_DOMAINS", "fn.example.com\nHOMEPORT_INSECURE=1", "domain list is malformed"),
        ("LETSENCRYPT_DOMAINS", 'fn.example.com"\nHOMEPORT_X="1', "domain list is malformed"),
        ("LETSENCRYPT_DOMAINS", "*.example.com", "domain list is malformed"),
        ("LETSENCRYPT_DOMAINS", "203.0.113.7", "domain list is malformed"),
        ("LETSENCRYPT_DOMAINS", "FN.example.com", "domain list is malformed"),
        ("LETSENCRYPT_DOMAINS", "fn.example.com.", "domain list is malformed"),
        ("LETSENCRYPT_DOMAINS", "localhost", "domain list is malformed"),
        ("LETSENCRYPT_DOMAINS", "-fn.example.com", "domain list is malformed"),
        ("LETSENCRYPT_DOMAINS", "fn.example.com  www.example.com", "domain list is malformed"),
        ("LETSENCRYPT_EMAIL", "you@example.com $(touch {pwned})", "Encrypt email is malformed"),
        ("LETSENCRYPT_EMAIL", "you`touch {pwned}`@example.com", "Encrypt email is malformed"),
        ("LETSENCRYPT_EMAIL", 'you"@example.com', "Encrypt email is malformed"),
        ("LETSENCRYPT_EMAIL", "you@example.com\nHOMEPORT_INSECURE=1", "email is malformed"),
        ("LETSENCRYPT_EMAIL", "you@localhost", "Encrypt email is malformed"),
        ("LETSENCRYPT_ISSUER", "staging\nHOMEPORT_INSECURE=1", "Encrypt issuer is malformed"),
        ("LETSENCRYPT_ISSUER", "$(touch {pwned})", "Encrypt issuer is malformed"),
        ("LETSENCRYPT_ISSUER", "", "Encrypt issuer is malformed"),
        ("HTTPS_REDIRECT", "true\nHOMEPORT_INSECURE=1", "HTTPS redirect is malformed"),
        ("HTTPS_REDIRECT", "\nHOMEPORT_HTTPS_REDIRECT=true", "HTTPS redirect is malformed"),
        ("HTTPS_REDIRECT", "false", "HTTPS redirect is malformed"),  # on, for click 8.2.0/8.2.1
        ("HTTPS_REDIRECT", "0", "HTTPS redirect is malformed"),
        ("HTTPS_REDIRECT", "$(touch {pwned})", "HTTPS redirect is malformed"),
        ("HTTPS_REDIRECT", "`touch {pwned}`", "HTTPS redirect is malformed"),
        ("HTTPS_REDIRECT", "true;touch {pwned}", "HTTPS redirect is malformed"),
        ("HTTPS_REDIRECT", "1", "HTTPS redirect is malformed"),
        ("HTTPS_REDIRECT", "on", "HTTPS redirect is malformed"),
        ("HTTPS_REDIRECT", "True", "HTTPS redirect is malformed"),
        ("HTTPS_REDIRECT", "true ", "HTTPS redirect is malformed"),
    ],
)
def test_the_script_itself_refuses_values_that_bypassed_the_renderer(
    tmp_path: Path,
    fakebin: FakeBin,
    secrets: NodeSecrets,
    name: str,
    value: str,
    message: str,
) -> None:
    pwned = tmp_path / "pwned"
    values = node_settings(secrets, letsencrypt=HTTPS).checked_values()
    values[name] = value.format(pwned=pwned)
    script = tmp_path / "bootstrap.sh"
    script.write_text(render(template("bootstrap.sh"), values))
    root = tmp_path / "vm"
    root.mkdir()

    result = run_script(script, root, fakebin)

    assert result.returncode == 1
    assert message in result.stderr
    assert not pwned.exists()
    assert fakebin.commands() == []
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"PUBLIC_PORT": "8080"}, "Let's Encrypt needs the public port to be 80"),
        ({"CONTROL_PORT": "443"}, "the control port cannot be 443, the HTTPS port"),
        ({"LETSENCRYPT_DOMAINS": ""}, "a Let's Encrypt email goes with a Let's Encrypt domain"),
        (
            {"LETSENCRYPT_DOMAINS": "", "LETSENCRYPT_EMAIL": "", "HTTPS_REDIRECT": "true"},
            "the HTTPS redirect goes with a Let's Encrypt domain",
        ),
    ],
)
def test_the_script_itself_refuses_https_settings_the_exit_server_would_refuse(
    tmp_path: Path, fakebin: FakeBin, secrets: NodeSecrets, changes: dict[str, str], message: str
) -> None:
    values = {**node_settings(secrets, letsencrypt=HTTPS).checked_values(), **changes}
    script = tmp_path / "bootstrap.sh"
    script.write_text(render(template("bootstrap.sh"), values))
    root = tmp_path / "vm"
    root.mkdir()

    result = run_script(script, root, fakebin)

    assert result.returncode == 1
    assert message in result.stderr
    assert fakebin.commands() == []
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"package": "homeport==1'; touch /tmp/x; '"}, "--package"),
        ({"package": "homeport==1\nrm -rf /"}, "--package"),
        ({"package": "https://example.com/a b.whl"}, "--package"),
        ({"public_port": 0}, "public port"),
        ({"control_port": 65536}, "control port"),
        ({"control_port": 80}, "must differ"),
        ({"tcp_ports": (0,)}, "--tcp-port 0 must be from 1 to 65535"),
        ({"tcp_ports": (2222, 70000)}, "--tcp-port 70000 must be from 1 to 65535"),
        ({"tcp_ports": (80,)}, "--tcp-port 80 is the --port already"),
        ({"tcp_ports": (2222, 8123)}, "--tcp-port 8123 is the --control-port already"),
        ({"tcp_ports": (2222, 5432, 2222)}, "--tcp-port 2222 is given twice"),
        ({"token_hash": "A" * 64}, "token hash"),
        ({"token_hash": "0" * 63}, "token hash"),
        ({"tls_key_pem": "-----BEGIN PRIVATE KEY-----\nEOF_KEY\nrm -rf /\n"}, "TLS key"),
        ({"tls_cert_pem": "not a certificate\n"}, "TLS certificate"),
        (
            {"tls_cert_pem": "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n$(x)"},
            "TLS certificate",
        ),
        (
            {"letsencrypt": LetsEncrypt(("fn.example.com'; touch /tmp/x; '",))},
            "--letsencrypt-domain .* is not a DNS name",
        ),
        (
            {"letsencrypt": LetsEncrypt(("fn.example.com\nHOMEPORT_INSECURE=1",))},
            "--letsencrypt-domain .* is not a DNS name",
        ),
        ({"letsencrypt": LetsEncrypt(("$(reboot).example.com",))}, "is not a DNS name"),
        ({"letsencrypt": LetsEncrypt(("*.example.com",))}, "a wildcard needs a DNS-01"),
        ({"letsencrypt": LetsEncrypt(("203.0.113.7",))}, "names, not IP addresses"),
        (
            {"letsencrypt": LetsEncrypt(("fn.example.com",), "you'$(reboot)'@example.com")},
            "--letsencrypt-email .* an exit node takes letters, digits",
        ),
        (
            {"letsencrypt": LetsEncrypt(("fn.example.com",), 'you"@example.com')},
            "an exit node takes letters, digits",
        ),
        (
            {"letsencrypt": LetsEncrypt(("fn.example.com",), "you@example.com\nX=1")},
            "is not an email address",
        ),
        ({"letsencrypt": LetsEncrypt(("fn.example.com",), None, "prod'; x")}, "production or"),
        (
            {"letsencrypt": HTTPS, "public_port": 8080},
            "--letsencrypt-domain needs --port 80, not 8080",
        ),
        ({"letsencrypt": HTTPS, "tcp_ports": (443,)}, "--tcp-port 443 is the HTTPS port"),
        (
            {"letsencrypt": LetsEncrypt(https_redirect=True)},
            "--https-redirect goes with --letsencrypt-domain",
        ),
        (
            {"letsencrypt": LetsEncrypt(("$(reboot).example.com",), https_redirect=True)},
            "is not a DNS name",
        ),
    ],
)
def test_the_renderer_refuses_values_that_could_inject(
    secrets: NodeSecrets, changes: dict[str, Any], message: str
) -> None:
    settings = node_settings(secrets, **changes)
    for renderer in (bootstrap_script, cloud_config):
        with pytest.raises(ExitNodeError, match=message):
            renderer(settings)


@pytest.mark.parametrize("https_redirect", [True, False])
def test_the_redirect_reaches_the_templates_as_true_or_empty(
    secrets: NodeSecrets, https_redirect: bool
) -> None:
    letsencrypt = LetsEncrypt(("fn.example.com",), https_redirect=https_redirect)

    values = node_settings(secrets, letsencrypt=letsencrypt).checked_values()

    assert values["HTTPS_REDIRECT"] == ("true" if https_redirect else "")


@pytest.mark.parametrize("given", ["false", "'; reboot; '", "", 1, 0, None])
def test_a_redirect_that_is_not_a_bool_is_refused(secrets: NodeSecrets, given: Any) -> None:
    # "false" is truthy: only a real bool says whether the script gets "true".
    settings = node_settings(
        secrets, letsencrypt=LetsEncrypt(("fn.example.com",), None, "production", given)
    )

    for renderer in (bootstrap_script, cloud_config):
        with pytest.raises(ExitNodeError, match="--https-redirect is a flag"):
            renderer(settings)


def test_render_refuses_missing_and_unused_values() -> None:
    with pytest.raises(ExitNodeError, match="MISSING is missing"):
        render("a @@MISSING@@ b\n", {})
    with pytest.raises(ExitNodeError, match="EXTRA are not used"):
        render("nothing here\n", {"EXTRA": "x"})


def load_yaml(text: str) -> Any:
    """Parse YAML with the PyYAML that yamllint and cloud-init bring (not a homeport dependency)."""
    yamllint = require("yamllint")
    python = Path(yamllint).read_text().splitlines()[0].removeprefix("#!").split()[0]
    result = subprocess.run(
        [python, "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
        input=text,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, f"cannot parse YAML with {python}: {result.stderr}"
    return json.loads(result.stdout)


@pytest.mark.parametrize(
    ("tcp_ports", "letsencrypt"),
    [
        ((), LetsEncrypt()),
        ((2222, 5432), HTTPS),
        ((), LetsEncrypt(("a.example", "b.example"))),
        ((2222,), REDIRECTED),
    ],
)
def test_cloud_config_says_exactly_what_the_bootstrap_script_does(
    tmp_path: Path,
    fakebin: FakeBin,
    secrets: NodeSecrets,
    tcp_ports: tuple[int, ...],
    letsencrypt: LetsEncrypt,
) -> None:
    settings = node_settings(secrets, tcp_ports=tcp_ports, letsencrypt=letsencrypt)
    root = boot(tmp_path, fakebin, bootstrap_script(settings))
    written = snapshot(root)
    commands = fakebin.commands()

    document = load_yaml(cloud_config(settings))

    # The same files, modes and contents, all owned by root.
    declared = {
        entry["path"]: (int(entry["permissions"], 8), entry["content"].encode())
        for entry in document["write_files"]
    }
    files = {path: (w.mode, w.content) for path, w in written.items() if w.content is not None}
    assert declared == files
    assert {entry["owner"] for entry in document["write_files"]} == {"root:root"}
    # The same packages, after the same update.
    assert document["package_update"] is True
    assert [*APT, "update"] in commands
    assert [*APT, "install", "-y", "--no-install-recommends", *document["packages"]] in commands
    # The same commands in the same order; the folder's mode set the same way.
    runcmd = document["runcmd"]
    assert runcmd[0] == ["chmod", "0700", "/etc/homeport"]
    assert written["/etc/homeport"].mode == 0o700
    as_run = [[Path(c[0]).name if c[0].startswith("/") else c[0], *c[1:]] for c in runcmd[1:]]
    assert as_run == [c for c in commands if c[0] != "apt-get"]
