"""Differential test: our worker against vLLM's own OpenAI server.

Both serve the same tiny model from the same venv with the same parsers
(hermes tool parser, qwen3 reasoning parser, grammars enforced inside the
reasoning, tools left out of the prompt for tool_choice "none"). Each case
sends the same chat to both — messages, tools, tool_choice, enable_thinking,
the same forced output (GBNF grammar + tag logit bias), greedy sampling, the
same max_tokens — and compares what a user gets: content, reasoning, each
tool call's name and decoded arguments, and the prompt / completion token
counts (same template and tokenizer must give the same prompt).

Our worker returns the non-streamed result in both modes. vLLM's server
does not always: it streams the blank lines between `</think>` and
`<tool_call>` as content, but drops them when not streaming. So our streamed
answer is compared with THEIR NON-STREAMED answer, and each case states what
their streamed answer is, so a change in vLLM shows up here. Where their
stream is not just whitespace off but wrong (a call cut by max_tokens, other
models' call formats inside <tool_call>), the tests say "WHERE vLLM'S SERVER
IS WRONG" and pin their stream too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, free_port
from tests.integration.chat_helpers import (
    CALL,
    STRICT_WEATHER_TOOL,
    TIME_TOOL,
    TOOL_HISTORY,
    USER,
    WEATHER_TOOL,
    ChatResult,
    chat_request,
    collect,
    gbnf_literal,
    tag_bias,
    whitespace_bias,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

KV_CACHE_BYTES = 256 * 2**20
# Generous: the machine running the tests may be shared (an engine start took
# over 180 s there under load).
SERVER_START_TIMEOUT = 600.0
REQUEST_TIMEOUT = 120.0


# ---- vLLM's OpenAI server ---------------------------------------------------------


@dataclass
class Answer:
    """One answer of vLLM's server, accumulated as a client does, plus usage."""

    content: str
    reasoning: str
    calls: list[tuple[str, str]]  # (name, arguments as sent: a JSON string)
    prompt_tokens: int
    completion_tokens: int
    call_ids: list[str] = field(default_factory=list)
    name_deltas: list[int] = field(default_factory=list)

    @property
    def structured(self) -> dict:
        """The shape ChatResult.structured() gives: arguments decoded."""
        return {
            "content": self.content,
            "reasoning": self.reasoning,
            "calls": [(name, json.loads(args) if args else None) for name, args in self.calls],
        }

    @property
    def raw(self) -> dict:
        """Arguments left as text (they need not be JSON when the output was cut)."""
        return {"content": self.content, "reasoning": self.reasoning, "calls": list(self.calls)}


def raw_view(result: ChatResult) -> dict:
    """Our result in Answer.raw's shape."""
    return {
        "content": result.content,
        "reasoning": result.reasoning,
        "calls": [(c.name, c.arguments) for _, c in sorted(result.calls.items())],
    }


# The worker's CHAT_OPTIONS for the tiny model, as server flags.
TINY_PARSER_ARGS = (
    "--tool-call-parser",
    "hermes",
    "--reasoning-parser",
    "qwen3",
    "--structured-outputs-config",
    '{"enable_in_reasoning": true}',
)


class OpenAIServer:
    """`python -m vllm.entrypoints.openai.api_server` in its own process group."""

    def __init__(self, model_dir: Path, parser_args: Sequence[str] = TINY_PARSER_ARGS) -> None:
        self.port = free_port()
        self.model = str(model_dir)
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = (
            Path(os.environ.get("PYTEST_WORKER_LOG_DIR", "/tmp")) / f"vllm-openai-{self.port}.log"
        )
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--dtype",
            "float32",
            "--max-model-len",
            "2048",
            "--enforce-eager",
            "--kv-cache-memory-bytes",
            str(KV_CACHE_BYTES),
            *parser_args,
            "--enable-auto-tool-choice",
            "--exclude-tools-when-tool-choice-none",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.http = httpx.Client(base_url=self.base, timeout=REQUEST_TIMEOUT)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM server exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                if self.http.get("/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise TimeoutError(
            f"vLLM server not healthy in {SERVER_START_TIMEOUT}s:\n{self.log_tail()}"
        )

    def log_tail(self, n: int = 60) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()

    def _post(self, body: dict) -> httpx.Response:
        return self.http.post("/v1/chat/completions", json={"model": self.model, **body})

    def unary(self, body: dict) -> Answer:
        r = self._post(body)
        assert r.status_code == 200, f"{r.status_code}: {r.text}\n{self.log_tail()}"
        data = r.json()
        msg = data["choices"][0]["message"]
        calls = msg.get("tool_calls") or []
        return Answer(
            content=msg.get("content") or "",
            reasoning=msg.get("reasoning") or "",
            calls=[(c["function"]["name"], c["function"]["arguments"]) for c in calls],
            prompt_tokens=data["usage"]["prompt_tokens"],
            completion_tokens=data["usage"]["completion_tokens"],
            call_ids=[c["id"] for c in calls],
            name_deltas=[1] * len(calls),
        )

    def streamed(self, body: dict) -> Answer:
        """SSE chunks accumulated as a client does: text per field, calls by index."""
        content = reasoning = ""
        calls: dict[int, dict[str, Any]] = {}
        usage = None
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with self.http.stream(
            "POST", "/v1/chat/completions", json={"model": self.model, **body}
        ) as r:
            assert r.status_code == 200, f"{r.status_code}: {r.read()!r}\n{self.log_tail()}"
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                assert "error" not in chunk, chunk
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for choice in chunk.get("choices", ()):
                    delta = choice.get("delta") or {}
                    content += delta.get("content") or ""
                    reasoning += delta.get("reasoning") or ""
                    for t in delta.get("tool_calls") or ():
                        call = calls.setdefault(
                            t["index"], {"id": "", "name": "", "arguments": "", "names": 0}
                        )
                        fn = t.get("function") or {}
                        if t.get("id"):
                            call["id"] = t["id"]
                        if fn.get("name"):
                            call["name"] = fn["name"]
                            call["names"] += 1
                        call["arguments"] += fn.get("arguments") or ""
        assert usage is not None, "include_usage asked for a usage chunk"
        ordered = [c for _, c in sorted(calls.items())]
        return Answer(
            content=content,
            reasoning=reasoning,
            calls=[(c["name"], c["arguments"]) for c in ordered],
            prompt_tokens=usage["prompt_tokens"],
            completion_tokens=usage["completion_tokens"],
            call_ids=[c["id"] for c in ordered],
            name_deltas=[c["names"] for c in ordered],
        )


@pytest.fixture(scope="module")
def vllm_server(tiny_model_dir) -> Iterator[OpenAIServer]:
    server = OpenAIServer(tiny_model_dir)
    yield server
    server.stop()


# ---- the cases ----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    forced: str | None = None
    messages: tuple = tuple(USER)
    tools: tuple | None = None
    tool_choice: Any = None
    thinking: bool | None = None
    tokens: int = 200
    # Named/required tool choice: no forced text; whitespace-only tokens banned instead.
    no_whitespace: bool = False
    # +100 on the end-of-turn token: stops a random model once the tool-choice
    # grammar allows it (else "required" adds calls until max_tokens).
    eos_bias: bool = False
    # What vLLM's server streams as content where its non-streamed answer has
    # none (see the module docstring); None: its two answers agree.
    their_streamed_content: str | None = None
    # Anchors, so both sides being wrong the same way is not a pass.
    expect: dict = field(default_factory=dict)


CASES = [
    Case(
        "reasoning_then_call",
        forced="<think>\nI should call the tool.\n</think>\n\n" + CALL % "Paris",
        tools=(WEATHER_TOOL,),
        their_streamed_content="\n\n",
        expect={
            "content": "",
            "reasoning": "\nI should call the tool.\n",
            "calls": [("get_weather", {"city": "Paris"})],
        },
    ),
    Case(
        "two_parallel_calls",
        forced="<think>\nTwo cities.\n</think>\n\n" + CALL % "Paris" + "\n" + CALL % "Rome",
        tools=(WEATHER_TOOL,),
        their_streamed_content="\n\n",
        expect={"calls": [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]},
    ),
    Case(
        "parameterless_call",
        forced="<think>\nx\n</think>\n\n"
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        tools=(TIME_TOOL,),
        their_streamed_content="\n\n",
        expect={"calls": [("get_time", {})]},
    ),
    Case(
        "plain_text_with_tools",
        forced="<think>\nNo tool needed.\n</think>\n\nIt is sunny, {probably}.",
        tools=(WEATHER_TOOL,),
        expect={
            "content": "\n\nIt is sunny, {probably}.",
            "reasoning": "\nNo tool needed.\n",
            "calls": [],
        },
    ),
    Case(
        "thinking_disabled",
        forced="Hello there.",
        thinking=False,
        expect={"content": "Hello there.", "reasoning": "", "calls": []},
    ),
    Case(
        "tool_choice_none",
        forced="<think>\nx\n</think>\n\n" + CALL % "Paris",
        tools=(WEATHER_TOOL,),
        tool_choice="none",
        expect={"content": "\n\n" + CALL % "Paris", "reasoning": "\nx\n", "calls": []},
    ),
    Case(
        "cut_inside_reasoning",
        forced="<think>\n" + "step " * 50 + "\n</think>\n\nDone.",
        tokens=8,
        expect={"content": "", "calls": []},
    ),
    Case(
        "call_after_prior_conversation",
        forced="<think>\nI should call the tool.\n</think>\n\n" + CALL % "Paris",
        messages=tuple(TOOL_HISTORY),
        tools=(WEATHER_TOOL,),
        their_streamed_content="\n\n",
        expect={"calls": [("get_weather", {"city": "Paris"})]},
    ),
    Case(
        "named_tool_choice_strict_enum",
        tools=(STRICT_WEATHER_TOOL, TIME_TOOL),
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        thinking=False,
        tokens=100,
        no_whitespace=True,
        expect={"content": "", "reasoning": "", "calls": [("get_weather", {"city": "Paris"})]},
    ),
    Case(
        "required_tool_choice",
        tools=(STRICT_WEATHER_TOOL,),
        tool_choice="required",
        thinking=False,
        tokens=150,
        no_whitespace=True,
        eos_bias=True,
        expect={"content": "", "reasoning": "", "calls": [("get_weather", {"city": "Paris"})]},
    ),
]


def requests_for(case: Case, stub, model_dir) -> tuple[Any, dict]:
    """(our PredictOptions, their /v1/chat/completions body) for one case."""
    if case.no_whitespace:
        bias = whitespace_bias(model_dir)
    elif case.forced is not None:
        bias = json.loads(tag_bias(stub))
    else:
        bias = {}
    if case.eos_bias:
        from transformers import AutoTokenizer

        bias[str(AutoTokenizer.from_pretrained(str(model_dir)).eos_token_id)] = 100
    ours = chat_request(
        stub,
        list(case.messages),
        tools=list(case.tools) if case.tools else None,
        tool_choice=case.tool_choice,
        tokens=case.tokens,
        metadata={} if case.thinking is None else {"enable_thinking": str(case.thinking).lower()},
    )
    body: dict[str, Any] = {
        "messages": our_messages_as_openai(case.messages),
        "temperature": 0,
        "max_tokens": case.tokens,
    }
    if case.forced is not None:
        ours.Grammar = gbnf_literal(case.forced)
        body["structured_outputs"] = {"grammar": gbnf_literal(case.forced)}
    if bias:
        ours.LogitBias = json.dumps(bias)
        body["logit_bias"] = bias
    if case.tools:
        body["tools"] = list(case.tools)
    if case.tool_choice is not None:
        body["tool_choice"] = case.tool_choice
    if case.thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": case.thinking}
    return ours, body


def our_messages_as_openai(messages) -> list[dict]:
    """Our Message dicts (tool_calls as a JSON string) as an OpenAI client sends them."""
    out = []
    for m in messages:
        m = dict(m)
        if "tool_calls" in m:
            m["tool_calls"] = json.loads(m["tool_calls"])
        out.append(m)
    return out


@dataclass
class Ours:
    result: ChatResult
    prompt_tokens: int


def ours(stub, req) -> tuple[Ours, Ours]:
    unary = [stub.Predict(req, timeout=REQUEST_TIMEOUT)]
    streamed = list(stub.PredictStream(req, timeout=REQUEST_TIMEOUT))
    return (
        Ours(collect(unary), max(r.prompt_tokens for r in unary)),
        Ours(collect(streamed), max(r.prompt_tokens for r in streamed)),
    )


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_same_answer_as_vllm_openai_server(case, loaded, vllm_server, tiny_model_dir):
    req, body = requests_for(case, loaded.stub, tiny_model_dir)
    their_unary = vllm_server.unary(body)
    their_streamed = vllm_server.streamed(body)
    our_unary, our_streamed = ours(loaded.stub, req)

    for key, value in case.expect.items():
        assert their_unary.structured[key] == value, (
            f"their {key} (the case's forcing did not hold?)"
        )
    if case.id == "cut_inside_reasoning":
        assert their_unary.structured["reasoning"].startswith("\nstep")

    # Non-streamed: the same answer.
    assert our_unary.result.structured() == their_unary.structured

    # vLLM's own streamed vs non-streamed answers: equal, or differing exactly
    # as the case documents (whitespace-only content before a tool call that
    # the non-streamed path drops). If this fails because they now agree,
    # vLLM fixed it: set their_streamed_content=None for the case.
    expected_their_streamed = dict(their_unary.structured)
    if case.their_streamed_content is not None:
        assert their_unary.structured["content"] == ""
        expected_their_streamed["content"] = case.their_streamed_content
    assert their_streamed.structured == expected_their_streamed

    # Streamed: ours deliberately follows their NON-streamed answer (a client
    # accumulating our stream gets what a non-streaming client gets), so it is
    # compared with that, not with their inconsistent stream.
    assert our_streamed.result.structured() == their_unary.structured
    # Each streamed call names its function once, as theirs does.
    assert [
        c.name_deltas for _, c in sorted(our_streamed.result.calls.items())
    ] == their_streamed.name_deltas
    for ids in (
        their_unary.call_ids,
        their_streamed.call_ids,
        [c.id for c in our_unary.result.calls.values()],
        [c.id for c in our_streamed.result.calls.values()],
    ):
        assert all(i.startswith("chatcmpl-tool-") for i in ids), ids

    # Same template and tokenizer → the same prompt; same forced output → the
    # same number of generated tokens.
    assert (our_unary.prompt_tokens, our_streamed.prompt_tokens, their_streamed.prompt_tokens) == (
        their_unary.prompt_tokens,
    ) * 3
    assert (
        our_unary.result.tokens,
        our_streamed.result.tokens,
        their_streamed.completion_tokens,
    ) == (their_unary.completion_tokens,) * 3
    if case.id == "cut_inside_reasoning":
        assert their_unary.completion_tokens == case.tokens


# Where max_tokens=N cuts the forced `<think>\nx\n</think>\n\n<tool_call>\n{"name": ...`
# (greedy + grammar: the same tokens on both sides, every run).
CUT_POINTS = {
    20: "inside the function name",
    30: "after the name, before the arguments",
    34: "inside the arguments",
}


@pytest.mark.parametrize("tokens", sorted(CUT_POINTS), ids=lambda n: f"{n}_tokens")
def test_output_cut_inside_a_tool_call(tokens, loaded, vllm_server, tiny_model_dir):
    """WHERE WE DEPART FROM vLLM'S NON-STREAMED ANSWER, ON PURPOSE: when
    max_tokens cuts a tool call, vLLM's non-streamed answer is the raw text as
    content and no call, while its stream has already sent what it parsed (a
    call with the name and partial arguments, or nothing of the markup). Our
    worker streams a call once its name is complete, so a call whose name went
    out stays a call, with the arguments generated so far — both our answers,
    as OpenAI returns a call cut by `length` (backend/output/calls.py). Cut
    inside the name, no call went out: both our answers are their
    non-streamed one. Their stream is pinned too: if vLLM changes, this says so.
    """
    case = Case(
        f"cut_{tokens}",
        forced="<think>\nx\n</think>\n\n" + CALL % "Paris",
        tools=(WEATHER_TOOL,),
        tokens=tokens,
    )
    req, body = requests_for(case, loaded.stub, tiny_model_dir)
    their_unary = vllm_server.unary(body)
    their_streamed = vllm_server.streamed(body)
    our_unary, our_streamed = ours(loaded.stub, req)

    assert their_unary.completion_tokens == tokens, "cut by max_tokens"
    assert their_unary.raw["reasoning"] == "\nx\n" and not their_unary.calls
    assert their_unary.content.startswith('\n\n<tool_call>\n{"name": "get_weathe'), (
        their_unary.content
    )
    assert raw_view(our_unary.result) == raw_view(our_streamed.result)
    if tokens == 20:
        assert raw_view(our_unary.result) == their_unary.raw
    else:
        ours_ = raw_view(our_unary.result)
        assert ours_["content"] == "" and ours_["reasoning"] == "\nx\n"
        ((name, args),) = ours_["calls"]
        assert name == "get_weather" and '{"city": "Paris"}'.startswith(args)
        assert (name, args) == their_streamed.calls[0], "the same call as their stream"

    # Their stream (wrong): parsed pieces only, whitespace content kept.
    assert their_streamed.content == "\n\n" and their_streamed.reasoning == "\nx\n"
    if tokens == 20:
        assert their_streamed.calls == []
    else:
        name, args = their_streamed.calls[0]
        assert len(their_streamed.calls) == 1 and name == "get_weather"
        if tokens == 34:
            assert args and '{"city": "Paris"}'.startswith(args), args
        else:
            assert args == ""

    assert (our_unary.prompt_tokens, our_streamed.prompt_tokens, their_streamed.prompt_tokens) == (
        their_unary.prompt_tokens,
    ) * 3
    assert (
        our_unary.result.tokens,
        our_streamed.result.tokens,
        their_streamed.completion_tokens,
    ) == (tokens,) * 3


# Outputs a hermes parser meets (other models' formats inside <tool_call>)
# where vLLM's server streams something else than its non-streamed answer.
VLLM_STREAM_WRONG = {
    # Non-streamed: no call, the raw text as content. Streamed: a call whose
    # arguments are not JSON ('{"city": "Paris"}}]').
    "hermes_list_format": (
        '<think>\nx\n</think>\n\n<tool_call>[{"name": "get_weather", '
        '"arguments": {"city": "Paris"}}]</tool_call>'
    ),
    # qwen3_coder's XML inside <tool_call>: non-streamed it is content,
    # streamed it vanishes (neither content nor a call).
    "xml_call_format": (
        "<think>\nx\n</think>\n\n<tool_call>\n<function=get_weather>\n"
        "<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
    ),
}


@pytest.mark.parametrize("name", sorted(VLLM_STREAM_WRONG))
def test_formats_where_vllm_streams_wrong(name, loaded, vllm_server, tiny_model_dir):
    """WHERE vLLM'S SERVER IS WRONG: its stream differs from its non-streamed
    answer; ours equals the non-streamed answer in both modes."""
    case = Case(name, forced=VLLM_STREAM_WRONG[name], tools=(WEATHER_TOOL,))
    req, body = requests_for(case, loaded.stub, tiny_model_dir)
    their_unary = vllm_server.unary(body)
    their_streamed = vllm_server.streamed(body)
    our_unary, our_streamed = ours(loaded.stub, req)

    assert their_unary.raw["reasoning"] == "\nx\n" and not their_unary.calls
    assert "<tool_call>" in their_unary.content, their_unary.content
    assert raw_view(our_unary.result) == their_unary.raw
    assert raw_view(our_streamed.result) == their_unary.raw
    assert their_streamed.raw != their_unary.raw, (
        f"vLLM's stream now equals its non-streamed answer for {name}: move the case to CASES"
    )
