"""Importing websockets without ``importlib.metadata``, which it imports and never uses.

``websockets/version.py`` begins with ``import importlib.metadata`` and calls
it only to describe a development version: a release never does. Loading it
costs 2.7 MiB of resident memory in every homeport process (it brings email,
zipfile, csv, bz2, lzma, tempfile and shutil), a tenth of an idle exit
server. So while websockets is first imported, ``sys.modules`` holds a
stand-in for it, which loads the real module the moment anything reads from
it; afterwards the stand-in is gone, and a later ``import
importlib.metadata`` loads the real one as usual. (``importlib.util.LazyLoader``
cannot do this: the import statement reads the module's spec, which loads
it at once.)
"""

from __future__ import annotations

import importlib
import sys
import types

METADATA = "importlib.metadata"


class _StandIn(types.ModuleType):
    """Loads the real module, and answers from it, when anything is read from it."""

    def __getattr__(self, name: str) -> object:
        if sys.modules.get(METADATA) is self:
            del sys.modules[METADATA]
        return getattr(importlib.import_module(METADATA), name)


def import_websockets() -> None:
    """Import websockets, leaving ``importlib.metadata`` unloaded unless it is used."""
    if "websockets" in sys.modules or METADATA in sys.modules:
        return
    stand_in = _StandIn(METADATA)  # its __spec__ is None: an import takes it as loaded
    sys.modules[METADATA] = stand_in
    try:
        import websockets  # noqa: F401
    finally:
        if sys.modules.get(METADATA) is stand_in:
            del sys.modules[METADATA]
