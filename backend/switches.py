"""One true/false vocabulary for every switch the worker reads: environment
variables, Options switches (`--enable-prefix-caching:false`) and request
Metadata (`enable_thinking`). Case and surrounding spaces do not matter.

What an empty value means is the caller's choice: an empty environment
variable is as good as unset (its default), a bare Options switch is on, and
an empty Metadata value is no answer at all.
"""

from __future__ import annotations

TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
FALSE_WORDS = frozenset({"0", "false", "no", "off"})


def switch(value: str | None, *, empty: bool | None) -> bool | None:
    """True / False for a word of the vocabulary, `empty` for None or blank,
    None for anything else (the caller names the setting in its error)."""
    text = (value or "").strip().lower()
    if not text:
        return empty
    if text in TRUE_WORDS:
        return True
    if text in FALSE_WORDS:
        return False
    return None
