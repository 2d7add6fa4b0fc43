"""homeport's version, as both sides announce it in HELLO; pyproject.toml reads it from here.

A literal, not importlib.metadata: that import alone pulls in a dozen
modules and a few MiB into every process (docs/performance.md).
"""

from __future__ import annotations

__version__ = "0.1.0"
SOFTWARE = f"homeport/{__version__}"
