"""A copy of this checkout with its hot modules compiled, as ``HOMEPORT_COMPILE=1`` installs them.

    python scripts/compiled_tree.py [DEST]      (default: build/compiled)

Builds homeport's wheel with ``HOMEPORT_COMPILE=1`` (pip, in an isolated
build environment, exactly as a user's install builds it), copies the
checkout's tracked files to DEST and puts the wheel's compiled modules
beside their sources there. Python imports a compiled module in place of
its ``.py``, so anything run from DEST (``python -m homeport``, pytest) runs
the compiled build. ``make test`` runs the protocol, exit-server and
end-to-end tests there too, and ``make bench`` measures the tunnel from it.

The wheel is kept under ``build/`` by a hash of what its compiled modules
are built from, and rebuilt only when that changes; each interpreter's
builds apart (``make test`` and ``make bench`` may use two). The last step
checks that every module ``[tool.homeport] compiled`` lists is imported from
its compiled file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / "build" / "compiled-wheels"
#: What the compiled modules are built from: the packages' sources (mypyc reads
#: the types of what the compiled modules import) and the build's own files.
PACKAGES = ("tunnel/", "server/", "client/", "homeport/")
BUILD_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "build_backend/homeport_build.py")


def tracked_files() -> list[str]:
    """The checkout's files as git knows them (a tarball without .git: every file)."""
    if (ROOT / ".git").exists():
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
        ).stdout
        return [name for name in listed.decode().split("\0") if name]
    skip = {".venv", "build", ".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".hypothesis"}
    return [
        str(path.relative_to(ROOT))
        for path in ROOT.rglob("*")
        if path.is_file() and not skip.intersection(path.relative_to(ROOT).parts)
    ]


def interpreter_key() -> str:
    """This interpreter, as a directory name: its version, build and installation."""
    return hashlib.sha256(f"{sys.version}\n{sys.base_prefix}".encode()).hexdigest()[:12]


def source_hash(files: list[str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(files):
        if (name.endswith(".py") and name.startswith(PACKAGES)) or name in BUILD_FILES:
            digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    return digest.hexdigest()[:16]


def unlisted_extensions(wheel: Path, modules: list[str]) -> list[str]:
    """Compiled modules in ``wheel`` that the list does not name: an earlier build's."""
    listed = {module.removesuffix(".py") for module in modules}
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    with zipfile.ZipFile(wheel) as archive:
        return [
            name
            for name in archive.namelist()
            if "/" in name and name.endswith(suffix) and name.removesuffix(suffix) not in listed
        ]


def build_wheel(files: list[str], modules: list[str]) -> Path:
    """The compiled wheel of this checkout, built unless one of the same sources is kept."""
    mine = WHEELS / interpreter_key()
    kept = mine / source_hash(files)
    wheels = list(kept.glob("*.whl")) if kept.is_dir() else []
    if wheels and not unlisted_extensions(wheels[0], modules):
        return wheels[0]
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.exists():
        sys.exit(f"compiled_tree: {headers} is missing: install python3-dev (Debian) first")
    shutil.rmtree(mine, ignore_errors=True)  # this interpreter's older builds
    # setuptools builds in ROOT/build/lib.* and packs all it finds there into the
    # wheel: an extension of an earlier build (a module since dropped from the
    # list, a group of modules since renamed) would ride along and be imported
    # in place of the source.
    for stale in [*ROOT.glob("build/lib.*"), *ROOT.glob("build/bdist.*")]:
        shutil.rmtree(stale, ignore_errors=True)
    print(f"compiled_tree: building the compiled wheel in {kept} (a minute or two)", flush=True)
    env = {**os.environ, "HOMEPORT_COMPILE": "1"}
    command = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(kept), "."]
    subprocess.run(command, cwd=ROOT, env=env, check=True)
    wheel = next(kept.glob("*.whl"))
    if stale := unlisted_extensions(wheel, modules):
        sys.exit(f"compiled_tree: {wheel} holds modules not listed: {', '.join(stale)}")
    return wheel


def check_compiled(dest: Path, modules: list[str]) -> None:
    """Fail unless each module, imported from DEST, comes from its compiled file."""
    names = [module.removesuffix(".py").replace("/", ".") for module in modules]
    probe = (
        "import importlib, sys\n"
        "for name in sys.argv[1:]:\n"
        "    path = importlib.import_module(name).__file__\n"
        "    if not path.endswith('.so'):\n"
        "        sys.exit(f'{name} was imported from {path}, not from its compiled file')\n"
    )
    subprocess.run([sys.executable, "-c", probe, *names], cwd=dest, check=True)


def main() -> int:
    dest = Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT / "build" / "compiled"
    modules = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["homeport"]["compiled"]
    files = tracked_files()
    wheel = build_wheel(files, modules)
    shutil.rmtree(dest, ignore_errors=True)
    for name in files:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, dest / name)
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.namelist():
            if member.endswith(".so"):
                archive.extract(member, dest)
    check_compiled(dest, modules)
    print(f"compiled_tree: {dest} runs the compiled build ({len(modules)} modules)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
