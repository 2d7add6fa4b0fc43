"""homeport's build: pyproject.toml says everything but the compiled modules.

With ``HOMEPORT_COMPILE=1`` in the environment, the modules listed under
``[tool.homeport] compiled`` in pyproject.toml are compiled with mypyc into
C extensions, which Python imports in place of their ``.py`` files: the same
source, type-checked, run as C (docs/performance.md says what it buys).
Without it, and in every editable install, homeport is pure Python.
"""

import os
import sys
import tomllib
from pathlib import Path
from typing import Any

from setuptools import setup

HERE = Path(__file__).resolve().parent


def compiled_modules() -> list[Any]:
    wanted = os.environ.get("HOMEPORT_COMPILE", "0")
    if wanted not in ("0", "1"):
        sys.exit(f"HOMEPORT_COMPILE must be 0 (pure Python) or 1 (compiled), not {wanted!r}")
    if wanted == "0":
        return []
    # In the build's environment: build_backend/homeport_build.py asked for mypy.
    from mypyc.build import mypycify

    pyproject = tomllib.loads((HERE / "pyproject.toml").read_text())
    return mypycify(pyproject["tool"]["homeport"]["compiled"], opt_level="3")


setup(ext_modules=compiled_modules())
