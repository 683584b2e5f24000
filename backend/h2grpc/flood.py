"""A connection's flood accounting, all of it: frames that cost work but carry
no request forward, and the WINDOW_UPDATEs our own DATA earns the peer.

Frames that cost work but carry no request forward (SETTINGS, PRIORITY,
WINDOW_UPDATE, empty DATA or CONTINUATION, unknown types, a client's
RST_STREAM: the rapid-reset attack) are counted per connection: more than
ABUSE_LIMIT of them within ABUSE_WINDOW seconds is a flood, answered with
GOAWAY(ENHANCE_YOUR_CALM) as nghttp2, grpc-go and C-core do. This bounds the
loop time one connection can take.

A WINDOW_UPDATE that returns window for DATA we sent is flow control, not a
flood: each DATA frame sent earns the peer UPDATES_PER_DATA_FRAME uncounted
ones (its stream's and the connection's). Counting them all closed a
well-behaved grpc client reading many token streams at once (C-core sent
1,020 WINDOW_UPDATEs a second on one connection in the soak, on a loaded
machine; more on a quiet one). The credit kept is capped (UPDATE_CREDIT_MAX).

A stream we refuse (RST_STREAM(REFUSED_STREAM): beyond our
SETTINGS_MAX_CONCURRENT_STREAMS, after our GOAWAY) is counted the same way: a
client that follows our SETTINGS gets few, and each costs a decoded header
block and a frame out, read or not.

A compression bomb (messages.py) is a message that inflates far beyond its
size; a connection sending BOMBS_PER_CONNECTION of them is closed with
GOAWAY(ENHANCE_YOUR_CALM): each one's call already ends RESOURCE_EXHAUSTED, but
a peer that keeps sending them is abusing the connection, not making calls.
"""

from __future__ import annotations

import time

from backend.h2grpc.frames import ENHANCE_YOUR_CALM, ConnectionLevelError

ABUSE_LIMIT = 2000
ABUSE_WINDOW = 1.0
UPDATES_PER_DATA_FRAME = 2
UPDATE_CREDIT_MAX = 65_536
BOMBS_PER_CONNECTION = 2


class Flood:
    __slots__ = ("bombs", "count", "credit", "limit", "since", "window")

    def __init__(self, limit: int = ABUSE_LIMIT, window: float = ABUSE_WINDOW) -> None:
        self.limit = limit
        self.window = window
        self.count = 0
        self.since = time.monotonic()
        self.credit = 0  # WINDOW_UPDATEs earned by DATA sent
        self.bombs = 0

    def charge(self) -> None:
        """Count one frame that does no work for a request."""
        self.count += 1
        if self.count > self.limit:
            now = time.monotonic()
            if now - self.since < self.window:
                raise ConnectionLevelError(ENHANCE_YOUR_CALM, "flood of control or empty frames")
            self.count = 1
            self.since = now

    def window_update(self) -> None:
        """A WINDOW_UPDATE arrived: free if earned, else counted."""
        if self.credit > 0:
            self.credit -= 1
        else:
            self.charge()

    def earn(self, data_frames: int) -> None:
        """`data_frames` DATA frames left: the peer may return their window."""
        self.credit = min(self.credit + UPDATES_PER_DATA_FRAME * data_frames, UPDATE_CREDIT_MAX)

    def bomb(self) -> None:
        """A compression bomb arrived."""
        self.bombs += 1
        if self.bombs >= BOMBS_PER_CONNECTION:
            raise ConnectionLevelError(ENHANCE_YOUR_CALM, "compression bombs")
