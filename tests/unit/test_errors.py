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


# Where vLLM 0.32 defines the classes the table names. A class renamed or moved
# out of these modules must fail here: a renamed class would otherwise silently
# fall through to INTERNAL.
_VLLM_EXCEPTION_MODULES = ("vllm.exceptions", "vllm.v1.engine.exceptions")


def _installed_vllm_exceptions() -> dict[str, type]:
    import importlib

    found: dict[str, type] = {}
    for name in _VLLM_EXCEPTION_MODULES:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, type) and issubclass(value, BaseException):
                found[attr] = value
    return found


def test_every_vllm_class_in_the_table_exists_in_the_installed_vllm():
    from backend.errors import _VLLM_BY_NAME

    installed = _installed_vllm_exceptions()
    missing = sorted(set(_VLLM_BY_NAME) - set(installed))
    assert not missing, f"the error table names classes this vLLM does not have: {missing}"


def test_each_real_vllm_exception_maps_to_its_own_code():
    """The first name found on the MRO wins: a real vLLM exception must map to
    its own entry's code, not to a base class's or to INTERNAL."""
    from backend.errors import _VLLM_BY_NAME

    installed = _installed_vllm_exceptions()
    for name, (code, _) in _VLLM_BY_NAME.items():
        cls = installed[name]
        assert to_status(_instance(cls))[0] == code, name


def _instance(cls: type) -> BaseException:
    """An instance of a real vLLM exception class (their constructors differ)."""
    for args in ((), ("detail",), ("detail", "detail")):
        try:
            return cls(*args)
        except TypeError:
            continue
    raise AssertionError(f"cannot construct {cls.__name__}")
