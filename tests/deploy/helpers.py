"""Running the deploy scripts against a scratch root, and the units they install.

The scripts take ``HOMEPORT_ROOT``: every file they write goes under it. The
commands that would change the real machine (apt-get, python3, pip,
systemctl, and env, which runs pip in bootstrap.sh) are fakes first on PATH that record their arguments (with the
root prefix taken off) and, for ``python3 -m venv``, make a venv whose
``bin/homeport`` runs this checkout's homeport. :func:`start_unit` then runs
an installed unit the way systemd would: its ``EnvironmentFile=``, its
``LoadCredential=`` files copied to a credentials directory for ``%d``, its
``StateDirectory=`` made under the root and named in ``$STATE_DIRECTORY``,
and its ``ExecStart=`` command line; :func:`reload_unit` runs its
``ExecReload=`` as ``systemctl reload`` would.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.processes import Process

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "homeport" / "exitnode" / "templates"
DEPLOY = ROOT / "deploy" / "civo-exit-node"

#: Validators and the Debian package that brings each (scripts/system-packages.txt).
VALIDATORS = {
    "shellcheck": "shellcheck",
    "yamllint": "yamllint",
    "cloud-init": "cloud-init",
    "systemd-analyze": "systemd",
}

FAKE = """#!{python} -I
# A fake {{apt-get, python3, pip, systemctl, env}}: record argv, change nothing real.
import json, os, sys
name = os.path.basename(sys.argv[0])
root = os.environ.get("HOMEPORT_ROOT", "")
args = [a[len(root):] if root and a.startswith(root + "/") else a for a in sys.argv[1:]]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps([name, *args]) + "\\n")
if name == "python3" and sys.argv[1:3] == ["-m", "venv"]:
    bin_dir = os.path.join(sys.argv[3], "bin")
    os.makedirs(bin_dir, exist_ok=True)
    for tool in ("python", "pip"):
        os.symlink(sys.argv[0], os.path.join(bin_dir, tool))
    shim = os.path.join(bin_dir, "homeport")
    with open(shim, "w") as file:
        file.write("#!/bin/sh\\nexec {python} -m homeport \\"$@\\"\\n")
    os.chmod(shim, 0o755)
elif name == "python3" and sys.argv[1:2] == ["-c"]:
    if "ensurepip" in sys.argv[2] and os.environ.get("FAKE_PYTHON_NO_VENV"):
        sys.exit(1)
    sys.exit(int(os.environ.get("FAKE_PYTHON_C_EXIT", "0")))
"""


def require(tool: str) -> str:
    """The validator's path; fail (never skip) with the fix when it is missing."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"{tool} is not installed: run ./scripts/system-deps.sh "
            f"(it installs the Debian package {VALIDATORS.get(tool, tool)})"
        )
    return path


@dataclass
class FakeBin:
    """A directory of fake commands and the log they write."""

    path: Path
    log: Path

    def env(self, root: Path, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{self.path}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "FAKE_LOG": str(self.log),
            "HOMEPORT_ROOT": str(root),
            **extra,
        }

    def commands(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def clear(self) -> None:
        self.log.unlink(missing_ok=True)


def make_fakebin(directory: Path) -> FakeBin:
    directory.mkdir(parents=True)
    fake = directory / "fake"
    fake.write_text(FAKE.format(python=sys.executable))
    fake.chmod(0o755)
    for name in ("apt-get", "python3", "systemctl", "env"):
        (directory / name).symlink_to(fake)
    return FakeBin(directory, directory.parent / f"{directory.name}.log")


def run_script(
    script: Path, root: Path, fakebin: FakeBin, *args: str, stdin: str = "", **env: str
) -> subprocess.CompletedProcess[str]:
    """Run a deploy script with bash against ``root``, the fakes first on PATH."""
    return subprocess.run(
        ["bash", str(script), *args],  # noqa: S607 - bash from PATH, as users run it
        input=stdin,
        capture_output=True,
        text=True,
        env=fakebin.env(root, **env),
        timeout=60,
        check=False,
    )


@dataclass(frozen=True)
class Written:
    mode: int
    uid: int
    gid: int
    content: bytes | None  # None for a directory


def snapshot(root: Path, skip: tuple[str, ...] = ("/opt/homeport/venv",)) -> dict[str, Written]:
    """Every file and folder under ``root`` (as absolute paths on the target machine)."""
    seen: dict[str, Written] = {}
    for path in sorted(root.rglob("*")):
        name = "/" + str(path.relative_to(root))
        if name.startswith(skip):
            continue
        info = path.lstat()
        content = path.read_bytes() if stat.S_ISREG(info.st_mode) else None
        seen[name] = Written(stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid, content)
    return seen


def parse_env_file(path: Path) -> dict[str, str]:
    """An ``EnvironmentFile=``: KEY=value lines, values optionally in double quotes."""
    env = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = line.partition("=")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        env[key.strip()] = value
    return env


def unit_settings(text: str) -> list[tuple[str, str]]:
    """The ``Key=value`` lines of a unit file, in order."""
    settings = []
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.append((key.strip(), value.strip()))
    return settings


def start_unit(root: Path, unit: str, work: Path, **extra_env: str) -> Process:
    """Start an installed unit's ExecStart as systemd would: env file, credentials, %d, state."""
    settings = unit_settings((root / "etc/systemd/system" / unit).read_text())
    credentials = work / f"credentials-{unit}"
    credentials.mkdir(mode=0o700)
    env = {"PYTHONDONTWRITEBYTECODE": "1", **extra_env}
    command: list[str] = []
    for key, value in settings:
        if key == "EnvironmentFile":
            env.update(parse_env_file(root / value.lstrip("/")))
        elif key == "LoadCredential":
            name, _, source = value.partition(":")
            target = credentials / name
            shutil.copyfile(root / source.lstrip("/"), target)
            target.chmod(0o400)
        elif key == "StateDirectory":
            state = root / "var/lib" / value
            state.mkdir(mode=0o700, parents=True, exist_ok=True)
            env["STATE_DIRECTORY"] = str(state)
        elif key == "ExecStart":
            command = shlex.split(value.replace("%d", str(credentials)))
    assert command, f"{unit} has no ExecStart"
    command[0] = str(root / command[0].lstrip("/"))
    env["CREDENTIALS_DIRECTORY"] = str(credentials)
    return Process(unit, command, env).start()


def reload_unit(root: Path, unit: str, process: Process) -> None:
    """Run an installed unit's ExecReload= for its running main process (``$MAINPID``)."""
    settings = dict(unit_settings((root / "etc/systemd/system" / unit).read_text()))
    assert "ExecReload" in settings, f"{unit} has no ExecReload"
    command = shlex.split(settings["ExecReload"].replace("$MAINPID", str(process.pid)))
    subprocess.run(command, check=True, timeout=10)
