"""Property-based tests of the pure modules: any input gives a result or a typed error.

The gateway forwards user input verbatim (Options strings, EngineArgs JSON,
Tools / tool_calls JSON, Metadata, sampling numbers), so the conversion
modules must answer every input with either a value or a `BackendError`
(which the servicer maps to a precise gRPC status). Any other exception
would surface as INTERNAL with a Python traceback in the log.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from backend.errors import BackendError, InvalidArgument
from backend.gen import backend_pb2 as pb
from backend.load_options import build_load_plan, split_option
from backend.output.state import OutputState
from backend.prompts import (
    ROLES,
    convert_messages,
    parse_tool_choice,
    parse_tools,
    template_kwargs,
)
from backend.replies import ChatPiece, ToolCallPiece, merge
from backend.request import GenerationRequest
from backend.request import sampling_of as sampling_kwargs

pytestmark = pytest.mark.reliability

PROPS = settings(
    max_examples=100,
    deadline=None,  # shared 2-core machine: timing noise is not a failure
    database=None,  # no .hypothesis directory in the repo
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ---- strategies ---------------------------------------------------------------------

# Text a user might paste (any unicode, incl. surrogate-free control characters).
text = st.text(max_size=40)
small_text = st.text(max_size=12)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | small_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(small_text, inner, max_size=4),
    max_leaves=12,
)


def _dumps(value: Any) -> str:
    # allow_nan: Python's json emits NaN/Infinity, which json.loads accepts back.
    return json.dumps(value)


# JSON text: well-formed JSON of any shape, truncated JSON, or arbitrary text.
json_text = (
    json_values.map(_dumps)
    | json_values.map(_dumps).flatmap(
        lambda s: st.integers(0, max(0, len(s) - 1)).map(lambda n: s[:n])
    )
    | text
)

TOOL_NAMES = st.sampled_from(["get_weather", "get_time", "", "x" * 3])


@st.composite
def tool_defs(draw) -> Any:
    """Mostly-valid OpenAI tool definitions, with random damage."""
    fn: dict[str, Any] = {"name": draw(TOOL_NAMES | small_text)}
    if draw(st.booleans()):
        fn["parameters"] = draw(json_values | st.just({"type": "object", "properties": {}}))
    tool: Any = {"type": draw(st.sampled_from(["function", "function", "tool"])), "function": fn}
    return draw(st.sampled_from([tool, tool, fn, None]) | json_values)


tools_text = st.lists(tool_defs(), max_size=3).map(_dumps) | json_text | st.just("")


@st.composite
def tool_calls_text(draw) -> str:
    calls = []
    for _ in range(draw(st.integers(0, 2))):
        args = draw(json_values.map(_dumps) | json_text | json_values)
        fn = {"name": draw(TOOL_NAMES | small_text), "arguments": args}
        calls.append(draw(st.sampled_from([{"id": "c1", "type": "function", "function": fn}, fn])))
    return draw(st.sampled_from([_dumps(calls)]) | json_text | st.just(""))


roles = (
    st.sampled_from(sorted(ROLES))
    | st.sampled_from([" User ", "ASSISTANT", "wizard", ""])
    | small_text
)


@st.composite
def messages(draw) -> list[pb.Message]:
    out = []
    for _ in range(draw(st.integers(0, 4))):
        out.append(
            pb.Message(
                role=draw(roles),
                content=draw(text),
                name=draw(small_text),
                tool_call_id=draw(small_text),
                reasoning_content=draw(small_text),
                tool_calls=draw(tool_calls_text()),
            )
        )
    return out


tool_choice_text = (
    st.sampled_from(["", "auto", "none", "required", '"auto"', '"required"', "sometimes"])
    | st.builds(lambda name: _dumps({"type": "function", "function": {"name": name}}), TOOL_NAMES)
    | json_text
)

metadata = st.dictionaries(
    st.sampled_from(["enable_thinking", "chat_template_kwargs", "skip_special_tokens", "other"])
    | small_text,
    st.sampled_from(["true", "false", "True", " yes ", "0", "maybe", ""])
    | json_values.map(_dumps)
    | json_text,
    max_size=4,
)

# float32 fields: hypothesis floats become float32 (overflow → inf) in the message.
floats = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 1.0, -1.0, 2.0])
int32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
small_int = st.integers(-3, 50) | int32


@st.composite
def predict_options(draw) -> pb.PredictOptions:
    return pb.PredictOptions(
        Prompt=draw(text),
        Tokens=draw(small_int),
        Temperature=draw(floats),
        TopP=draw(floats),
        TopK=draw(small_int),
        MinP=draw(floats),
        Penalty=draw(floats),
        FrequencyPenalty=draw(floats),
        PresencePenalty=draw(floats),
        Seed=draw(small_int),
        StopPrompts=draw(st.lists(small_text, max_size=3)),
        IgnoreEOS=draw(st.booleans()),
        LogitBias=draw(
            st.dictionaries(
                st.integers(-5, 200000).map(str) | small_text,
                st.floats(-200, 200) | st.integers(-200, 200) | json_scalars,
                max_size=4,
            ).map(_dumps)
            | json_text
        ),
        Logprobs=draw(small_int),
        TopLogprobs=draw(small_int),
        Grammar=draw(
            st.sampled_from(['root ::= "x"', "", '{"type": "object"}', "[1]", "{"]) | json_text
        ),
        TypicalP=draw(floats),
        UseTokenizerTemplate=draw(st.booleans()),
        Messages=draw(messages()),
        Tools=draw(tools_text),
        ToolChoice=draw(tool_choice_text),
        Metadata=draw(metadata),
    )


def _result_or_backend_error(fn, *args: Any) -> Any:
    """Call fn: a value or a BackendError is fine; anything else fails the property."""
    try:
        return fn(*args)
    except BackendError as e:
        assert e.message, "a typed error must say what is wrong"
        return e


# ---- load_options -----------------------------------------------------------------


class FakeFlagParser:
    """vLLM's flag parser reduced to a table: known flags, strict values.

    Mirrors the contract of `FlagParser`: unknown flag or bad value →
    InvalidArgument; a bare flag (value None) is a switch.
    """

    field_names = frozenset(
        {"max_num_seqs", "enable_prefix_caching", "max_model_len", "hf_overrides", "seed", "dtype"}
    )
    _ints = frozenset({"max_num_seqs", "max_model_len", "seed"})

    def option_for(self, key: str) -> str | None:
        name = key.removeprefix("no_")
        return "--" + key.replace("_", "-") if name in self.field_names else None

    def parse(self, flags):
        out: dict[str, Any] = {}
        for flag, value in flags:
            key = flag[2:].replace("-", "_")
            name = key.removeprefix("no_")
            if value is None:
                out[name] = not key.startswith("no_")
            elif name in self._ints:
                try:
                    out[name] = int(value)
                except ValueError:
                    raise InvalidArgument(f"{flag}: {value!r} is not an integer") from None
            else:
                out[name] = value
        return out


option_entries = (
    st.sampled_from(
        [
            "--enable-prefix-caching",
            "--max-num-seqs:8",
            "--max-num-seqs=8",
            "max_num_seqs:x",
            "--no-enable-prefix-caching",
            "tool_parser:hermes",
            "tool_parser:",
            "reasoning_parser:none",
            "chat_template:{{ messages }}",
            '--hf-overrides={"a": 1}',
            '--hf-overrides:{"a": {"b": 2}}',
            "=x",
            ":x",
            "--",
            "-",
            "key",
            " ",
            "",
        ]
    )
    | text
    | st.tuples(small_text, st.sampled_from([":", "=", " : ", "=:"]), small_text).map("".join)
)


@PROPS
@given(entry=option_entries)
@example(entry="--=:")
@example(entry="-=1")
def test_split_option_returns_a_normalized_pair_or_invalid_argument(entry):
    result = _result_or_backend_error(split_option, entry)
    if isinstance(result, BackendError):
        assert isinstance(result, InvalidArgument)
        return
    key, value = result
    assert not key.startswith("-") and "-" not in key
    # A key that normalizes to "" (the entry "--") is only possible for a
    # bare flag; build_load_plan then rejects it as an unknown engine flag.
    assert key or (value is None and set(entry.strip()) == {"-"})
    assert value is None or value == value.strip()


@st.composite
def model_options(draw) -> pb.ModelOptions:
    return pb.ModelOptions(
        Model=draw(st.sampled_from(["some/model", "", "/nonexistent/dir"]) | small_text),
        ModelFile=draw(st.sampled_from(["", "/tmp"]) | small_text),
        ModelPath=draw(st.sampled_from(["", "/tmp"])),
        ContextSize=draw(small_int),
        MaxModelLen=draw(small_int),
        Seed=draw(small_int),
        DType=draw(st.sampled_from(["", "float32", " auto "]) | small_text),
        Quantization=draw(small_text),
        LoadFormat=draw(small_text),
        GPUMemoryUtilization=draw(floats),
        TrustRemoteCode=draw(st.booleans()),
        EnforceEager=draw(st.booleans()),
        SwapSpace=draw(small_int),
        TensorParallelSize=draw(small_int),
        Tokenizer=draw(small_text),
        DisableLogStatus=draw(st.booleans()),
        LimitImagePerPrompt=draw(small_int),
        LimitVideoPerPrompt=draw(small_int),
        LimitAudioPerPrompt=draw(small_int),
        Options=draw(st.lists(option_entries, max_size=5)),
        EngineArgs=draw(
            st.dictionaries(
                st.sampled_from(sorted(FakeFlagParser.field_names)) | small_text,
                json_values,
                max_size=3,
            ).map(_dumps)
            | json_text
        ),
    )


@PROPS
@given(opts=model_options())
def test_build_load_plan_gives_a_plan_or_invalid_argument(opts):
    plan = _result_or_backend_error(build_load_plan, opts, FakeFlagParser())
    if isinstance(plan, BackendError):
        assert isinstance(plan, InvalidArgument)
        return
    kw = plan.engine_kwargs
    assert kw["model"], "a plan always names the model"
    # trust_remote_code is only ever on when asked for.
    if not opts.TrustRemoteCode and "trust_remote_code" not in opts.EngineArgs:
        assert not kw.get("trust_remote_code")
    if "max_model_len" in kw and isinstance(kw["max_model_len"], int):
        assert kw["max_model_len"] >= 0
    gpu = kw.get("gpu_memory_utilization")
    if gpu is not None and "gpu_memory_utilization" not in opts.EngineArgs:
        assert 0 < gpu <= 1
    for name in ("tool_parser", "reasoning_parser"):
        value = getattr(plan.settings, name)
        assert value is None or value == "" or value.lower() != "none"


# ---- sampling ---------------------------------------------------------------------


@PROPS
@given(req=predict_options())
@example(req=pb.PredictOptions(TopP=float("nan")))
@example(req=pb.PredictOptions(Temperature=float("inf")))
@example(req=pb.PredictOptions(LogitBias='{"1": NaN}'))
@example(req=pb.PredictOptions(LogitBias='{"1": true}'))
@example(req=pb.PredictOptions(LogitBias='{"-1": 1}'))
@example(req=pb.PredictOptions(LogitBias='{" 7 ": 1}'))
def test_sampling_kwargs_are_in_range_or_invalid_argument(req):
    kw = _result_or_backend_error(sampling_kwargs, req)
    if isinstance(kw, BackendError):
        assert isinstance(kw, InvalidArgument)
        return
    # What passes validation is finite and inside vLLM's documented ranges, so
    # SamplingParams never sees a value it would reject for the same reason.
    assert kw["max_tokens"] is None or kw["max_tokens"] > 0
    assert math.isfinite(kw["temperature"]) and kw["temperature"] >= 0
    if "top_p" in kw:
        assert 0 < kw["top_p"] <= 1
    if "top_k" in kw:
        assert kw["top_k"] >= 1
    if "min_p" in kw:
        assert 0 < kw["min_p"] <= 1
    if "repetition_penalty" in kw:
        assert math.isfinite(kw["repetition_penalty"]) and kw["repetition_penalty"] > 0
    for key in ("frequency_penalty", "presence_penalty"):
        if key in kw:
            assert -2 <= kw[key] <= 2
    for token, bias in kw.get("logit_bias", {}).items():
        assert token >= 0 and -100 <= bias <= 100 and not math.isnan(bias)
    if "logprobs" in kw:
        assert 0 <= kw["logprobs"] <= 20
    assert "seed" not in kw or kw["seed"] > 0


# ---- prompts ------------------------------------------------------------------------


@PROPS
@given(req=predict_options())
def test_chat_input_gives_openai_messages_or_invalid_argument(req):
    req.UseTokenizerTemplate = True
    decoded = _result_or_backend_error(lambda r: GenerationRequest.from_proto(r, stream=True), req)
    if isinstance(decoded, BackendError):
        assert isinstance(decoded, InvalidArgument)
        return
    chat = decoded.chat
    assert chat.messages and all(m["role"] in ROLES for m in chat.messages)
    for m in chat.messages:
        for call in m.get("tool_calls", ()):
            # vLLM's renderer silently turns bad arguments into {}: ours are valid JSON.
            assert isinstance(call["function"]["arguments"], str)
            json.loads(call["function"]["arguments"])
    names = [t["function"]["name"] for t in chat.tools or ()]
    assert chat.tool_choice.name is None or chat.tool_choice.name in names
    assert chat.tool_choice.mode != "required" or names
    json.dumps(chat.tool_choice.to_openai())


@PROPS
@given(msgs=messages())
def test_convert_messages_never_raises_untyped(msgs):
    out = _result_or_backend_error(convert_messages, msgs)
    if not isinstance(out, BackendError):
        assert len(out) == len(msgs)


@PROPS
@given(raw_tools=tools_text, raw_choice=tool_choice_text)
def test_parse_tool_choice_only_names_offered_tools(raw_tools, raw_choice):
    tools = _result_or_backend_error(parse_tools, raw_tools)
    if isinstance(tools, BackendError):
        return
    choice = _result_or_backend_error(parse_tool_choice, raw_choice, tools)
    if isinstance(choice, BackendError):
        assert isinstance(choice, InvalidArgument)
        return
    assert choice.mode in ("none", "auto", "required", "function")
    if choice.name is not None:
        assert choice.name in [t["function"]["name"] for t in tools or ()]


@PROPS
@given(meta=metadata)
@example(meta={"chat_template_kwargs": '{"enable_thinking": true}', "enable_thinking": "false"})
def test_template_kwargs_types(meta):
    out = _result_or_backend_error(template_kwargs, meta)
    if isinstance(out, BackendError):
        assert isinstance(out, InvalidArgument)
        return
    kwargs, skip = out
    assert isinstance(kwargs, dict)
    assert skip is None or isinstance(skip, bool)
    if "enable_thinking" in meta:
        assert isinstance(kwargs["enable_thinking"], bool), "Metadata flag wins, as a bool"


# ---- parsing.OutputState with fake parsers -----------------------------------------

MARKERS = {900: "<think>", 901: "</think>", 902: "<tool_call>", 903: "</tool_call>"}


@st.composite
def engine_deltas(draw) -> list[tuple[str, list[int]]]:
    """A stream of (delta text, delta token ids) with markers mixed in.

    A marker id usually comes with its text; sometimes without (a special
    token the detokenizer skipped). Every other text chunk has ids of its own.
    """
    out = []
    for _ in range(draw(st.integers(1, 8))):
        parts_text, parts_ids = [], []
        for _ in range(draw(st.integers(0, 4))):
            if draw(st.integers(0, 3)) == 0:
                tid = draw(st.sampled_from(sorted(MARKERS)))
                parts_ids.append(tid)
                if draw(st.integers(0, 5)):  # usually the marker text is there
                    parts_text.append(MARKERS[tid])
            else:
                chunk = draw(
                    st.sampled_from(["", " ", "\n", "a", "é", "{", "<think>"]) | small_text
                )
                parts_text.append(chunk)
                # Text that arrives without ids of its own (held back by the
                # detokenizer) is the case test_text_before_a_marker_is_not_dropped pins.
                size = 1 if chunk else 0
                parts_ids.extend(draw(st.lists(st.integers(0, 899), min_size=size, max_size=2)))
        out.append(("".join(parts_text), parts_ids))
    return out


class EchoParser:
    """A parser that reports every delta as content: what goes in must come out."""

    reasoning_parser = None

    def parse_delta(self, *, delta_text, delta_token_ids, request, prompt_token_ids, finished):
        return SimpleNamespace(content=delta_text, reasoning=None, tool_calls=None)

    def parse(self, text, request, *, enable_auto_tools, model_output_token_ids):
        # The whole-text parse the stream is reconciled with: all content too.
        return None, text or None, []


@PROPS
@given(deltas=engine_deltas())
@example(deltas=[(" ", [1]), ("\n", [2]), ("", [3])])
@example(deltas=[("<think>", [900, 900])])
def test_output_state_with_an_echo_parser_loses_no_text(deltas):
    state = OutputState(EchoParser, request=None, markers=MARKERS)
    got = ""
    for i, (t, ids) in enumerate(deltas):
        got += state.feed(t, ids, finished=i == len(deltas) - 1).content
    assert got == "".join(t for t, _ in deltas)


@PROPS
@given(deltas=engine_deltas())
def test_output_state_without_parser_is_the_identity(deltas):
    state = OutputState(None, request=None)
    pieces = [
        state.feed(t, ids, finished=i == len(deltas) - 1) for i, (t, ids) in enumerate(deltas)
    ]
    assert "".join(p.content for p in pieces) == "".join(t for t, _ in deltas)
    assert all(not p.tool_calls and not p.reasoning for p in pieces)


fake_calls = st.lists(
    st.builds(
        lambda index, id_, name, args, has_fn: SimpleNamespace(
            index=index,
            id=id_,
            function=SimpleNamespace(name=name, arguments=args) if has_fn else None,
        ),
        st.integers(0, 3),
        st.none() | small_text,
        st.none() | TOOL_NAMES,
        st.none() | small_text,
        st.booleans(),
    ),
    max_size=3,
)
fake_delta = st.none() | st.builds(
    lambda c, r, calls: SimpleNamespace(content=c, reasoning=r, tool_calls=calls),
    st.none() | small_text,
    st.none() | small_text,
    st.none() | fake_calls,
)


class ScriptedParser:
    """Returns whatever the test scripted, whatever it is fed: vLLM's engine-path
    parsers' deltas go out as they come, so whatever they hold is what the
    worker must survive."""

    reasoning_parser = None
    tool_parser = SimpleNamespace(engine_based_streaming=True, supports_required_and_named=False)
    _engine_based = True

    def __init__(self, script):
        self._script = list(script)

    def parse_delta(self, **_):
        return self._script.pop(0) if self._script else None

    def parse(self, text, request, *, enable_auto_tools, model_output_token_ids):
        calls = [SimpleNamespace(id=None, name="f", arguments="{}")]
        return None, text or None, calls


@PROPS
@given(deltas=engine_deltas(), script=st.lists(fake_delta, max_size=20))
def test_output_state_survives_any_parser_output(deltas, script):
    """Whatever a parser returns for a delta (None, partial calls, calls with no
    id or name), OutputState answers with a ChatPiece whose calls have a valid
    index and string fields, and the whole-text parse still works."""
    request = SimpleNamespace(tools=[{}], tool_choice="auto")

    def new():
        return ScriptedParser(script)

    state = OutputState(new, request=request, markers=MARKERS)
    assert state.path == "engine"
    for i, (t, ids) in enumerate(deltas):
        piece = state.feed(t, ids, finished=i == len(deltas) - 1)
        assert isinstance(piece, ChatPiece)
        for call in piece.tool_calls:
            assert isinstance(call.index, int) and call.index >= 0
            assert isinstance(call.name, str) and isinstance(call.arguments, str)
    whole = OutputState(new, request, markers=MARKERS).parse_whole(
        "".join(t for t, _ in deltas), []
    )
    assert whole.tool_calls and whole.tool_calls[0].id.startswith("chatcmpl-tool-")


@PROPS
@given(deltas=engine_deltas())
def test_split_markers_covers_the_text_and_the_ids(deltas):
    state = OutputState(EchoParser, request=None, markers=MARKERS)
    for t, ids in deltas:
        parts = state._split_markers(t, ids)
        assert [i for _, part in parts for i in part] == list(ids), "no id lost or repeated"
        assert "".join(p for p, _ in parts) == t, "no text lost or repeated"


pieces = st.builds(
    lambda c, r, calls: ChatPiece(content=c, reasoning=r, tool_calls=calls),
    small_text,
    small_text,
    st.lists(
        st.builds(ToolCallPiece, st.integers(0, 2), small_text, TOOL_NAMES, small_text), max_size=3
    ),
)


@PROPS
@given(seq=st.lists(pieces, min_size=1, max_size=6))
def test_merge_concatenates_fields_and_keeps_each_calls_arguments(seq):
    merged = ChatPiece()
    for p in seq:
        merge(
            merged,
            ChatPiece(
                p.content,
                p.reasoning,
                [
                    ToolCallPiece(**{s: getattr(t, s) for s in ToolCallPiece.__slots__})
                    for t in p.tool_calls
                ],
            ),
        )
    assert merged.content == "".join(p.content for p in seq)
    assert merged.reasoning == "".join(p.reasoning for p in seq)

    # Per index, the gateway concatenates arguments in order: merging must not change that.
    def by_index(calls):
        out: dict[int, str] = {}
        for c in calls:
            out[c.index] = out.get(c.index, "") + c.arguments
        return out

    assert by_index(merged.tool_calls) == by_index(t for p in seq for t in p.tool_calls)


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        # vLLM's detokenizer holds back text (stop-string prefixes, incomplete
        # UTF-8) and releases it with the next delta; when the consumer lags,
        # that merged delta can start with a marker token.
        ("abc</think>\n\nHi", [901, 10, 11, 12]),
        (" <tool_call>{", [902, 13]),
        ("<think> <think>", [900, 900]),
    ],
)
def test_text_before_a_marker_is_not_dropped(text, ids):
    state = OutputState(EchoParser, request=None, markers=MARKERS)
    assert state.feed(text, ids, finished=True).content == text


# ---- known escapes: inputs that raise something other than BackendError -------------

# Python's json raises RecursionError for deep nesting and ValueError for an
# integer literal over 4300 digits; both must come out as our typed error.
DEEP = "[" * 100_000
HUGE_INT = "1" * 5000


def _json_entry_point(field: str, raw: str):
    if field == "Tools":
        return parse_tools, (raw,)
    if field == "LogitBias":
        return sampling_kwargs, (pb.PredictOptions(LogitBias=raw),)
    if field == "EngineArgs":
        return build_load_plan, (pb.ModelOptions(Model="m", EngineArgs=raw), FakeFlagParser())
    if field == "tool_calls":
        return convert_messages, ([pb.Message(role="assistant", tool_calls=raw)],)
    if field == "tool_calls.arguments":
        calls = json.dumps([{"function": {"name": "f", "arguments": raw}}])
        return convert_messages, ([pb.Message(role="assistant", tool_calls=calls)],)
    if field == "chat_template_kwargs":
        return template_kwargs, ({"chat_template_kwargs": raw},)
    if field == "ToolChoice":
        return parse_tool_choice, (raw, None)
    raise AssertionError(field)


@pytest.mark.parametrize(
    ("field", "raw"),
    [
        ("Tools", DEEP),
        ("EngineArgs", DEEP),
        ("tool_calls", DEEP),
        ("tool_calls.arguments", DEEP),
        ("chat_template_kwargs", DEEP),
        ("ToolChoice", "{" + '"a":' * 0 + '"x": ' + DEEP),
        ("LogitBias", DEEP),
        ("Tools", HUGE_INT),
        ("LogitBias", '{"1": ' + HUGE_INT + "}"),
        ("EngineArgs", '{"seed": ' + HUGE_INT + "}"),
    ],
)
def test_pathological_json_is_a_typed_error(field, raw):
    fn, args = _json_entry_point(field, raw)
    with pytest.raises(BackendError):
        fn(*args)
