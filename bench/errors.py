"""The one error the benchmark raises: something it needs could not be set up or measured."""

from __future__ import annotations


class BenchError(Exception):
    """A setup step or a measurement failed; the message says which and why.

    ``python -m bench`` prints it on one line and exits with status 1.
    """
