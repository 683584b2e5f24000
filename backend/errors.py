"""Every exception → gRPC status decision lives here, in one table.

The servicer never picks a status code itself: it raises (or lets through) an
exception and `to_status` decides. Our own errors carry their code; vLLM's are
recognised by class name along the MRO so this module imports no vLLM (and the
table keeps working when vLLM moves a class between modules, which it does).
"""

from __future__ import annotations

import grpc


class BackendError(Exception):
    """An error whose gRPC code is known where it is raised."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(BackendError):
    """The request is malformed or asks for something impossible."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotLoaded(BackendError):
    """An RPC that needs a model arrived before LoadModel (or after Free)."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str = "no model is loaded: call LoadModel first") -> None:
        super().__init__(message)


class FailedPrecondition(BackendError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(BackendError):
    code = grpc.StatusCode.UNAVAILABLE


class EngineRequestError(Unavailable):
    """vLLM ended the request with finish_reason "error": a failure of this
    request alone, which vLLM calls retryable (a multimodal processor-cache miss,
    a KV load failure); the engine stays healthy."""


class Overloaded(BackendError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


# vLLM class name → (code, message prefix). The first name found walking the
# exception's MRO wins, so subclasses are listed before their bases.
_VLLM_BY_NAME: dict[str, tuple[grpc.StatusCode, str]] = {
    "EngineDeadError": (
        grpc.StatusCode.UNAVAILABLE,
        "the vLLM engine died; the worker must be reloaded (LoadModel)",
    ),
    "QueueOverflowError": (grpc.StatusCode.RESOURCE_EXHAUSTED, "the engine queue is full"),
    "MaxQueuedTokensError": (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "too many prompt tokens are queued",
    ),
    "LoRAAdapterNotFoundError": (grpc.StatusCode.NOT_FOUND, "LoRA adapter not found"),
    "VLLMNotFoundError": (grpc.StatusCode.NOT_FOUND, "not found"),
    "VLLMValidationError": (grpc.StatusCode.INVALID_ARGUMENT, "invalid request"),
    "VLLMUnprocessableEntityError": (grpc.StatusCode.INVALID_ARGUMENT, "invalid request"),
    "VLLMClientError": (grpc.StatusCode.INVALID_ARGUMENT, "invalid request"),
    "EngineGenerateError": (grpc.StatusCode.INTERNAL, "generation failed"),
}


def to_status(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and a message a user can act on, for any exception."""
    if isinstance(exc, BackendError):
        return exc.code, exc.message
    for cls in type(exc).__mro__:
        hit = _VLLM_BY_NAME.get(cls.__name__)
        if hit is not None:
            code, prefix = hit
            detail = _detail(exc)
            return code, f"{prefix}: {detail}" if detail else prefix
    # vLLM validates requests with plain ValueError/TypeError in many places
    # (prompt too long, bad logprobs count, ...). Anything reaching us as one of
    # those was raised while checking the request, so it is the caller's input.
    if isinstance(exc, (ValueError, TypeError, OverflowError)):
        return grpc.StatusCode.INVALID_ARGUMENT, _detail(exc) or type(exc).__name__
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "out of memory"
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED, _detail(exc) or "not implemented"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}): {_detail(exc)}"


def _detail(exc: BaseException) -> str:
    """The exception's own text, or its cause's when it has none (vLLM wraps)."""
    text = str(exc).strip()
    cause = exc.__cause__
    if cause is not None and (not text or type(exc).__name__ == "EngineGenerateError"):
        inner = str(cause).strip()
        if inner:
            return f"{text} ({type(cause).__name__}: {inner})" if text else inner
    return text
