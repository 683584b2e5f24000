"""JSON that arrives from the gateway (LogitBias, Grammar schemas, EngineArgs,
Overrides, tool calls, Metadata values), parsed one way everywhere.

`json.loads` raises more than JSONDecodeError on hostile input: ValueError for
integers past Python's digit limit, RecursionError for deep nesting. Both are the
caller's input, so both become INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from backend.errors import InvalidArgument

_BAD_JSON = (ValueError, RecursionError)  # JSONDecodeError is a ValueError


def loads(text: str, what: str) -> Any:
    """Parse `text`, or raise InvalidArgument("<what> is not valid JSON: ...")."""
    try:
        return json.loads(text)
    except _BAD_JSON as e:
        raise InvalidArgument(f"{what} is not valid JSON: {e}") from None


def loads_or_text(text: str) -> Any:
    """`1` → 1, `true` → True, `{"a": 1}` → dict; anything else stays the string."""
    try:
        return json.loads(text)
    except _BAD_JSON:
        return text
