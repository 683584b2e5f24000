"""One PredictStream request followed through the worker's code (issue 24).

The servicer is driven in-process with a stand-in engine (what vLLM returns
does not matter here, only which of our modules the request passes through):

* the request's `PredictOptions` is read in one module, `backend/request.py`
  (every attribute read of it is recorded with the module that made it);
* the steps are entered once each, in order: decode (request.py) → render
  (render.py) → finalize sampling (sampling.finalize) → output state
  (output/state.py) → the engine loop and replies (generation.run, replies.py),
  and none of the earlier steps is entered again once a later one began.
"""

from __future__ import annotations

import asyncio
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from backend.config import ServerConfig
from backend.gen import backend_pb2 as pb
from backend.model import LoadedModel
from backend.servicer import BackendServicer


class RecordingRequest:
    """A PredictOptions that records which module reads each field."""

    def __init__(self, request: pb.PredictOptions, reads: list[tuple[str, str]]) -> None:
        object.__setattr__(self, "_request", request)
        object.__setattr__(self, "_reads", reads)

    def __getattr__(self, name: str) -> Any:
        module = sys._getframe(1).f_globals.get("__name__", "?")
        self._reads.append((module, name))
        return getattr(self._request, name)


class Engine:
    """What the request path asks of `backend.engine.Engine`, answered trivially."""

    pooling = False
    errored = False
    closing = None
    max_model_len = 1024

    def __init__(self) -> None:
        self.plan = SimpleNamespace(settings=SimpleNamespace(lora_adapters=[]))
        self.tokenizer = SimpleNamespace(get_added_vocab=dict, decode=lambda ids: "x")
        self.model_config = SimpleNamespace(get_diff_sampling_param=dict, served_model_name="m")

    def media_limits(self) -> dict[str, int]:
        return {}

    async def render_prompt(self, text: str, mm_data: Any = None) -> dict[str, Any]:
        return {"prompt_token_ids": [1, 2, 3]}

    async def render_chat(self, online: Any, body: dict[str, Any]) -> Any:
        chat = SimpleNamespace(structured_outputs=None, skip_special_tokens=True, tools=None)
        return chat, {"prompt_token_ids": [1, 2, 3]}, {}

    def sampling_params(self, kwargs: dict[str, Any], *, stream: bool) -> dict[str, Any]:
        return kwargs

    def ensure_complete(self, out: Any) -> Any:
        return out

    async def generate(self, engine_input: Any, params: Any, request_id: str, **kw: Any):
        for i, text in enumerate(["Hel", "lo", "!"]):
            completion = SimpleNamespace(text=text, token_ids=[i], logprobs=None)
            yield SimpleNamespace(
                outputs=[completion], finished=i == 2, prompt_token_ids=[1, 2, 3], metrics=None
            )


def _model() -> LoadedModel:
    return LoadedModel(Engine(), "m", online=None, parser_cls=None, parsers=(None, None))


STEPS = {
    "backend.request": "decode",
    "backend.render": "render",
    "backend.sampling.finalize": "finalize sampling",  # the decode step uses sampling's table
    "backend.output.state": "output state",
    "backend.replies": "replies",
}


def _step(frame: Any) -> str | None:
    module = frame.f_globals.get("__name__", "")
    return STEPS.get(module) or STEPS.get(f"{module}.{frame.f_code.co_name}")


@pytest.mark.parametrize("chat", [False, True], ids=["raw prompt", "chat"])
def test_a_predict_stream_request_passes_each_step_once_in_order(chat):
    servicer = BackendServicer(ServerConfig())
    servicer.model = _model()
    reads: list[tuple[str, str]] = []
    if chat:
        proto = pb.PredictOptions(
            UseTokenizerTemplate=True, Messages=[pb.Message(role="user", content="hi")]
        )
    else:
        proto = pb.PredictOptions(Prompt="hi", Tokens=8)
    request = RecordingRequest(proto, reads)
    sent: list[pb.Reply] = []
    entered: list[str] = []

    def profile(frame, event, arg):
        if event == "call":
            step = _step(frame)
            if step and (not entered or entered[-1] != step):
                entered.append(step)

    async def write(reply: pb.Reply) -> None:
        sent.append(reply)

    context = SimpleNamespace(write=write)
    sys.setprofile(profile)
    try:
        asyncio.run(servicer.PredictStream(request, context))  # type: ignore[arg-type]
    finally:
        sys.setprofile(None)

    assert b"".join(r.message for r in sent) == b"Hello!"
    assert {module for module, _ in reads} == {"backend.request"}, reads
    # The per-token loop alternates output state and replies; before it, each
    # step comes once, in order.
    first_reply = entered.index("replies")
    assert entered[:first_reply] == ["decode", "render", "finalize sampling", "output state"]
    assert set(entered[first_reply:]) == {"output state", "replies"}
