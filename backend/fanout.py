"""Fan-out of one RPC into engine sub-requests that succeed or fail together."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

_Out = TypeVar("_Out")


async def gather_or_cancel(coros: Iterable[Coroutine[Any, Any, _Out]]) -> list[_Out]:
    """Run engine sub-requests together (one Score/Rerank fans out one per
    candidate); when one fails, the others are cancelled — which aborts their
    engine requests — and that first failure is raised as it is."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coros]
    except BaseExceptionGroup as grouped:
        raise grouped.exceptions[0] from None
    return [t.result() for t in tasks]
