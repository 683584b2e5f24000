"""Embedding and Rerank: requests for vLLM's pooling runner.

Embedding input: text (`Embeddings`, or `Prompt`), or token ids
(`EmbeddingTokens`, what the gateway sends when the client's input is token
arrays), embedded as given.

Embedding layout: one pooled vector (`EMBEDDING_LAYOUT_FINAL`, tokens=1) by
default; `Metadata["embedding_layout"] = "per_token"` asks for one vector per
prompt token (`EMBEDDING_LAYOUT_PER_TOKEN`, row-major tokens x dim), which
needs a model whose pooler supports vLLM's `token_embed` task.
"""

from __future__ import annotations

from typing import Any

from backend.errors import FailedPrecondition, InvalidArgument
from backend.fanout import gather_or_cancel
from backend.gen import backend_pb2 as pb

LAYOUT_KEY = "embedding_layout"


def _layout(metadata: Any) -> tuple[str, Any]:
    wanted = metadata.get(LAYOUT_KEY, "final").strip().lower().replace("-", "_")
    if wanted in ("", "final", "pooled"):
        return "embed", pb.EMBEDDING_LAYOUT_FINAL
    if wanted == "per_token":
        return "token_embed", pb.EMBEDDING_LAYOUT_PER_TOKEN
    raise InvalidArgument(
        f"Metadata[{LAYOUT_KEY!r}] must be 'final' or 'per_token', got {wanted!r}"
    )


def token_prompt(ids: list[int], vocab_size: int, max_len: int) -> dict[str, list[int]]:
    """EmbeddingTokens → an engine input of those ids, embedded as given (no
    special tokens added, as vLLM's /v1/embeddings does with token input): the
    gateway sends them instead of text when the client's input is token arrays.
    Ids outside the vocabulary or past the context are INVALID_ARGUMENT."""
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise InvalidArgument(
            f"EmbeddingTokens has ids outside the vocabulary (0..{vocab_size - 1}): {bad[:10]}"
        )
    if len(ids) > max_len:
        raise InvalidArgument(
            f"EmbeddingTokens has {len(ids)} ids, over the context length {max_len}"
        )
    return {"prompt_token_ids": ids}


async def embed(model: Any, request: pb.PredictOptions, request_id: str) -> pb.EmbeddingResult:
    engine = model.engine
    if not engine.pooling:
        raise FailedPrecondition(
            "this model was loaded for generation; embeddings need LoadModel with Embeddings=true"
        )
    text = request.Embeddings or request.Prompt
    ids = list(request.EmbeddingTokens)
    if ids and text:
        raise InvalidArgument(
            "Embedding takes text (Embeddings or Prompt) or token ids (EmbeddingTokens), not both"
        )
    if not ids and not text:
        raise InvalidArgument("Embedding needs text in Embeddings (or Prompt) or EmbeddingTokens")
    task, layout = _layout(request.Metadata)
    if task not in await engine.supported_tasks():
        raise FailedPrecondition(f"this model's pooler does not support the {task!r} task")
    if ids:
        engine_input = token_prompt(ids, engine.vocab_size, engine.max_model_len)
    else:
        engine_input = await engine.render_prompt(text)
    out = await engine.pool(engine_input, task, request_id)
    data = out.outputs.data
    vectors = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
    return pb.EmbeddingResult(
        embeddings=vectors.flatten().tolist(),
        tokens=int(vectors.shape[0]),
        dim=int(vectors.shape[1]),
        prompt_tokens=len(out.prompt_token_ids or ()),
        layout=layout,
    )


async def rerank(model: Any, request: pb.RerankRequest, request_id: str) -> pb.RerankResult:
    """Score each document against the query with a cross-encoder (vLLM's
    `classify` task on the pair, as its /rerank does), best first."""
    engine = model.engine
    if not engine.pooling or "classify" not in await engine.supported_tasks():
        raise FailedPrecondition(
            "Rerank needs a cross-encoder / reranker model loaded with Reranking=true"
        )
    if not request.documents:
        raise InvalidArgument("Rerank needs at least one document")
    if request.top_n < 0:
        raise InvalidArgument(f"top_n must be >= 0, got {request.top_n}")
    pairs = [engine.encode_pair(request.query, doc) for doc in request.documents]
    for i, (ids, _) in enumerate(pairs):
        engine.ensure_fits(ids, f"query + documents[{i}]")
    outputs = await gather_or_cancel(
        engine.pool(
            {"prompt_token_ids": ids},
            "classify",
            f"{request_id}-{i}",
            {"compressed_token_type_ids": second_at},
        )
        for i, (ids, second_at) in enumerate(pairs)
    )
    scores = [float(out.outputs.data.reshape(-1)[0]) for out in outputs]
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    if request.top_n:
        order = order[: request.top_n]
    tokens = sum(len(ids) for ids, _ in pairs)
    return pb.RerankResult(
        usage=pb.Usage(total_tokens=tokens, prompt_tokens=tokens),
        results=[
            pb.DocumentResult(index=i, text=request.documents[i], relevance_score=scores[i])
            for i in order
        ],
    )
