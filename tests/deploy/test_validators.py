"""Every deploy file through its offline validator, and the copies users read kept equal.

shellcheck and ``bash -n`` on every script; ``systemd-analyze verify`` (any
output fails, not only the exit code) and ``systemd-analyze security
--offline`` (exposure 2.0 at most) on every unit; ``cloud-init schema`` and
``yamllint`` on the cloud-config, as shipped and as rendered. A missing
validator fails the test with the command that installs it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from homeport.exitnode.material import NodeSecrets
from homeport.exitnode.render import (
    LetsEncrypt,
    NodeSettings,
    bootstrap_script,
    cloud_config,
    template,
)
from tests.deploy.helpers import (
    DEPLOY,
    ROOT,
    TEMPLATES,
    FakeBin,
    require,
    run_script,
)
from tunnel.version import __version__

SCRIPTS = ["bootstrap.sh", "install-client.sh"]
UNITS = ["homeport-exit.service", "homeport-client.service"]
MAX_EXPOSURE = 2.0
#: Where each template is copied for users to read.
COPIES = {
    "bootstrap.sh": DEPLOY / "bootstrap.sh",
    "cloud-config.yaml": DEPLOY / "cloud-config.yaml",
    "homeport-exit.service": DEPLOY / "homeport-exit.service",
    "homeport-client.service": DEPLOY / "pi" / "homeport-client.service",
    "install-client.sh": DEPLOY / "pi" / "install-client.sh",
}


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)


def rendered(tmp_path: Path, secrets: NodeSecrets) -> tuple[Path, Path]:
    settings = NodeSettings(
        "homeport==0.1.0",
        80,
        8123,
        secrets.token_hash,
        secrets.tls_cert_pem,
        secrets.tls_key_pem,
        tcp_ports=(2222, 5432),
        letsencrypt=LetsEncrypt(
            ("fn.example.com", "www.example.com"), "owner@example.com", https_redirect=True
        ),
    )
    script, config = tmp_path / "bootstrap.sh", tmp_path / "cloud-config.yaml"
    script.write_text(bootstrap_script(settings))
    config.write_text(cloud_config(settings))
    return script, config


def every_script(tmp_path: Path, secrets: NodeSecrets) -> list[Path]:
    shipped = [TEMPLATES / name for name in SCRIPTS] + [COPIES[name] for name in SCRIPTS]
    return [*shipped, rendered(tmp_path, secrets)[0]]


def test_every_script_passes_shellcheck_and_bash_n(tmp_path: Path, secrets: NodeSecrets) -> None:
    shellcheck = require("shellcheck")
    for script in every_script(tmp_path, secrets):
        # Every optional check too, but brace style (SC2250): "$UNIT" reads as well as "${UNIT}".
        checked = run(shellcheck, "--shell=bash", "--enable=all", "--exclude=SC2250", str(script))
        assert checked.returncode == 0, f"{script}:\n{checked.stdout}{checked.stderr}"
        parsed = run("bash", "-n", str(script))
        assert parsed.returncode == 0, f"{script}: {parsed.stderr}"


def test_the_cloud_config_passes_yamllint_and_cloud_init_schema(
    tmp_path: Path, secrets: NodeSecrets
) -> None:
    yamllint, cloud_init = require("yamllint"), require("cloud-init")
    settings = str(DEPLOY / ".yamllint.yaml")
    for config in (TEMPLATES / "cloud-config.yaml", rendered(tmp_path, secrets)[1]):
        linted = run(yamllint, "--strict", "-c", settings, str(config))
        assert linted.returncode == 0, f"{config}:\n{linted.stdout}{linted.stderr}"
        schema = run(cloud_init, "schema", "--config-file", str(config))
        assert schema.returncode == 0, f"{config}:\n{schema.stdout}{schema.stderr}"
        assert "Valid cloud-config" in schema.stdout


def system_units() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if (candidate / "multi-user.target").exists():
            return candidate
    pytest.fail("no systemd units on this machine: install the Debian package systemd")


def installed_root(tmp_path: Path, fakebin: FakeBin, secrets: NodeSecrets, unit: str) -> Path:
    """A scratch root where the real installer put ``unit``, plus systemd's own units."""
    root = tmp_path / "root"
    root.mkdir()
    if unit == "homeport-exit.service":
        script, _ = rendered(tmp_path, secrets)
        result = run_script(script, root, fakebin)
    else:
        token = tmp_path / "token"
        token.write_text("t" * 43 + "\n")
        result = run_script(
            TEMPLATES / "install-client.sh",
            root,
            fakebin,
            *("--url", "wss://203.0.113.10:8123", "--fingerprint", "sha256:" + "a" * 64),
            *("--token-file", str(token)),
        )
    assert result.returncode == 0, result.stderr
    shutil.copytree(system_units(), root / "usr/lib/systemd/system", symlinks=True)
    # ExecReload's /bin/kill (procps, on every image the VM boots): verify wants it there.
    kill = root / "bin" / "kill"
    kill.parent.mkdir()
    kill.write_text('#!/bin/sh\nexec /bin/kill "$@"\n')
    kill.chmod(0o755)
    return root


def verify(root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    analyze = require("systemd-analyze")
    return run(analyze, "verify", f"--root={root}", f"/etc/systemd/system/{unit}")


@pytest.mark.parametrize("unit", UNITS)
def test_installed_units_pass_systemd_analyze_verify_silently(
    tmp_path: Path, fakebin: FakeBin, secrets: NodeSecrets, unit: str
) -> None:
    root = installed_root(tmp_path, fakebin, secrets, unit)

    checked = verify(root, unit)

    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == "", "systemd-analyze verify printed something"


def test_verify_output_alone_would_fail_a_unit(
    tmp_path: Path, fakebin: FakeBin, secrets: NodeSecrets
) -> None:
    root = installed_root(tmp_path, fakebin, secrets, "homeport-exit.service")
    unit = root / "etc/systemd/system/homeport-exit.service"
    unit.write_text(unit.read_text().replace("Restart=always", "Restart=sometimes"))

    checked = verify(root, "homeport-exit.service")

    # systemd ignores the bad line and exits 0: only the output tells.
    assert checked.returncode == 0
    assert "restart specifier, ignoring: sometimes" in checked.stdout + checked.stderr


def exposure(unit: Path) -> float:
    analyze = require("systemd-analyze")
    result = run(analyze, "security", "--offline=true", "--no-pager", str(unit))
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout
    return float(match.group(1))


@pytest.mark.parametrize("unit", UNITS)
def test_units_are_hardened_to_an_exposure_of_at_most_2(unit: str) -> None:
    score = exposure(TEMPLATES / unit)
    assert score <= MAX_EXPOSURE, f"{unit} scores {score}"


def test_the_exposure_check_catches_a_bare_unit(tmp_path: Path) -> None:
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/bin/true\n")
    assert exposure(bare) > MAX_EXPOSURE


@pytest.mark.parametrize("name", sorted(COPIES))
def test_the_copies_users_read_equal_the_shipped_templates(name: str) -> None:
    copy = COPIES[name]
    assert copy.read_bytes() == (TEMPLATES / name).read_bytes(), (
        f"{copy.relative_to(ROOT)} differs from the template; "
        f"run: cp {(TEMPLATES / name).relative_to(ROOT)} {copy.relative_to(ROOT)}"
    )


def test_install_client_embeds_the_client_unit_as_shipped() -> None:
    script = template("install-client.sh")
    embedded = script.split("<<'EOF_UNIT'\n", 1)[1].split("EOF_UNIT\n", 1)[0]
    assert embedded == template("homeport-client.service")


def test_install_client_pins_this_release() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "tunnel.version.__version__"
    }
    assert f"PACKAGE='homeport=={__version__}'" in template("install-client.sh")


def test_the_scripts_are_executable() -> None:
    for name in SCRIPTS:
        for path in (TEMPLATES / name, COPIES[name]):
            assert path.stat().st_mode & 0o111, f"{path} is not executable"
