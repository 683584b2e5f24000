import grpc
import pytest

from backend.errors import InvalidArgument, NotLoaded, Overloaded, Unavailable, to_status


def _named(name, base=Exception):
    """An exception class with vLLM's class name, as a fake vLLM module would define it."""
    return type(name, (base,), {})


VLLMError = _named("VLLMError")
VLLMClientError = _named("VLLMClientError", VLLMError)
VLLMServerError = _named("VLLMServerError", VLLMError)


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (InvalidArgument("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotLoaded(), grpc.StatusCode.FAILED_PRECONDITION),
        (Unavailable("x"), grpc.StatusCode.UNAVAILABLE),
        (Overloaded("x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (_named("EngineDeadError", VLLMServerError)(), grpc.StatusCode.UNAVAILABLE),
        (_named("QueueOverflowError", VLLMError)(), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (_named("MaxQueuedTokensError", VLLMError)(), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (_named("VLLMValidationError", VLLMClientError)("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (_named("SomeNewClientError", VLLMClientError)("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (ValueError("prompt too long"), grpc.StatusCode.INVALID_ARGUMENT),
        (MemoryError(), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (RuntimeError("boom"), grpc.StatusCode.INTERNAL),
    ],
)
def test_each_exception_maps_to_one_code(exc, code):
    assert to_status(exc)[0] == code


def test_engine_generate_error_reports_its_cause():
    wrapper = _named("EngineGenerateError", VLLMServerError)
    try:
        try:
            raise KeyError("missing")
        except KeyError as inner:
            raise wrapper() from inner
    except Exception as exc:
        code, message = to_status(exc)
    assert code == grpc.StatusCode.INTERNAL
    assert "missing" in message


def test_internal_message_names_the_exception_type():
    assert "RuntimeError" in to_status(RuntimeError("boom"))[1]
