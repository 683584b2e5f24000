"""ModelMetadata and GetMetrics on the loaded tiny model (hermes + qwen3 parsers)."""

from __future__ import annotations

import pytest

from backend.gen import backend_pb2 as pb

pytestmark = pytest.mark.integration


def test_model_metadata_describes_template_and_parsers(loaded):
    meta = loaded.stub.ModelMetadata(pb.ModelOptions(), timeout=30)
    # The tiny model's template reads enable_thinking (Qwen3-style).
    assert meta.supports_thinking
    assert meta.rendered_template.startswith(
        "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant"
    )
    assert "<think>\n\n</think>" not in meta.rendered_template, "rendered with thinking on"
    markers = meta.tool_format
    assert (markers.format_type, markers.per_call_start, markers.per_call_end) == (
        "json",
        "<tool_call>",
        "</tool_call>",
    )
    assert (markers.name_field, markers.args_field) == ("name", "arguments")
    assert (markers.reasoning_start, markers.reasoning_end) == ("<think>", "</think>")
    assert meta.media_marker == "", "a text-only model has no media placeholder"


def test_get_metrics_counts_tokens(loaded):
    before = loaded.stub.GetMetrics(pb.MetricsRequest(), timeout=10)
    reply = loaded.stub.Predict(
        pb.PredictOptions(Prompt="Count me", Tokens=12, IgnoreEOS=True), timeout=60
    )
    list(
        loaded.stub.PredictStream(
            pb.PredictOptions(Prompt="And me", Tokens=7, IgnoreEOS=True), timeout=60
        )
    )
    after = loaded.stub.GetMetrics(pb.MetricsRequest(), timeout=10)
    assert after.tokens_generated - before.tokens_generated >= 19
    assert after.prompt_tokens_processed - before.prompt_tokens_processed >= reply.prompt_tokens
    assert after.tokens_per_second > 0
