"""GenerationRequest → what the engine is given: the prompt, rendered.

A chat goes through vLLM's `OnlineRenderer` — the object vLLM's OpenAI server
renders chats with — so templates, tool definitions, `tool_choice` constraints
and the parsers' request adjustments (`adjust_request`: a structural tag in
place of the grammar, `skip_special_tokens`) are exactly those of `vllm serve`.
A raw prompt is tokenized as it is. Media are decoded and placed here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backend import media
from backend.errors import FailedPrecondition

if TYPE_CHECKING:
    from backend.model import LoadedModel
    from backend.request import GenerationRequest


@dataclass(frozen=True, slots=True)
class Rendered:
    engine_input: Any
    prompt_token_ids: list[int]
    # vLLM's ChatCompletionRequest after the parsers adjusted it (None: raw prompt)
    chat: Any | None = None
    template_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # what the output is constrained with, as vLLM left it (None: nothing)
    structured_outputs: Any = None
    skip_special_tokens: bool | None = None


async def render(model: LoadedModel, req: GenerationRequest) -> Rendered:
    engine = model.engine
    if engine.pooling:
        raise FailedPrecondition(
            "this model was loaded for embeddings/scoring (Embeddings or Reranking set): "
            "it cannot generate text"
        )
    if req.chat is None:
        mm_data = await media.multi_modal_data(req, engine.media_limits())
        engine_input = await engine.render_prompt(req.prompt, mm_data)
        return Rendered(
            engine_input,
            list(engine_input.get("prompt_token_ids") or ()),
            structured_outputs=req.structured_outputs,
        )
    chat = req.chat
    messages = await media.with_media(chat.messages, req, engine.media_limits())
    body: dict[str, Any] = {
        "messages": messages,
        "stream": req.stream,
        "chat_template_kwargs": chat.template_kwargs,
    }
    if chat.tools:
        body["tools"] = chat.tools
        body["tool_choice"] = chat.tool_choice.to_openai()
    if req.structured_outputs is not None:
        body["structured_outputs"] = dict(req.structured_outputs)
    vllm_request, engine_input, template_kwargs = await engine.render_chat(model.online, body)
    return Rendered(
        engine_input,
        list(engine_input.get("prompt_token_ids") or ()),
        chat=vllm_request,
        template_kwargs=template_kwargs,
        structured_outputs=vllm_request.structured_outputs,
        skip_special_tokens=(
            chat.skip_special_tokens
            if chat.skip_special_tokens is not None
            else vllm_request.skip_special_tokens
        ),
    )
