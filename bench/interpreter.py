"""The Python the tunnel runs on in the benchmark: the one it runs on where it is deployed.

The exit node (``deploy/civo-exit-node/cloud-config.yaml``) and the Pi
(``pi/install-client.sh``) install homeport into a venv of the system's
``python3``: Debian's, Ubuntu's or Raspberry Pi OS's build, optimised with
profile-guided and link-time optimisation and with libpython linked into
the executable. The Python that runs the benchmark may be another: this
VM's ``.venv`` comes from a pyenv build with neither, and the tunnel runs
4-6 % slower on it (docs/performance.md). So the benchmark runs the exit
server, the client and the two bare relays on the system's ``python3`` when
it is 3.11 or newer, in a venv of its own under ``build/`` holding the same
versions of homeport's dependencies as the benchmark's own environment.
``--python`` picks another interpreter; where there is no system Python
new enough, the benchmark's own runs them, and the report says which ran.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Final, NamedTuple

from bench.errors import BenchError
from bench.processes import run_bounded
from bench.tools import install_packages

_REPO_ROOT: Final = Path(__file__).resolve().parents[1]
#: What ``python3 -m venv`` makes on the exit node and on the Pi.
SYSTEM_PYTHON: Final = Path("/usr/bin/python3")
VENVS: Final = _REPO_ROOT / "build" / "bench-python"
OLDEST: Final = (3, 11)
PROBE_TIMEOUT_S: Final = 30.0
SETUP_TIMEOUT_S: Final = 900.0
# Prints what tells two interpreters apart, whether venv can make a venv with
# pip, and where its headers are (for the compiled build).
_PROBE: Final = (
    "import sys, sysconfig, importlib.util as u; "
    "print(sys.version_info[0], sys.version_info[1], u.find_spec('ensurepip') is not None); "
    "print(sys.version.replace(chr(10), ' ')); print(sys.base_prefix); "
    "print(sysconfig.get_paths()['include'])"
)


@dataclass(frozen=True)
class TunnelPython:
    """The interpreter that runs the tunnel's processes."""

    executable: Path
    #: for the report: "CPython 3.11.2 (/usr/bin/python3.11)"
    description: str
    #: the benchmark's own interpreter (its compiled build is ``build/compiled``)
    own: bool


class _Probe(NamedTuple):
    version: tuple[int, int]
    has_ensurepip: bool
    #: sys.version and sys.base_prefix: the same for two paths to one interpreter
    identity: str
    headers: Path


def own_python() -> TunnelPython:
    """The interpreter running the benchmark."""
    version = sys.version.split()[0]
    return TunnelPython(Path(sys.executable), f"CPython {version} ({sys.executable})", own=True)


def tunnel_python(choice: Path | None) -> TunnelPython:
    """The interpreter for the tunnel: ``choice``, else the system's ``python3``, else ours.

    Any interpreter but ours gets a venv under ``build/bench-python/`` with
    homeport's dependencies at the versions we run (made once, kept while
    they stay the same); ``python3-venv`` and ``python3-dev`` (the headers the
    compiled build needs) are installed first where Debian left them out.

    Raises:
        BenchError: ``choice`` is not a Python 3.11 or newer, or its venv
            could not be made.
    """
    base = choice if choice is not None else SYSTEM_PYTHON
    probe = _probe(base)
    if probe is None or probe.version < OLDEST:
        if choice is not None:
            raise BenchError(f"--python {choice}: not a Python {OLDEST[0]}.{OLDEST[1]} or newer")
        return own_python()
    if probe.identity == f"{sys.version.replace(chr(10), ' ')}\n{sys.base_prefix}":
        return own_python()
    if not probe.has_ensurepip:
        install_packages(f"venv for {base}", ["python3-venv"])
    if not (probe.headers / "Python.h").exists():
        install_packages(f"Python's headers for {base}", ["python3-dev"])
    key = f"{base.resolve()}\n{probe.identity}"
    venv = VENVS / hashlib.sha256(key.encode()).hexdigest()[:12]
    python = venv / "bin" / "python"
    if not python.exists():
        _setup(f"{base} -m venv", [str(base), "-m", "venv", str(venv)])
    wanted = _requirements()
    stamp = venv / "bench-requirements.txt"
    if not stamp.exists() or stamp.read_text() != "\n".join(wanted):
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        _setup("pip install (the tunnel's venv)", [*pip, *wanted])
        stamp.write_text("\n".join(wanted))
    described = f"CPython {probe.identity.split()[0]} ({base.resolve()})"
    return TunnelPython(python, described, own=False)


def _probe(base: Path) -> _Probe | None:
    """What the interpreter ``base`` is, or None where it does not run."""
    if not base.exists():
        return None
    code, stdout, _ = run_bounded(
        "python probe", [str(base), "-c", _PROBE], PROBE_TIMEOUT_S, _REPO_ROOT
    )
    lines = stdout.splitlines()
    if code != 0 or len(lines) != 4:
        return None
    major, minor, ensurepip = lines[0].split()
    identity = f"{lines[1]}\n{lines[2]}"
    return _Probe((int(major), int(minor)), ensurepip == "True", identity, Path(lines[3]))


def _requirements() -> list[str]:
    """homeport's dependencies, each pinned to the version the benchmark runs with.

    Raises:
        BenchError: one of them is not installed here.
    """
    listed = tomllib.loads((_REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = []
    for requirement in listed:
        name = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]
        try:
            pinned.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            raise BenchError(f"{name} is not installed in the benchmark's environment") from None
    return pinned


def _setup(name: str, args: list[str]) -> None:
    """Run one step of making the venv.

    Raises:
        BenchError: it failed or ran past ``SETUP_TIMEOUT_S``.
    """
    code, stdout, stderr = run_bounded(name, args, SETUP_TIMEOUT_S, _REPO_ROOT)
    if code != 0:
        raise BenchError(f"{name} failed: {(stdout + stderr).strip()[-800:]}")
