"""A loaded model: the started engine and what every request on it needs.

`LoadedModel` is made once per LoadModel (`validate` checks everything that
can be checked before the slow engine start, `load` starts it) and holds what
the request pipeline reads: the engine, vLLM's chat renderer, the parsers
(`Parsers`), the model's generation defaults and LoRA adapters. The requests
themselves go through `backend/generation.py`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from typing import Any

from backend import engine as eng
from backend import lora, model_imports, vllm_flags
from backend.gen import backend_pb2 as pb
from backend.load_options import LoadPlan, build_load_plan, describe
from backend.output.state import Parsers
from backend.parser_choice import (
    choose_parsers,
    import_tool_parser_plugin,
    known_parsers,
    model_family,
    parser_check,
)

log = logging.getLogger(__name__)


class LoadedModel:
    def __init__(
        self,
        engine: eng.Engine,
        identity: str,
        online: Any,
        parser_cls: Any | None,
        parsers: tuple[str | None, str | None],
    ) -> None:
        self.engine = engine
        self.identity = identity
        self.online = online  # vLLM's OnlineRenderer (None for a pooling model)
        self.tool_parser, self.reasoning_parser = parsers
        self.chat_template: str | None = None
        adapters, self._lora_dir = lora.scaled_copies(engine.plan.settings.lora_adapters)
        self.adapters = adapters
        self.lora_requests = [
            engine.lora_request(a.name, i, a.path) for i, a in enumerate(adapters)
        ]
        self.parsers = Parsers(
            parser_cls,
            engine.tokenizer,
            engine.model_config,
            # Added tokens (<think>, <tool_call>, ...): OutputState gives each its own delta.
            {i: t for t, i in engine.tokenizer.get_added_vocab().items()},
        )
        # generation_config.json's sampling defaults (sampling.finalize picks
        # the ones a request may inherit)
        self.defaults: dict[str, Any] = dict(engine.model_config.get_diff_sampling_param())

    @classmethod
    async def validate(cls, request: pb.ModelOptions) -> tuple[LoadPlan, str | None]:
        """Everything about a LoadModel that can be checked without starting
        the engine: a request that fails here leaves the serving model alone."""
        parser = await asyncio.to_thread(vllm_flags.flag_parser)
        plan = build_load_plan(request, parser)
        for warning in plan.warnings:
            log.warning("LoadModel: %s", warning)
        settings = plan.settings
        if settings.tool_parser_plugin:
            await asyncio.to_thread(import_tool_parser_plugin, settings.tool_parser_plugin)
        known_tool, known_reasoning = known_parsers()
        # Parsers are decided and checked against the tokenizer here, before
        # the (slow) engine start: an explicit one that cannot work fails
        # now, an automatic one that cannot is dropped with a warning.
        model_type, architectures, tokenizer = await asyncio.to_thread(model_family, plan)
        await asyncio.to_thread(model_imports.check_importable, architectures)
        plan.parsers = choose_parsers(
            settings.tool_parser,
            settings.reasoning_parser,
            model_type=model_type,
            architectures=architectures,
            name=plan.model,
            known_tool=known_tool,
            known_reasoning=known_reasoning,
            check=parser_check(tokenizer) if tokenizer is not None else None,
            vocab=tokenizer.get_vocab() if tokenizer is not None else None,
        )
        if plan.parsers[1]:
            # As `vllm serve --reasoning-parser` does (build_load_plan does it
            # for an explicit one): grammars then apply after the reasoning.
            plan.engine_kwargs.setdefault("reasoning_parser", plan.parsers[1])
        _eager_without_compiler(plan)
        return plan, _read_template(settings.chat_template)

    @classmethod
    async def load(
        cls, request: pb.ModelOptions, plan: LoadPlan, chat_template: str | None
    ) -> LoadedModel:
        if plan.engine_kwargs.get("trust_remote_code"):
            log.warning("trust_remote_code is ON: the model's own Python code will run")
        log.info("loading %s: %s", plan.model, describe(plan.engine_kwargs))
        engine = await eng.Engine.start(plan)
        try:
            if engine.pooling:
                model = cls(engine, request.Model or plan.model, None, None, (None, None))
                log.info("model %s ready for pooling in %.1fs", plan.model, engine.load_seconds)
                return model
            parsers = plan.parsers or (None, None)
            online = engine.online_renderer(chat_template, *parsers)
            model = cls(engine, request.Model or plan.model, online, online.parser, parsers)
            model.chat_template = chat_template
        except BaseException:
            await engine.shutdown()
            raise
        log.info("model %s ready in %.1fs", plan.model, engine.load_seconds)
        return model

    def summary(self) -> str:
        if self.engine.pooling:
            return f"loaded {self.identity} for pooling in {self.engine.load_seconds:.1f}s"
        return (
            f"loaded {self.identity} in {self.engine.load_seconds:.1f}s "
            f"(max_model_len {self.engine.max_model_len}, tool parser "
            f"{self.tool_parser or 'none'}, reasoning parser {self.reasoning_parser or 'none'})"
        )

    async def close(self) -> None:
        await self.engine.shutdown()
        if self._lora_dir:
            shutil.rmtree(self._lora_dir, ignore_errors=True)


def _eager_without_compiler(plan: LoadPlan) -> None:
    """Without a C++ compiler, torch.compile (vLLM's default graph mode) fails
    at engine start; the gateway host often has none. Eager mode needs none
    (the packaged worker is tested that way on a host without g++), so it is
    chosen instead, with a warning, unless the user set enforce_eager."""
    if "enforce_eager" in plan.engine_kwargs:
        return
    if os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++"):
        return
    plan.engine_kwargs["enforce_eager"] = True
    log.warning("LoadModel: no C++ compiler found (torch.compile needs one): using eager mode")


def _read_template(value: str | None) -> str | None:
    """`chat_template` option: a path to a file, or the template itself."""
    if not value:
        return None
    if len(value) < 4096 and os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            return f.read()
    return value
