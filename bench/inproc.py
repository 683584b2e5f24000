"""Target A: vLLM's `AsyncLLM` driven directly, in this process (no front end at all).

Started by the orchestrator as `python -m bench.inproc --fd N`. The engine
arguments are built from the same ModelOptions the worker's LoadModel gets,
through the worker's own `build_load_plan` (so they are identical), then
`AsyncLLM.from_engine_args` is timed. Requests go in exactly as
backend/engine.py feeds them: the raw prompt through the renderer, greedy,
IgnoreEOS, DELTA output kind.
"""

from __future__ import annotations

import itertools
import sys
import time
from typing import Any

from bench.common import (
    Record,
    Workload,
    child_fd_arg,
    prompt_text,
    run_async,
    run_closed_loop,
    serve_commands,
)
from bench.gcprobe import GcProbe


async def amain(fd: int) -> None:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.renderers.inputs.preprocess import parse_model_prompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from backend.gen import backend_pb2 as pb
    from backend.load_options import build_load_plan
    from backend.vllm_flags import flag_parser

    state: dict[str, Any] = {}
    ids = itertools.count()
    probe: list[GcProbe] = []

    async def load(cmd: dict[str, Any]) -> dict[str, Any]:
        if cmd.get("gc_probe") and not probe:
            probe.append(GcProbe().install())
        plan = build_load_plan(pb.ModelOptions(**cmd["model_options"]), flag_parser())
        args = AsyncEngineArgs(**plan.engine_kwargs)
        started = time.perf_counter()
        llm = AsyncLLM.from_engine_args(args)
        seconds = time.perf_counter() - started
        state["llm"] = llm
        return {
            "op": "loaded",
            "seconds": seconds,
            "engine_kwargs": {k: repr(v) for k, v in sorted(plan.engine_kwargs.items())},
        }

    async def run(cmd: dict[str, Any]) -> dict[str, Any]:
        workload = Workload.from_json(cmd["workload"])
        if workload.kind != "raw":
            raise ValueError("the in-process driver runs raw-prompt workloads only")
        llm = state["llm"]
        model_config, renderer = llm.model_config, llm.renderer

        async def one(i: int, rec: Record) -> None:
            rec.sent = time.perf_counter()
            parsed = parse_model_prompt(model_config, {"prompt": prompt_text(i)})
            (engine_input,) = await renderer.render_cmpl_async([parsed])
            params = SamplingParams(
                output_kind=RequestOutputKind.DELTA,
                max_tokens=workload.tokens,
                temperature=0.0,
                ignore_eos=True,
            )
            stamps = rec.stamps
            async for out in llm.generate(engine_input, params, f"inproc-{next(ids)}"):
                now = time.perf_counter()
                rec.messages += 1
                n = len(out.outputs[0].token_ids)
                if n:
                    stamps.append(now)
                    rec.tokens += n

        return await run_closed_loop(workload, one)

    async def gc_snapshot(cmd: dict[str, Any]) -> dict[str, Any]:
        return probe[0].snapshot() if probe else {}

    async def shutdown(cmd: dict[str, Any]) -> dict[str, Any]:
        llm = state.pop("llm", None)
        if llm is not None:
            llm.shutdown()
        return {"op": "stopped"}

    try:
        await serve_commands(
            fd, {"load": load, "run": run, "gc": gc_snapshot, "shutdown": shutdown}
        )
    finally:
        llm = state.pop("llm", None)
        if llm is not None:
            llm.shutdown()


def main() -> None:
    run_async(amain(child_fd_arg(sys.argv)))


if __name__ == "__main__":  # vLLM spawns processes that re-import __main__
    main()
