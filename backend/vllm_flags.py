"""vLLM's own engine-flag parser, for Options[] and `import-command`.

Options entries (`--max-num-seqs:8`, `--no-enable-chunked-prefill`) are parsed by
the argparse definition vLLM's CLI uses (`AsyncEngineArgs.add_cli_args`), so values
are coerced exactly as `vllm serve` coerces them; an unknown flag names the closest
valid one.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from typing import Any

from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.utils.argparse_utils import FlexibleArgumentParser

from backend.errors import InvalidArgument
from backend.load_options import closest
from backend.switches import switch


class _ParserError(Exception):
    pass


class _RaisingParser(FlexibleArgumentParser):
    """vLLM's parser, but errors raise instead of exiting the process."""

    def error(self, message: str):  # type: ignore[override]
        raise _ParserError(message)


class VllmFlagParser:
    """`FlagParser` backed by vLLM's own `EngineArgs` CLI definition.

    Values are coerced exactly as `vllm serve` coerces them (JSON for config
    objects, choices checked, booleans with `--no-` forms). All defaults are
    suppressed so only the flags given come back.
    """

    def __init__(self) -> None:
        parser = _RaisingParser(add_help=False)
        AsyncEngineArgs.add_cli_args(parser)
        self._actions: dict[str, argparse.Action] = {}
        for action in parser._actions:
            action.default = argparse.SUPPRESS
            action.required = False
            for opt in action.option_strings:
                self._actions[opt] = action
        self._parser = parser

        self.field_names = frozenset(f.name for f in dataclasses.fields(AsyncEngineArgs))

    def option_for(self, key: str) -> str | None:
        dashed = key.replace("_", "-")
        for option in ("--" + dashed, "-" + dashed):
            if option in self._actions:
                return option
        return None

    def parse(self, flags: Sequence[tuple[str, str | None]]) -> dict[str, Any]:
        argv: list[str] = []
        direct: dict[str, Any] = {}
        for flag, value in flags:
            action = self._actions.get(flag)
            if action is None:
                raise InvalidArgument(
                    f"unknown vLLM engine flag {flag}{closest(flag, self._actions)}"
                )
            if action.nargs == 0:  # a switch: store_true or BooleanOptionalAction
                on = switch(value, empty=True)  # a bare switch is on
                if on is None:
                    raise InvalidArgument(f"{flag} is a switch; {value!r} is not true/false")
                # `--no-x` stores False for x; `--no-x:false` means x stays on.
                negated = flag.startswith("--no-") and flag[5:].replace("-", "_") == action.dest
                direct[action.dest] = on != negated
                continue
            if value is None or value == "":
                raise InvalidArgument(f"{flag} needs a value")
            argv += [flag, value]
        try:
            parsed = vars(self._parser.parse_args(argv))
        except _ParserError as e:
            raise InvalidArgument(f"bad engine option: {e}") from None
        parsed.update(direct)
        return parsed


_flag_parser: VllmFlagParser | None = None


def flag_parser() -> VllmFlagParser:
    """Built once per process (~1 s: vLLM builds ~250 argparse actions)."""
    global _flag_parser
    if _flag_parser is None:
        _flag_parser = VllmFlagParser()
    return _flag_parser
