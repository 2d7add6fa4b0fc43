"""homeport's build backend: setuptools' own, asking for mypy when HOMEPORT_COMPILE=1.

setup.py compiles the hot modules with mypyc when ``HOMEPORT_COMPILE=1``;
mypyc is part of mypy, and it reads the types of what those modules import,
so a compiled build needs mypy and homeport's own dependencies where it
runs. A pure build (the default) needs setuptools alone. An editable install
is always pure: compiled modules in the source tree would shadow every edit.
"""

from __future__ import annotations

import os
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the rest of the backend, unchanged)

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
#: mypyc is in mypy; the test extra pins the same range.
MYPY = "mypy>=1.13"


def _compiling() -> bool:
    return os.environ.get("HOMEPORT_COMPILE", "0") == "1"


def _pure(hook: Callable[..., Any], *args: Any) -> Any:
    """Call one of setuptools' hooks as if HOMEPORT_COMPILE were 0."""
    wanted = os.environ.get("HOMEPORT_COMPILE")
    os.environ["HOMEPORT_COMPILE"] = "0"
    try:
        return hook(*args)
    finally:
        if wanted is None:
            del os.environ["HOMEPORT_COMPILE"]
        else:
            os.environ["HOMEPORT_COMPILE"] = wanted


def get_requires_for_build_wheel(config_settings: dict[str, Any] | None = None) -> list[str]:
    # setuptools runs setup.py to answer, before mypy is installed: as a pure build.
    requires: list[str] = _pure(_setuptools.get_requires_for_build_wheel, config_settings)
    if not _compiling():
        return requires
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return [*requires, MYPY, *dependencies]


def prepare_metadata_for_build_wheel(
    metadata_directory: str, config_settings: dict[str, Any] | None = None
) -> str:
    # The metadata are the same either way: no need to compile twice.
    name: str = _pure(
        _setuptools.prepare_metadata_for_build_wheel, metadata_directory, config_settings
    )
    return name


def get_requires_for_build_sdist(config_settings: dict[str, Any] | None = None) -> list[str]:
    # An sdist is the sources: nothing to compile.
    requires: list[str] = _pure(_setuptools.get_requires_for_build_sdist, config_settings)
    return requires


def build_sdist(sdist_directory: str, config_settings: dict[str, Any] | None = None) -> str:
    name: str = _pure(_setuptools.build_sdist, sdist_directory, config_settings)
    return name


def build_editable(
    wheel_directory: str,
    config_settings: dict[str, Any] | None = None,
    metadata_directory: str | None = None,
) -> str:
    if _compiling():
        sys.stderr.write("homeport: an editable install is pure Python (HOMEPORT_COMPILE)\n")
    name: str = _pure(
        _setuptools.build_editable, wheel_directory, config_settings, metadata_directory
    )
    return name
