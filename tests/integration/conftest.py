"""The chat options live in tests/conftest.py with the `loaded` fixture; they are
imported from here too (tests/e2e/harness.py, test_soak)."""

from __future__ import annotations

from tests.conftest import CHAT_OPTIONS

__all__ = ["CHAT_OPTIONS"]
