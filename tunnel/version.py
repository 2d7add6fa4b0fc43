"""The installed homeport version, as both sides announce it in HELLO."""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("homeport")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"

SOFTWARE = f"homeport/{__version__}"
