"""bench.interpreter picks the Python the tunnel runs on: the system's, as deployed, else ours."""

from __future__ import annotations

import importlib.metadata
import os
import sys
import sysconfig
from pathlib import Path

import pytest

from bench import interpreter
from bench.errors import BenchError
from bench.interpreter import own_python, tunnel_python

# A stand-in for another interpreter: it answers the probe as a different
# CPython would, and `-m venv DIR` links DIR/bin/python to ours, so the
# venv's pip step runs our own pip (every pinned version already satisfied).
FAKE_PYTHON = """#!/bin/sh
if [ "$1" = "-c" ]; then
    printf '3 11 True\\n3.11.2 (main, Apr 28 2025) [GCC 12.2.0]\\n/usr\\n{headers}\\n'
elif [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin" && ln -s "{ours}" "$3/bin/python"
    echo venv >> "{log}"
else
    exit 2
fi
"""


def _fake(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "python3"
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_our_own_interpreter_is_used_as_it_is() -> None:
    python = tunnel_python(Path(sys.executable))
    assert python == own_python()
    assert python.own
    assert python.executable == Path(sys.executable)


def test_without_a_system_python_the_tunnel_runs_on_ours(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(interpreter, "SYSTEM_PYTHON", tmp_path / "missing")
    assert tunnel_python(None) == own_python()


def test_a_system_python_older_than_3_11_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = _fake(
        tmp_path, "#!/bin/sh\nprintf '3 9 True\\n3.9.2 (default)\\n/usr\\n/usr/include\\n'\n"
    )
    monkeypatch.setattr(interpreter, "SYSTEM_PYTHON", old)
    assert tunnel_python(None) == own_python()


@pytest.mark.parametrize(
    "script", ["#!/bin/sh\nexit 1\n", "#!/bin/sh\nprintf '3 9 True\\nx\\ny\\nz\\n'\n"]
)
def test_a_chosen_python_that_will_not_do_is_a_clear_error(tmp_path: Path, script: str) -> None:
    with pytest.raises(BenchError, match=r"--python .*: not a Python 3\.11 or newer"):
        tunnel_python(_fake(tmp_path, script))


def test_another_python_gets_a_venv_of_its_own_made_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "calls"
    headers = sysconfig.get_paths()["include"]  # ours: Python.h is there
    other = _fake(tmp_path, FAKE_PYTHON.format(ours=sys.executable, log=log, headers=headers))
    monkeypatch.setattr(interpreter, "VENVS", tmp_path / "venvs")

    python = tunnel_python(other)
    again = tunnel_python(other)

    assert not python.own
    assert python.description == f"CPython 3.11.2 ({other})"
    assert python.executable.parent.parent.parent == tmp_path / "venvs"
    assert os.path.realpath(python.executable) == os.path.realpath(sys.executable)
    assert again == python
    assert log.read_text() == "venv\n"  # made once, then kept
    stamp = (python.executable.parent.parent / "bench-requirements.txt").read_text()
    assert f"websockets=={importlib.metadata.version('websockets')}" in stamp.split("\n")


def test_every_dependency_of_homeport_is_pinned_to_the_version_we_run() -> None:
    pinned = dict(line.split("==") for line in interpreter._requirements())
    assert set(pinned) >= {"websockets", "aiohttp", "httptools", "cryptography", "click", "uvloop"}
    assert all(version == importlib.metadata.version(name) for name, version in pinned.items())
