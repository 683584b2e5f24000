import math

import pytest

from backend.errors import InvalidArgument
from backend.request import sampling_of as sampling_kwargs
from backend.sampling import parse_logit_bias, structured_output
from tests.unit.fakes import FakePredict


def test_all_zero_request_means_greedy_without_token_cap():
    kw = sampling_kwargs(FakePredict())
    assert kw == {"max_tokens": None, "temperature": 0.0}


def test_every_supported_field_maps_to_its_sampling_param():
    req = FakePredict(
        Tokens=7,
        Temperature=0.7,
        TopP=0.9,
        TopK=40,
        MinP=0.05,
        Penalty=1.1,
        FrequencyPenalty=0.5,
        PresencePenalty=-0.5,
        Seed=42,
        StopPrompts=["</s>", ""],
        IgnoreEOS=True,
        LogitBias='{"12": -5, "7": 3.5}',
        Logprobs=1,
        TopLogprobs=3,
        TypicalP=1.0,
    )
    kw = sampling_kwargs(req)
    assert kw == {
        "max_tokens": 7,
        "temperature": pytest.approx(0.7),
        "top_p": pytest.approx(0.9),
        "top_k": 40,
        "min_p": pytest.approx(0.05),
        "repetition_penalty": pytest.approx(1.1),
        "frequency_penalty": 0.5,
        "presence_penalty": -0.5,
        "seed": 42,
        "stop": ["</s>"],
        "ignore_eos": True,
        "logit_bias": {12: -5.0, 7: 3.5},
        "logprobs": 3,
    }


def test_logprobs_without_top_asks_for_the_sampled_token_only():
    assert sampling_kwargs(FakePredict(Logprobs=1))["logprobs"] == 0


@pytest.mark.parametrize(
    ("field", "value", "fragment"),
    [
        ("Tokens", -1, "Tokens"),
        ("Temperature", -0.1, "Temperature"),
        ("Temperature", math.nan, "finite"),
        ("TopP", 1.5, "TopP"),
        ("TopK", -2, "TopK"),
        ("MinP", 2.0, "MinP"),
        ("Penalty", -1.0, "Penalty"),
        ("FrequencyPenalty", 3.0, "FrequencyPenalty"),
        ("PresencePenalty", -2.5, "PresencePenalty"),
        ("TopLogprobs", 21, "TopLogprobs"),
        ("Logprobs", -1, "Logprobs"),
        ("TypicalP", 0.5, "TypicalP"),
        ("LogitBias", "{bad", "LogitBias is not valid JSON"),
        ("Grammar", "{not json", "JSON schema"),
    ],
)
def test_out_of_range_fields_are_rejected_naming_the_field(field, value, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        sampling_kwargs(FakePredict(**{field: value}))


@pytest.mark.parametrize(
    "raw", ['["a"]', '{"x": 1}', '{"1": "high"}', '{"1": 101}', '{"-3": 1}', '{"1": true}']
)
def test_bad_logit_bias_is_rejected(raw):
    with pytest.raises(InvalidArgument, match="LogitBias"):
        parse_logit_bias(raw)


def test_grammar_json_schema_versus_grammar_text():
    assert structured_output('{"type": "object"}') == {"json": {"type": "object"}}
    gbnf = 'root ::= "yes" | "no"'
    assert structured_output(gbnf) == {"grammar": gbnf}
    with pytest.raises(InvalidArgument, match="JSON object"):
        structured_output("[1, 2]")
