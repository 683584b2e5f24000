"""engine.gather_or_cancel: Score and Rerank fan out one engine request per
candidate; when one fails, the others must stop (their engine requests are
aborted by the cancellation), and the first failure is what the caller sees."""

from __future__ import annotations

import asyncio

import pytest

from backend.errors import InvalidArgument
from backend.fanout import gather_or_cancel


def test_results_come_back_in_order():
    async def value(v: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return v

    out = asyncio.run(gather_or_cancel(value(i, 0.01 * (3 - i)) for i in range(3)))
    assert out == [0, 1, 2]


def test_one_failure_cancels_the_siblings_and_is_raised_as_is():
    cancelled: list[int] = []
    started = asyncio.Event

    async def sibling(i: int, running: asyncio.Event) -> int:
        running.set()
        try:
            await asyncio.sleep(3600)  # an engine request that would run on
        except asyncio.CancelledError:
            cancelled.append(i)
            raise
        return i

    async def failing(ready: list[asyncio.Event]) -> int:
        for event in ready:  # fail only once every sibling is provably running
            await event.wait()
        raise InvalidArgument("candidate 2 is bad")

    async def main() -> None:
        ready = [started() for _ in range(2)]
        with pytest.raises(InvalidArgument, match="candidate 2 is bad"):
            await gather_or_cancel([sibling(0, ready[0]), sibling(1, ready[1]), failing(ready)])

    asyncio.run(asyncio.wait_for(main(), 10))
    assert sorted(cancelled) == [0, 1]
