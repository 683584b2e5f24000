"""PredictOptions → GenerationRequest: a generation request decoded and checked once.

This is the only module that reads a `PredictOptions` for generation (Predict,
PredictStream): the converters it calls take plain values — sampling fields
(`sampling.sampling_kwargs`), the chat (`prompts.chat_input`), the LoRA choice
(`lora.METADATA_KEY`). Media stay base64 strings here; the render step decodes
them where it places them. What comes out is frozen: later steps read it and
never write it back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from backend import lora, prompts, sampling
from backend.errors import InvalidArgument
from backend.gen import backend_pb2 as pb


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    stream: bool
    identity: str  # ModelIdentity: the model the caller means ("" any)
    correlation_id: str
    prompt: str  # a raw prompt ("" for a chat)
    chat: prompts.ChatInput | None  # UseTokenizerTemplate with Messages
    images: tuple[str, ...] = ()
    videos: tuple[str, ...] = ()
    audios: tuple[str, ...] = ()
    # SamplingParams keyword arguments the caller set (sampling.py's table);
    # model defaults, the parsers' adjustments and the context clamp come later.
    sampling: Mapping[str, Any] = field(default_factory=dict)
    # Grammar as structured-output kwargs ({"json": schema} | {"grammar": text}).
    structured_outputs: Mapping[str, Any] | None = None
    top_logprobs: int | None = None  # None: no logprobs
    lora: str = ""  # Metadata["lora_adapter"]: "" the default adapter, "none", a name
    source: pb.PredictOptions | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_proto(cls, request: pb.PredictOptions, *, stream: bool) -> GenerationRequest:
        """Decode and check; bad input raises InvalidArgument naming the field."""
        chat = None
        if request.UseTokenizerTemplate:
            chat = prompts.chat_input(
                request.Messages, request.Tools, request.ToolChoice, request.Metadata
            )
        elif not request.Prompt:
            raise InvalidArgument(
                "Prompt is empty (set Prompt, or UseTokenizerTemplate with Messages)"
            )
        kw = sampling_of(request)
        structured = kw.pop("structured_outputs", None)
        return cls(
            stream=stream,
            identity=request.ModelIdentity,
            correlation_id=request.CorrelationId,
            prompt=request.Prompt if chat is None else "",
            chat=chat,
            images=tuple(request.Images),
            videos=tuple(request.Videos),
            audios=tuple(request.Audios),
            sampling=kw,
            structured_outputs=structured,
            top_logprobs=kw.get("logprobs"),
            lora=request.Metadata.get(lora.METADATA_KEY, "").strip(),
            source=request,
        )

    def describe(self) -> str:
        """The request as received, for --debug-requests (prompts may be private)."""
        from google.protobuf import text_format

        if self.source is None:
            return repr(self)
        return str(text_format.MessageToString(self.source, as_one_line=True))[:4000]


def sampling_of(request: Any) -> dict[str, Any]:
    """The sampling fields of a PredictOptions (sampling.py has their table)."""
    return sampling.sampling_kwargs(
        tokens=request.Tokens,
        temperature=request.Temperature,
        top_p=request.TopP,
        top_k=request.TopK,
        min_p=request.MinP,
        penalty=request.Penalty,
        frequency_penalty=request.FrequencyPenalty,
        presence_penalty=request.PresencePenalty,
        seed=request.Seed,
        stop=request.StopPrompts,
        ignore_eos=request.IgnoreEOS,
        logit_bias=request.LogitBias,
        logprobs=request.Logprobs,
        top_logprobs=request.TopLogprobs,
        typical_p=request.TypicalP,
        grammar=request.Grammar,
    )
