"""`python -m backend --addr HOST:PORT` — the worker's entry point (run.sh calls it).

vLLM starts its engine in spawned processes, which re-import the main module:
everything runs under the `__main__` guard.
"""

from __future__ import annotations

import asyncio
import logging
import sys


def main(argv: list[str] | None = None) -> None:
    from backend.config import parse_config

    config = parse_config(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=config.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from backend.server import serve

    asyncio.run(serve(config))


if __name__ == "__main__":
    main()
