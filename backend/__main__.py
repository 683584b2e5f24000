"""`python -m backend --addr HOST:PORT` — the worker's entry point (run.sh calls it).

`python -m backend import-command "vllm serve …"` prints the gateway model
config for a `vllm serve` command instead (`backend/import_command.py`).

vLLM starts its engine in spawned processes, which re-import the main module:
everything runs under the `__main__` guard.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["import-command"]:
        from backend.import_command import main as import_command

        raise SystemExit(import_command(args[1:]))
    from backend.config import parse_config

    config = parse_config(args)
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from backend.server import serve

    loop_factory = None
    if config.event_loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        code = runner.run(serve(config))
    # Everything is stopped (engine processes included); skip the interpreter's
    # teardown, which spends seconds collecting torch/vLLM objects.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
