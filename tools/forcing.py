"""Forcing a known answer out of a random-weight model (tests, demo, e2e).

A grammar that admits exactly one text makes the tiny model produce it; a
logit bias on the format tags makes them come out as their single added-token
ids, as a real model emits them (grammar forcing alone may spell `<think>`
byte by byte, and vLLM's reasoning parsers look for the `</think>` id).
"""

from __future__ import annotations

import json

TAGS = ("<tool_call>", "</tool_call>", "<think>", "</think>")

# The tool the demo, the tests and the e2e harness offer the model.
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def gbnf_literal(text: str) -> str:
    """A GBNF grammar that admits exactly `text`."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'root ::= "{escaped}"'


def tag_bias(stub) -> str:
    """LogitBias JSON (+100 on each tag's token id), ids looked up over gRPC."""
    from backend.gen import backend_pb2 as pb

    ids = {}
    for tag in TAGS:
        tokens = stub.TokenizeString(pb.PredictOptions(Prompt=tag)).tokens
        if len(tokens) != 1:
            raise ValueError(f"{tag} is not a single token in this model's tokenizer")
        ids[str(tokens[0])] = 100
    return json.dumps(ids)
