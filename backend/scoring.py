"""Score: the log-probability of each candidate continuation given a prompt.

Each candidate is tokenized *together with* the prompt (`prompt + candidate`),
since tokens can merge across the boundary; the candidate's tokens are those
after the longest prefix shared with the prompt's own tokenization. The engine
returns the prompt log-probabilities of the joint sequence (one request per
candidate, all submitted at once so vLLM batches them, sharing the prompt's
KV cache through prefix caching when enabled); the candidate's score is the
sum over its tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from backend.errors import InvalidArgument
from backend.fanout import gather_or_cancel
from backend.gen import backend_pb2 as pb


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass
class CandidateScore:
    log_prob: float = 0.0
    num_tokens: int = 0
    tokens: list[tuple[str, float]] = field(default_factory=list)

    @property
    def normalized(self) -> float:
        return self.log_prob / self.num_tokens if self.num_tokens else 0.0


def score_candidate(
    full_ids: Sequence[int],
    boundary: int,
    position_logprobs: Sequence[float | None],
    decode: object,
) -> CandidateScore:
    """Sum `position_logprobs[i]` (log p(full_ids[i] | full_ids[:i])) over the
    candidate's positions `boundary..len(full_ids)`."""
    out = CandidateScore()
    # Position 0 has no conditional probability: a candidate must start after it.
    start = max(boundary, 1)
    for i in range(start, len(full_ids)):
        lp = position_logprobs[i]
        if lp is None:
            continue
        out.log_prob += lp
        out.num_tokens += 1
        out.tokens.append((decode(full_ids[i]), lp))  # type: ignore[operator]
    return out


async def score(model: Any, request: pb.ScoreRequest, request_id: str) -> pb.ScoreResponse:
    """The Score RPC: joint log-probability of each candidate given the prompt."""
    if not request.candidates:
        raise InvalidArgument("Score needs at least one candidate")
    engine = model.engine
    prompt_ids = engine.tokenize(request.prompt)
    fulls = [engine.tokenize(request.prompt + candidate) for candidate in request.candidates]
    for i, ids in enumerate(fulls):
        engine.ensure_fits(ids, f"prompt + candidates[{i}]")
    positions = await gather_or_cancel(
        engine.prompt_logprobs(ids, f"{request_id}-{i}") for i, ids in enumerate(fulls)
    )
    decode = engine.decode_token
    out = pb.ScoreResponse()
    for ids, logprobs in zip(fulls, positions, strict=True):
        result = score_candidate(ids, common_prefix(prompt_ids, ids), logprobs, decode)
        # Each flag fills what it names and nothing else: length_normalize the
        # per-token mean, include_token_logprobs the per-token values.
        candidate = out.candidates.add(
            log_prob=result.log_prob,
            length_normalized_log_prob=result.normalized if request.length_normalize else 0.0,
            num_tokens=result.num_tokens,
        )
        if request.include_token_logprobs:
            for token, lp in result.tokens:
                candidate.tokens.add(token=token, log_prob=lp)
    return out
