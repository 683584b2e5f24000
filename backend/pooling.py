"""Embedding and Rerank: requests for vLLM's pooling runner.

Embedding layout: one pooled vector (`EMBEDDING_LAYOUT_FINAL`, tokens=1) by
default; `Metadata["embedding_layout"] = "per_token"` asks for one vector per
prompt token (`EMBEDDING_LAYOUT_PER_TOKEN`, row-major tokens x dim), which
needs a model whose pooler supports vLLM's `token_embed` task.
"""

from __future__ import annotations

from typing import Any

from backend.errors import FailedPrecondition, InvalidArgument
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


async def embed(model: Any, request: pb.PredictOptions, request_id: str) -> pb.EmbeddingResult:
    engine = model.engine
    if not engine.pooling:
        raise FailedPrecondition(
            "this model was loaded for generation; embeddings need LoadModel with Embeddings=true"
        )
    text = request.Embeddings or request.Prompt
    if not text:
        raise InvalidArgument("Embedding needs text in Embeddings (or Prompt)")
    task, layout = _layout(request.Metadata)
    if task not in await engine.supported_tasks():
        raise FailedPrecondition(f"this model's pooler does not support the {task!r} task")
    out = await engine.pool(await engine.render_prompt(text), task, request_id)
    data = out.outputs.data
    vectors = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
    return pb.EmbeddingResult(
        embeddings=vectors.flatten().tolist(),
        tokens=int(vectors.shape[0]),
        dim=int(vectors.shape[1]),
        prompt_tokens=len(out.prompt_token_ids or ()),
        layout=layout,
    )
