"""How long one event-loop turn may spend handling frames, over all connections.

Frames are handled as they are read, and a read can hold thousands: 256 KiB of
small HEADERS is ~13,000 requests, and a header block of many fields takes
~0.6 ms to decode with hpack. Handled at once, one peer's read stalled every
other connection (the gateway's Health, every token stream) for up to a
second. Each connection asks the server's one `Pacer` after every frame; once
the turn's TURN_S is spent, it stops reading and goes on in a later turn,
behind whatever else was ready (connection.Connection._frames).
"""

from __future__ import annotations

import asyncio
import time

TURN_S = 0.004


class Pacer:
    def __init__(self) -> None:
        self.started = 0.0
        self.open = False  # a turn is being spent (it ends at the next loop iteration)

    def spent(self) -> bool:
        """Whether this loop turn's frame-handling time is used up."""
        now = time.perf_counter()
        if not self.open:
            self.open = True
            self.started = now
            asyncio.get_running_loop().call_soon(self._next_turn)
            return False
        return now - self.started > TURN_S

    def _next_turn(self) -> None:
        self.open = False
