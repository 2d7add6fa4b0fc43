"""homeport.lean: websockets imported without importlib.metadata, which stays loadable."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_fresh(code: str) -> str:
    """Run ``code`` in a new interpreter (nothing imported yet) and return its output."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_server_and_client_import_without_loading_importlib_metadata() -> None:
    out = run_fresh(
        """
        import sys
        from homeport.lean import import_websockets
        import_websockets()
        import server.app, client.app
        print(sorted(name for name in ("websockets", "importlib.metadata", "email", "zipfile")
                     if name in sys.modules))
        import importlib.metadata  # the real one, loaded now
        print(importlib.metadata.version("websockets"), "email" in sys.modules)
        """
    )
    import websockets

    assert out.splitlines() == ["['websockets']", f"{websockets.version.version} True"]


def test_reading_from_the_stand_in_loads_the_real_module() -> None:
    out = run_fresh(
        """
        import sys
        from homeport.lean import METADATA, _StandIn
        stand_in = sys.modules[METADATA] = _StandIn(METADATA)
        from importlib.metadata import version  # reads an attribute: the real module loads
        real = sys.modules[METADATA]
        print(real is not stand_in, version is real.version, version("click") != "")
        """
    )
    assert out.split() == ["True", "True", "True"]


def test_nothing_changes_when_websockets_is_already_imported() -> None:
    out = run_fresh(
        """
        import sys
        import websockets
        from homeport.lean import import_websockets
        import_websockets()
        print("importlib.metadata" in sys.modules)
        """
    )
    assert out.split() == ["True"]
