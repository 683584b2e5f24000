"""finish_reason "error": a request vLLM failed is never answered as complete.

vLLM ends a request with finish_reason "error" (no tokens) when its engine core
lacks a multimodal item its front end's processor cache says was sent; the front
end drops the entry and expects the request to be sent again (found by a shuffled
run of test_vision, which checks it against the real engine). Here, with a
stand-in engine: the worker prepares (renders) and runs such a request once more
when it produced nothing; otherwise the call fails UNAVAILABLE naming it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from backend import generation
from backend.engine import Engine as RealEngine
from backend.errors import EngineRequestError
from backend.gen import backend_pb2 as pb
from backend.model import LoadedModel
from backend.request import GenerationRequest
from tests.unit.test_pipeline import Engine as PipelineEngine


class Engine(PipelineEngine):
    """test_pipeline's stand-in engine, with the real completeness check; each
    generate() call plays the next script: a list of (text, finish_reason)."""

    ensure_complete = RealEngine.ensure_complete  # the real check, on these outputs

    def __init__(self, *scripts: list[tuple[str, str | None]]) -> None:
        super().__init__()
        self.scripts = list(scripts)
        self.renders = 0

    async def render_prompt(self, text: str, mm_data: Any = None) -> dict[str, Any]:
        self.renders += 1
        return await super().render_prompt(text, mm_data)

    async def generate(self, engine_input: Any, params: Any, request_id: str, **kw: Any):
        script = self.scripts.pop(0)
        for i, (text, reason) in enumerate(script):
            ids = [7] if text else []
            completion = SimpleNamespace(
                text=text, token_ids=ids, logprobs=None, finish_reason=reason
            )
            yield SimpleNamespace(
                outputs=[completion],
                finished=i == len(script) - 1,
                prompt_token_ids=[1, 2, 3],
                metrics=None,
            )


MISSING_ITEM = [("", "error")]  # what vLLM sends for the cache miss
ANSWER = [("Hel", None), ("lo", "length")]


def _generate(engine: Engine, stream: bool) -> tuple[pb.Reply | BaseException, list, list]:
    model = LoadedModel(engine, "m", online=None, parser_cls=None, parsers=(None, None))
    req = GenerationRequest.from_proto(pb.PredictOptions(Prompt="hi", Tokens=2), stream=stream)
    sent: list[pb.Reply] = []
    counted: list[tuple[int, int]] = []

    async def send(reply: pb.Reply) -> None:
        sent.append(reply)

    async def go() -> pb.Reply:
        return await generation.generate(
            model, req, "req-1", send if stream else None, count=lambda *n: counted.append(n)
        )

    try:
        result: pb.Reply | BaseException = asyncio.run(go())
    except EngineRequestError as e:
        result = e
    return result, sent, counted


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
def test_a_request_failed_before_any_token_is_prepared_and_run_again_once(stream):
    engine = Engine(MISSING_ITEM, ANSWER)
    reply, sent, counted = _generate(engine, stream)
    assert isinstance(reply, pb.Reply), reply
    assert engine.renders == 2  # rendered again: the image itself goes this time
    assert reply.tokens == 2
    if stream:  # (a unary request gets its text whole from vLLM, at the end)
        assert b"".join(r.message for r in sent) + reply.message == b"Hello"
    assert counted == [(3, 2)]  # the last attempt only, once


def test_a_second_failure_is_unavailable_naming_it():
    engine = Engine(MISSING_ITEM, MISSING_ITEM)
    error, sent, counted = _generate(engine, stream=True)
    assert isinstance(error, EngineRequestError), error
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert 'finish_reason "error"' in str(error) and "incomplete" in str(error)
    assert engine.renders == 2 and not sent
    assert counted == [(3, 0)]


def test_a_failure_after_tokens_were_produced_is_not_run_again():
    engine = Engine([("Hel", None), ("", "error")], ANSWER)
    error, sent, _ = _generate(engine, stream=True)
    assert isinstance(error, EngineRequestError), error
    assert engine.renders == 1
    assert [r.message for r in sent] == [b"Hel"]  # what was sent stays; no usage follows
    assert all(r.tokens == 0 for r in sent)
