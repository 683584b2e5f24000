"""A loaded model: the engine plus what each request needs prepared.

`prepare` turns one PredictOptions into an engine input, SamplingParams and
a fresh `OutputState`. Chat requests go through vLLM's `OnlineRenderer` —
the object vLLM's OpenAI server renders chats with — so templates, tool
definitions, `tool_choice` constraints and the parsers' request adjustments
(`skip_special_tokens`, structural tags) are exactly those of `vllm serve`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from backend import engine as eng
from backend import lora, media, model_imports, prompts, vllm_flags
from backend.errors import FailedPrecondition, InvalidArgument
from backend.gen import backend_pb2 as pb
from backend.load_options import LoadPlan, build_load_plan, describe
from backend.parser_choice import (
    choose_parsers,
    import_tool_parser_plugin,
    known_parsers,
    model_family,
    parser_check,
)
from backend.parsing import LogprobsSink, OutputState
from backend.replies import Usage, reply
from backend.sampling import sampling_kwargs

log = logging.getLogger(__name__)

# Sampling fields whose unset value falls back to the model's
# generation_config.json, as `vllm serve` does. Temperature is not among
# them: a 0 that reaches us was asked for (see sampling.py).
_GENERATION_DEFAULTS = (
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
)


@dataclass
class Prepared:
    engine_input: Any
    params: Any
    state: OutputState
    chat: bool
    generate_kwargs: dict[str, Any]


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
        self.online = online
        self.parser_cls = parser_cls
        self.tool_parser, self.reasoning_parser = parsers
        self.chat_template: str | None = None
        adapters, self._lora_dir = lora.scaled_copies(engine.plan.settings.lora_adapters)
        self.adapters = adapters
        self.lora_requests = [
            engine.lora_request(a.name, i, a.path) for i, a in enumerate(adapters)
        ]
        # Added tokens (<think>, <tool_call>, ...): OutputState gives each its own delta.
        self.markers = {i: t for t, i in engine.tokenizer.get_added_vocab().items()}
        self.defaults = {
            k: v
            for k, v in engine.model_config.get_diff_sampling_param().items()
            if k in _GENERATION_DEFAULTS
        }

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

    # ---- per request --------------------------------------------------------

    def _sampling(self, request: pb.PredictOptions) -> dict[str, Any]:
        kw = sampling_kwargs(request)
        merged = {k: v for k, v in self.defaults.items() if kw.get(k) is None}
        merged.update({k: v for k, v in kw.items() if v is not None or k not in merged})
        return merged

    def _logprobs(self, kw: dict[str, Any], request: pb.PredictOptions) -> LogprobsSink | None:
        if kw.get("logprobs") is None:
            return None
        tokenizer = self.engine.tokenizer
        return LogprobsSink(top_n=request.TopLogprobs, decode=lambda i: tokenizer.decode([i]))

    def _clamp(self, kw: dict[str, Any], engine_input: Any) -> None:
        """Cap max_tokens at what the context has left, as `vllm serve` does
        (vLLM itself would reject the request instead)."""
        if kw.get("max_tokens") is not None:
            room = self.engine.max_model_len - len(engine_input.get("prompt_token_ids") or ())
            kw["max_tokens"] = max(1, min(kw["max_tokens"], room))

    async def prepare(self, request: pb.PredictOptions, *, stream: bool) -> Prepared:
        prep = await self._prepare(request, stream)
        chosen = lora.choose(self.adapters, request.Metadata)
        if chosen is not None:
            prep.generate_kwargs["lora_request"] = self.lora_requests[chosen]
        return prep

    async def _prepare(self, request: pb.PredictOptions, stream: bool) -> Prepared:
        if self.engine.pooling:
            raise FailedPrecondition(
                "this model was loaded for embeddings/scoring (Embeddings or Reranking set): "
                "it cannot generate text"
            )
        kw = self._sampling(request)
        if request.UseTokenizerTemplate:
            return await self._prepare_chat(request, kw, stream)
        if not request.Prompt:
            raise InvalidArgument(
                "Prompt is empty (set Prompt, or UseTokenizerTemplate with Messages)"
            )
        mm_data = await media.multi_modal_data(request, self.engine.media_limits())
        engine_input = await self.engine.render_prompt(request.Prompt, mm_data)
        self._clamp(kw, engine_input)
        params = eng.sampling_params(kw, stream=stream)
        state = OutputState(None, None, self._logprobs(kw, request))
        return Prepared(engine_input, params, state, chat=False, generate_kwargs={})

    async def _prepare_chat(
        self, request: pb.PredictOptions, kw: dict[str, Any], stream: bool
    ) -> Prepared:
        chat = prompts.chat_input(request)
        await media.attach_to_last_user(chat.messages, request, self.engine.media_limits())
        body: dict[str, Any] = {
            "messages": chat.messages,
            "stream": stream,
            "chat_template_kwargs": chat.template_kwargs,
        }
        if chat.tools:
            body["tools"] = chat.tools
            body["tool_choice"] = chat.tool_choice.to_openai()
        if "structured_outputs" in kw:
            body["structured_outputs"] = kw.pop("structured_outputs")
        req, engine_input, template_kwargs = await self.engine.render_chat(self.online, body)
        # The parsers' request adjustments (adjust_request) live on `req`.
        kw["structured_outputs"] = req.structured_outputs
        kw["skip_special_tokens"] = (
            chat.skip_special_tokens
            if chat.skip_special_tokens is not None
            else req.skip_special_tokens
        )
        self._clamp(kw, engine_input)
        params = eng.sampling_params(kw, stream=stream)
        parser = whole_parser = None
        parser_cls = self.parser_cls
        if parser_cls is not None:

            def new_parser() -> Any:
                return parser_cls(
                    self.engine.tokenizer,
                    req.tools,
                    chat_template_kwargs=template_kwargs,
                    model_config=self.engine.model_config,
                )

            parser = new_parser()
            # A stream also parses its whole text at the end (see OutputState),
            # with a parser of its own: the streaming one carries state.
            whole_parser = new_parser() if stream else None
        state = OutputState(
            parser,
            req,
            self._logprobs(kw, request),
            markers=self.markers,
            whole_parser=whole_parser,
        )
        prompt_ids = engine_input.get("prompt_token_ids")
        state.prompt_token_ids = prompt_ids
        gen_kwargs: dict[str, Any] = {}
        if parser is not None and parser.reasoning_parser is not None:
            gen_kwargs = {
                "reasoning_ended": req.resolve_reasoning_ended(parser, prompt_ids),
                "reasoning_parser_kwargs": {"chat_template_kwargs": template_kwargs},
            }
        return Prepared(engine_input, params, state, chat=True, generate_kwargs=gen_kwargs)

    def unary_reply(self, prep: Prepared, out: Any, started: float) -> pb.Reply:
        completion = out.outputs[0]
        piece = prep.state.parse_whole(completion.text, completion.token_ids, completion.logprobs)
        done = time.monotonic()
        total_ms = (done - started) * 1000.0
        first = getattr(out.metrics, "first_token_latency", 0.0) if out.metrics else 0.0
        prompt_ms = min(first * 1000.0, total_ms) if first else 0.0
        usage = Usage(
            prompt_tokens=len(out.prompt_token_ids or ()),
            completion_tokens=len(completion.token_ids),
            prompt_ms=prompt_ms,
            generation_ms=total_ms - prompt_ms,
        )
        return reply(piece, chat=prep.chat, usage=usage, logprobs=prep.state.all_logprobs())


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
