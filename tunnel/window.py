"""Per-stream credit accounting for the receiving side (protocol.md §6).

The receiver grants the sender a window of bytes. Bytes arriving use it up;
bytes the consumer has *read* are given back in WINDOW_UPDATE frames. Credit
returns on reading, not on arrival, so a consumer that stops reading stops
its sender after at most one window, and nothing else on the session waits.
"""

from __future__ import annotations

import math

from tunnel.errors import ErrorCode, ProtocolError
from tunnel.frames import MAX_WINDOW_BYTES

#: A window update is sent once this fraction of the window has been consumed:
#: fewer, larger updates than per-read ones, early enough that a sender reading
#: its credit never stalls while the receiver keeps up.
UPDATE_THRESHOLD_DIVISOR = 4


class ReceiveWindow:
    """Credit granted to the peer on one stream, and consumed bytes not yet returned."""

    __slots__ = ("available", "held", "size", "threshold", "unacknowledged", "updated_at")

    def __init__(self, size: int) -> None:
        if not 0 < size <= MAX_WINDOW_BYTES:
            raise ValueError(f"window size must be in 1..{MAX_WINDOW_BYTES}")
        self.size = size
        #: bytes the peer may still send
        self.available = size
        #: bytes received and not yet consumed
        self.held = 0
        #: bytes consumed and not yet returned to the peer
        self.unacknowledged = 0
        self.threshold = max(1, size // UPDATE_THRESHOLD_DIVISOR)
        #: when the last WINDOW_UPDATE went out, in the multiplexer's clock
        #: (auto-tuning, :meth:`tunnel.mux.Multiplexer.acknowledge`); never yet
        self.updated_at = -math.inf

    def receive(self, stream_id: int, length: int) -> None:
        """Account for ``length`` bytes arriving.

        Raises:
            ProtocolError: FLOW_CONTROL_ERROR if the peer sent more than its credit.
        """
        if length > self.available:
            raise ProtocolError(
                ErrorCode.FLOW_CONTROL_ERROR,
                f"stream {stream_id}: {length} bytes received "
                f"with {self.available} bytes of credit",
            )
        self.available -= length
        self.held += length

    def consume(self, length: int) -> int:
        """Account for the consumer reading ``length`` bytes.

        Returns the increment to send in a WINDOW_UPDATE now, or 0 to wait.

        Raises:
            ValueError: more bytes consumed than were received (a local bug).
        """
        if length > self.held:
            raise ValueError(f"consumed {length} bytes with only {self.held} held")
        self.held -= length
        self.unacknowledged += length
        if self.unacknowledged < self.threshold:
            return 0
        increment = self.unacknowledged
        self.unacknowledged = 0
        self.available += increment
        return increment
