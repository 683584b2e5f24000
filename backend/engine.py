"""Build, drive and stop `AsyncLLM`: the engine as the rest of the worker sees it.

Everything vLLM-version-specific about starting the engine, feeding it
prompts and reading its tokenizer is here; the servicer sees `Engine`.
Its flags are parsed in `vllm_flags.py`, its processes and shared memory
cleaned up by `engine_processes.py`, its parsers chosen in `parser_choice.py`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, TypeVar

from pydantic import ValidationError
from vllm import PoolingParams, SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.renderers.inputs.preprocess import parse_model_prompt
from vllm.renderers.online_renderer import OnlineRenderer
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.metrics.prometheus import unregister_vllm_metrics

from backend import engine_death, media
from backend.engine_processes import (
    detach_engine_processes,
    reap_children,
    remove_leftover_segments,
    shm_segments,
    shutdown_timeout,
)
from backend.errors import EngineRequestError, InvalidArgument, Unavailable
from backend.load_options import LoadPlan
from backend.start_settings import apply_rope, construct, thread_binding_env

log = logging.getLogger(__name__)


def _pydantic_message(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        where = ".".join(str(x) for x in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts)


def sampling_params(kwargs: dict[str, Any], *, stream: bool) -> SamplingParams:
    """SamplingParams from `backend.sampling` kwargs; vLLM's own checks → INVALID_ARGUMENT."""
    kw = dict(kwargs)
    structured = kw.pop("structured_outputs", None)
    try:
        if isinstance(structured, dict):
            structured = StructuredOutputsParams(**structured)
        if structured is not None:
            kw["structured_outputs"] = structured
        # DELTA: vLLM hands us only what is new, and merges outputs a slow
        # consumer has not read yet. FINAL_ONLY for unary calls: one output.
        kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        return SamplingParams(output_kind=kind, **kw)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"invalid sampling parameters: {e}") from None
    except Exception as e:
        if type(e).__name__ == "VLLMValidationError":
            raise InvalidArgument(f"invalid sampling parameters: {e}") from None
        raise


_Out = TypeVar("_Out")


# What a request the engine aborted on its own is told (no Free/LoadModel/shutdown
# in progress): vLLM aborts requests it cannot serve further.
CUT_BY_ENGINE = "the engine aborted this request before it finished: its output is incomplete"


class Engine:
    """A started `AsyncLLM` and what we read from it once."""

    def __init__(self, llm: AsyncLLM, plan: LoadPlan, load_seconds: float) -> None:
        self.llm = llm
        self.plan = plan
        self.load_seconds = load_seconds
        self.model_config = llm.model_config
        self.max_model_len: int = llm.model_config.max_model_len
        self.tokenizer: Any = llm.get_tokenizer()
        self.renderer = llm.renderer
        self.vocab_size: int = len(self.tokenizer)
        self._shm_before: set[str] = set()
        # Why this engine is being stopped (Free, a replacing LoadModel,
        # shutdown), set before its requests are aborted: a request the stop
        # cuts is answered with this, never with a reply that looks complete.
        self.closing: str | None = None
        # Its death (if it dies) was logged: once, by whoever saw it first.
        self.death_reported = False

    @classmethod
    async def start(cls, plan: LoadPlan) -> Engine:
        """Start the engine without blocking the event loop.

        AsyncLLM's constructor blocks for the whole engine start (seconds to
        minutes); it runs in a thread so Health/Status keep answering. vLLM
        supports construction outside a running loop: its output tasks start
        lazily, and we start them as soon as we are back on the loop.
        """
        started = time.monotonic()
        if plan.rope is not None:
            await asyncio.to_thread(apply_rope, plan)
        try:
            args = AsyncEngineArgs(**plan.engine_kwargs)
        except TypeError as e:
            raise InvalidArgument(f"bad engine arguments: {e}") from None
        shm_before = shm_segments()
        detach_engine_processes()
        engine_death.install()
        env = thread_binding_env(plan)
        # In asyncio's default executor, whose threads live as long as the loop:
        # the engine core dies with the thread that forked it (PR_SET_PDEATHSIG,
        # engine_processes.detach_engine_processes).
        starting = asyncio.get_running_loop().run_in_executor(None, construct, args, env)
        try:
            llm = await asyncio.shield(starting)
        except asyncio.CancelledError:
            # The LoadModel was cancelled (deadline, client gone, shutdown) but
            # the start cannot be interrupted: wait for it (the caller still
            # holds the load lock, so no second engine starts meanwhile) and
            # stop the engine, so none outlives the request that asked for it.
            log.warning(
                "LoadModel cancelled during engine start (deadline or client gone): "
                "the engine is stopped once up; give LoadModel a longer deadline"
            )
            try:
                orphan = await asyncio.shield(starting)
            except Exception:
                raise asyncio.CancelledError() from None  # the start failed: nothing to stop
            with engine_death.stopping():
                await asyncio.to_thread(orphan.shutdown, shutdown_timeout())
            await asyncio.to_thread(reap_children)
            raise
        try:
            llm._run_output_handler()
            # Without this, an engine that dies before the first request is
            # only noticed when that request arrives.
            llm.engine_core._ensure_output_queue_task()  # type: ignore[attr-defined]
            # vLLM asks the engine core for its supported tasks on the first
            # request and caches them; asked now, no request ever waits on the
            # core before it is registered (and so can be aborted) in the
            # front end.
            await llm.get_supported_tasks()
            engine = cls(llm, plan, time.monotonic() - started)
            engine._shm_before = shm_before
            if plan.rope is not None:
                # Read back from the engine's own config: what it derived.
                hf = llm.model_config.hf_config
                if getattr(hf, "rope_parameters", None) is None:
                    hf = hf.get_text_config()
                log.info(
                    "LoadModel: the engine uses rope_parameters %s, max_model_len %d",
                    hf.rope_parameters,
                    engine.max_model_len,
                )
        except BaseException:
            with engine_death.stopping():
                await _stop_output_handler(llm)
                await asyncio.to_thread(llm.shutdown, shutdown_timeout())
            raise
        return engine

    def sampling_params(self, kwargs: dict[str, Any], *, stream: bool) -> SamplingParams:
        return sampling_params(kwargs, stream=stream)

    @property
    def errored(self) -> bool:
        return bool(self.llm.errored)

    def death_cause(self) -> str:
        return engine_death.death_cause(self.llm)

    @property
    def num_unfinished(self) -> int:
        return int(self.llm.get_num_unfinished_requests())

    async def render_prompt(self, text: str, mm_data: dict[str, Any] | None = None) -> Any:
        """Raw prompt text → engine input (tokenized off the event loop by vLLM)."""
        prompt: dict[str, Any] = {"prompt": text}
        if mm_data:
            if not self.model_config.is_multimodal_model:
                raise InvalidArgument(
                    f"model {self.model_config.model} takes no images/videos/audio"
                )
            prompt["multi_modal_data"] = mm_data
        parsed = parse_model_prompt(self.model_config, prompt)
        try:
            (engine_input,) = await self.renderer.render_cmpl_async([parsed])
        except (AssertionError, ValueError) as e:
            images = (mm_data or {}).get("image", [])
            mapped = media.processor_error(e, images, self.media_placeholder())
            if mapped is None:
                raise
            raise mapped from None
        return engine_input

    def media_limits(self) -> dict[str, int]:
        """Items per prompt the model takes, per modality ({} for a text-only
        model): what it supports, capped by Limit*PerPrompt, as vLLM's own
        `validate_num_items` computes it."""
        processor = self.renderer.mm_processor
        if processor is None:
            return {}
        info = processor.info
        limits = {}
        for modality, supported in info.supported_mm_limits.items():
            allowed = info.allowed_mm_limits.get(modality, 0)
            limits[modality] = allowed if supported is None else min(supported, allowed)
        return limits

    def online_renderer(
        self, chat_template: str | None, tool_parser: str | None, reasoning_parser: str | None
    ) -> OnlineRenderer:
        """The chat front half of vLLM's OpenAI server, built once per model."""
        online = OnlineRenderer(
            model_config=self.model_config,
            renderer=self.renderer,
            request_logger=None,
            chat_template=chat_template,
            chat_template_content_format="auto",
            # Without this vLLM drops the tool parser entirely.
            enable_auto_tools=True,
            # tool_choice "none" means the model is not offered the tools.
            exclude_tools_when_tool_choice_none=True,
            tool_parser=tool_parser,
            reasoning_parser=reasoning_parser,
        )
        online.warmup()
        return online

    async def render_chat(
        self, online: OnlineRenderer, body: dict[str, Any]
    ) -> tuple[ChatCompletionRequest, Any, dict[str, Any]]:
        """OpenAI chat body → (validated request, engine input, template kwargs).

        The request object is mutated by the parsers' `adjust_request`
        (structured-output tags, skip_special_tokens); callers read it after.
        """
        try:
            req = ChatCompletionRequest.model_validate(body)
        except ValidationError as e:
            raise InvalidArgument(f"invalid chat request: {_pydantic_message(e)}") from None
        template_kwargs = online.effective_chat_template_kwargs(req)
        try:
            result = await online.render_chat(req)
        except (AssertionError, ValueError) as e:
            mapped = media.processor_error(
                e, media.images_in(body["messages"]), self.media_placeholder()
            )
            if mapped is None:
                raise
            raise mapped from None
        if isinstance(result, ErrorResponse):
            raise InvalidArgument(result.error.message)
        _, engine_inputs = result
        return req, engine_inputs[0], template_kwargs

    def generate(
        self, engine_input: Any, params: SamplingParams, request_id: str, **kwargs: Any
    ) -> AsyncIterator[RequestOutput]:
        # vLLM aborts the request itself when this generator is cancelled or
        # closed (CancelledError/GeneratorExit → abort): cancellation of the
        # RPC task is all it takes, so nothing here swallows it.
        return self.llm.generate(engine_input, params, request_id, **kwargs)

    def ensure_complete(self, out: _Out | None) -> _Out:
        """Raise Unavailable unless `out` is the engine's final output of a
        request that ran to its end (EOS, stop, length): vLLM ends an aborted
        request with finish_reason "abort" (Free, shutdown, its own aborts),
        and a generator that stops without a finished output was cut too.
        finish_reason "error" raises EngineRequestError, naming vLLM's error."""
        aborted = out is None or not getattr(out, "finished", False)
        if not aborted:
            outputs = getattr(out, "outputs", None)
            if isinstance(outputs, list):
                if any(c.finish_reason == "error" for c in outputs):
                    error = getattr(out, "error", None)
                    what = f"{error.code}: {error.message}" if error else 'finish_reason "error"'
                    raise EngineRequestError(
                        f"the engine failed this request ({what}); it can be sent again: "
                        "its output is incomplete"
                    )
                aborted = any(c.finish_reason == "abort" for c in outputs)
            else:  # a pooling output: an aborted one carries an empty tensor
                data = getattr(outputs, "data", None)
                aborted = data is not None and data.numel() == 0
        if aborted:
            raise Unavailable(self.closing or CUT_BY_ENGINE)
        assert out is not None
        return out

    async def _abort_running(self) -> int:
        """Abort every unfinished request in the front end first: vLLM then
        hands each its final "abort" output itself, whatever state the engine
        core is in (busy, hung, already dead), instead of leaving them to the
        core's teardown. Returns how many there were."""
        running = list(self.llm.output_processor.request_states)
        if not running:
            return 0
        try:
            async with asyncio.timeout(5.0):
                await self.llm.abort(running, internal=True)
        except Exception as e:  # a dead core: the front end has ended them already
            log.info("aborting %d unfinished request(s) in a dead engine: %r", len(running), e)
        return len(running)

    @property
    def pooling(self) -> bool:
        return self.model_config.runner_type == "pooling"

    async def supported_tasks(self) -> tuple[str, ...]:
        return tuple(await self.llm.get_supported_tasks())

    async def pool(
        self, engine_input: Any, task: str, request_id: str, extra: dict[str, Any] | None = None
    ) -> Any:
        """One pooling request (embed / token_embed / classify) → its output."""
        final = None
        params = PoolingParams(task=task, extra_kwargs=extra)  # type: ignore[arg-type]
        async for out in self.llm.encode(engine_input, params, request_id):
            final = out
        return self.ensure_complete(final)

    async def prompt_logprobs(self, token_ids: list[int], request_id: str) -> list[float | None]:
        """log p(token_i | tokens before i) for every position (None at 0)."""
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        async for out in self.llm.generate({"prompt_token_ids": token_ids}, params, request_id):
            final = out
        positions = self.ensure_complete(final).prompt_logprobs
        if positions is None:
            raise RuntimeError("the engine returned no prompt logprobs")
        values: list[float | None] = []
        for token, position in zip(token_ids, positions, strict=False):
            entry = position.get(token) if position else None
            values.append(entry.logprob if entry is not None else None)
        return values

    def lora_request(self, name: str, index: int, path: str) -> LoRARequest:
        return LoRARequest(lora_name=name, lora_int_id=index + 1, lora_path=path)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=True))

    def ensure_fits(self, ids: Sequence[int], what: str) -> None:
        """INVALID_ARGUMENT naming `what` when `ids` exceed the context. Score and
        Rerank check every input before sending any, so none of a request's
        engine requests runs when one of its inputs cannot."""
        if len(ids) > self.max_model_len:
            raise InvalidArgument(
                f"{what} is {len(ids)} tokens, over the context length {self.max_model_len}"
            )

    def chat_template(self, override: str | None) -> str | None:
        """The Jinja template chats are rendered with (None: the model has none)."""
        from vllm.renderers.hf import resolve_chat_template

        try:
            return resolve_chat_template(
                self.tokenizer, override, None, model_config=self.model_config
            )
        except (ValueError, TypeError):
            return None

    def template_accepts(self, template: str, key: str) -> bool:
        """Whether the template reads `key` (vLLM drops kwargs it does not)."""
        from vllm.renderers.hf import resolve_chat_template_kwargs

        return key in resolve_chat_template_kwargs(self.tokenizer, template, {key: True})

    def render_template(self, template: str, messages: list[dict[str, Any]], **kwargs: Any) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                messages,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=True,
                **kwargs,
            )
        )

    def media_placeholder(self) -> str:
        """The text the model expects in the prompt per image ('' if text-only)."""
        if not self.model_config.is_multimodal_model:
            return ""
        from vllm.model_executor.model_loader import get_model_cls

        model_cls = get_model_cls(self.model_config)
        for modality in ("image", "video", "audio"):
            get = getattr(model_cls, "get_placeholder_str", None)
            marker = get(modality, 1) if get is not None else None
            if marker:
                return str(marker)
        return ""

    def encode_pair(self, first: str, second: str) -> tuple[list[int], int]:
        """A cross-encoder's (query, document) input: the pair's token ids and
        the index of the document's first token (its token_type_ids, as vLLM's
        /rerank passes them: `TokensPrompt(token_type_ids=...)` is ignored)."""
        enc = self.tokenizer(first, second)
        ids = list(enc["input_ids"])
        types = list(enc.get("token_type_ids") or [])
        second_at = types.index(1) if 1 in types else len(ids)
        return ids, second_at

    def decode_token(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    def detokenize(self, ids: Sequence[int]) -> str:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InvalidArgument(
                f"token ids out of vocabulary (size {self.vocab_size}): {bad[:10]}"
            )
        return str(self.tokenizer.decode(list(ids)))

    async def shutdown(self) -> float:
        """Stop the engine in the order vLLM's own servers do; returns the seconds it took.

        1. Its unfinished requests are aborted in the front end: each caller
           gets its final "abort" output at once and sees `closing`.
        2. vLLM's output handler (the task that reads the core's outputs) is
           cancelled and has ended before the core is touched. vLLM's
           `AsyncLLM.shutdown` stops the core first and cancels the handler
           last, from the thread it runs in; with the event loop free in
           between, the handler read the core's end as a death and logged an
           EngineDeadError traceback at every Free, LoadModel switch and
           shutdown that lost that race (issue 26). vLLM's servers call it on
           the event loop, blocking it for the whole stop; we cannot (Health and
           Status answer during a stop), so we end the handler first.
        3. Requests registered meanwhile are aborted too (none should be:
           the servicer refuses new ones before the stop).
        4. The core is stopped (`AsyncLLM.shutdown`, in a thread), its
           processes reaped, its shared memory removed, its metrics dropped.
        """
        started = time.monotonic()
        llm = self.llm
        with engine_death.stopping():
            await self._abort_running()
            await _stop_output_handler(llm)
            await self._abort_running()
            try:
                await asyncio.to_thread(llm.shutdown, shutdown_timeout())
            except Exception as e:
                # The engine may already be dead; its processes are gone either way.
                log.info("stopping an engine that had already failed: %r", e)
        del llm
        # Its `vllm:*` collectors stay on prometheus_client's REGISTRY until
        # the next AsyncLLM replaces them; a freed worker exports none.
        unregister_vllm_metrics()
        await asyncio.to_thread(reap_children)
        await asyncio.to_thread(remove_leftover_segments, self._shm_before)
        gc.collect()
        return time.monotonic() - started


async def _stop_output_handler(llm: AsyncLLM) -> None:
    """Cancel vLLM's output handler task and wait until it has ended."""
    handler = llm.output_handler
    if handler is not None and not handler.done():
        handler.cancel()
        # asyncio.wait, not `await handler`: the handler's CancelledError must
        # not be mistaken for (or hide) a cancellation of this task.
        await asyncio.wait([handler])
