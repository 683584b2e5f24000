"""One generation: a GenerationRequest prepared in one pass, then one engine loop.

`prepare` runs the steps in order, each reading only what the steps before it
produced: render the prompt (`render.py`) → finalize sampling
(`sampling.finalize` + `engine.sampling_params`) → the output state, which
makes its own parsers (`output/state.py`). `run` is the only engine loop:
Predict and PredictStream both go through it; a stream sends each piece as it
becomes certain, and both end with the Reply `replies.final` builds — for a
unary request that Reply is the whole answer.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backend import lora, replies, sampling
from backend.errors import BackendError, EngineRequestError, Unavailable
from backend.gen import backend_pb2 as pb
from backend.output.state import OutputState
from backend.render import render

if TYPE_CHECKING:
    from backend.engine import Engine
    from backend.model import LoadedModel
    from backend.request import GenerationRequest

log = logging.getLogger(__name__)

Send = Callable[[pb.Reply], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Generation:
    """A request ready for the engine."""

    engine_input: Any
    params: Any  # vLLM SamplingParams
    state: OutputState
    chat: bool  # the Replies carry chat_deltas
    engine_kwargs: dict[str, Any]  # lora_request, reasoning_ended, ...


async def prepare(model: LoadedModel, req: GenerationRequest) -> Generation:
    rendered = await render(model, req)
    engine = model.engine
    kwargs = sampling.finalize(
        req.sampling,
        model.defaults,
        structured_outputs=rendered.structured_outputs,
        skip_special_tokens=rendered.skip_special_tokens,
        prompt_tokens=len(rendered.prompt_token_ids),
        max_model_len=engine.max_model_len,
    )
    params = engine.sampling_params(kwargs, stream=req.stream)
    state = model.parsers.output_state(
        rendered.chat, rendered.template_kwargs, rendered.prompt_token_ids, req.top_logprobs
    )
    engine_kwargs = state.engine_kwargs(rendered.template_kwargs)
    chosen = lora.choose(model.adapters, req.lora)
    if chosen is not None:
        engine_kwargs["lora_request"] = model.lora_requests[chosen]
    return Generation(rendered.engine_input, params, state, req.chat is not None, engine_kwargs)


async def generate(
    model: LoadedModel,
    req: GenerationRequest,
    request_id: str,
    send: Send | None,
    *,
    count: Callable[[int, int], None],
    debug: bool = False,
) -> pb.Reply:
    """`prepare`, then `run`; once more if vLLM failed the request before it
    produced anything.

    vLLM ends a request with finish_reason "error" when its engine core lacks a
    multimodal item that the front end's processor cache says was sent (the
    cache records an image while rendering a request that is then refused, so
    the core never got it); the front end then drops the entry and expects the
    request to be sent again. Rendering it again sends the image itself. Only the
    last attempt's tokens are counted."""
    last = (0, 0)

    def hold(prompt_tokens: int, completion_tokens: int) -> None:
        nonlocal last
        last = (prompt_tokens, completion_tokens)

    try:
        for attempt in (1, 2):
            gen = await prepare(model, req)
            try:
                return await run(model.engine, gen, request_id, send, count=hold, debug=debug)
            except EngineRequestError as failed:
                if attempt == 2 or last[1]:
                    raise
                log.info("request %s: %s; preparing and sending it again once", request_id, failed)
        raise AssertionError("unreachable")
    finally:
        count(*last)


@contextlib.contextmanager
def cut_reported(engine: Engine) -> Iterator[None]:
    """A request cut by its engine's stop fails with the stop's reason, whatever
    the engine raised on the way out (EngineDeadError, a closed queue, ...)."""
    try:
        yield
    except BackendError:
        raise
    except Exception as exc:
        if engine.closing:
            raise Unavailable(engine.closing) from exc
        raise


async def run(
    engine: Engine,
    gen: Generation,
    request_id: str,
    send: Send | None,
    *,
    count: Callable[[int, int], None],
    debug: bool = False,
) -> pb.Reply:
    """Drive the engine to the end; send each certain piece (a stream), return
    the final Reply (usage, the whole completion's logprobs, the last piece).

    `count(prompt_tokens, completion_tokens)` is called once, cut or not."""
    state, chat = gen.state, gen.chat
    # No parser, no logprobs: each delta's text goes out as it is.
    plain_send = send if state.plain else None
    started = time.monotonic()
    first_at = 0.0
    prompt_tokens = completion_tokens = 0
    final = None
    tail = None
    try:
        with cut_reported(engine):
            outputs = engine.generate(gen.engine_input, gen.params, request_id, **gen.engine_kwargs)
            async for out in outputs:
                completion = out.outputs[0]
                ids = completion.token_ids
                completion_tokens += len(ids)
                if not first_at:
                    first_at = time.monotonic()
                    prompt_tokens = len(out.prompt_token_ids or ())
                    if debug:
                        # Seen by the worker, whatever the transport does with
                        # the bytes (tests stop the engine core on it).
                        waited = first_at - started
                        log.info("request %s: first output after %.3fs", request_id, waited)
                if out.finished:
                    # Checked before the output is read: a cut request sends
                    # no last piece and no usage.
                    final = engine.ensure_complete(out)
                    tail = state.feed(completion.text, ids, completion.logprobs, finished=True)
                    continue
                if plain_send is not None:
                    if completion.text:
                        await plain_send(replies.text_reply(completion.text, chat=chat))
                    continue
                piece = state.feed(completion.text, ids, completion.logprobs)
                if piece and send is not None:
                    await send(replies.reply(piece, chat=chat, logprobs=state.chunk_logprobs()))
            engine.ensure_complete(final)
    finally:
        count(prompt_tokens, completion_tokens)
    done = time.monotonic()
    if debug:
        log.info("request %s: generation finished, %d tokens", request_id, completion_tokens)
    usage = replies.usage(
        final,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        started=started,
        first_at=first_at,
        done=done,
    )
    return replies.reply(tail, chat=chat, usage=usage, logprobs=state.all_logprobs())
