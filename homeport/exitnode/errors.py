"""The one error the exit-node commands raise: a complete message for the user."""

from __future__ import annotations


class ExitNodeError(Exception):
    """Something the user must know or fix; ``str()`` is the whole message, secret-free."""


class CivoError(ExitNodeError):
    """The Civo API refused or failed a call (mapped once, in :mod:`homeport.exitnode.civo`)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class NotFound(CivoError):
    """The API answered 404 for a resource."""
