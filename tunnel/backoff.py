"""Reconnect delays: capped exponential backoff with jitter (DESIGN.md, principle 7).

Pure: the caller supplies the random source, so tests drive it with a seeded
``random.Random``. After a power cut a whole street of Pis may come back at
once; jitter spreads their reconnects out, and a floor of ``base_s`` keeps
any one of them from spinning.
"""

from __future__ import annotations

import random
from typing import Final

DEFAULT_BASE_DELAY_S: Final = 1.0
DEFAULT_MAX_DELAY_S: Final = 30.0
#: A session that stayed up this long resets the backoff to its base.
DEFAULT_STABLE_AFTER_S: Final = 60.0
#: Delay after the server rejected our token: retrying fast cannot help.
AUTH_FAILURE_DELAY_S: Final = 60.0


class Backoff:
    """Delays before successive reconnect attempts.

    The n-th delay (from 0) is drawn uniformly from
    ``[base, min(max_delay, base * 2**(n + 1))]``: never a tight loop, never
    more than ``max_delay``, and jittered from the first (clients dropped
    together, by an exit server's restart, must not all come back in step).
    """

    def __init__(
        self,
        *,
        base_s: float = DEFAULT_BASE_DELAY_S,
        max_s: float = DEFAULT_MAX_DELAY_S,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < base_s <= max_s:
            raise ValueError("backoff needs 0 < base_s <= max_s")
        self.base_s = base_s
        self.max_s = max_s
        self.attempts = 0
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts one attempt."""
        ceiling = min(self.max_s, self.base_s * 2.0 ** min(self.attempts + 1, 62))
        self.attempts += 1
        return self._rng.uniform(self.base_s, ceiling)

    def reset(self) -> None:
        """Start again from the base delay (after a session that stayed up)."""
        self.attempts = 0
