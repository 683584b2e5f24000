"""Which pooled worker the pool stops when it needs room (tests/conftest.Workers).

A worker process is ~8 s of CPU to start again and a loaded engine ~16 s more,
so the pool stops the idle worker cheapest to lose, and starts a process rather
than unload an engine when the worker it would stop for it has none."""

from __future__ import annotations

from dataclasses import dataclass, field

from tests.conftest import DEFAULT_CONFIG, Workers

GRPCIO = ((("BACKEND_TRANSPORT", "grpcio"),), DEFAULT_CONFIG[1])


@dataclass
class FakeProc:
    returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


@dataclass
class FakeWorker:
    name: str
    loaded: object = None  # bytes: an engine's load key
    proc: FakeProc = field(default_factory=FakeProc)


def pool(*live: tuple[tuple, FakeWorker], size: int = 4, leased: tuple = ()) -> Workers:
    p = Workers(size=size)
    p._live = list(live)  # least recently used first
    for w in leased:
        p._leases[id(w)] = w.loaded
    return p


def victim(p: Workers) -> str | None:
    found = p._victim()
    return None if found is None else found[1].name


def test_an_idle_worker_without_an_engine_goes_before_any_loaded_one():
    old_loaded = FakeWorker("old-loaded", loaded=b"tiny")
    new_unloaded = FakeWorker("new-unloaded")
    p = pool((DEFAULT_CONFIG, old_loaded), (DEFAULT_CONFIG, new_unloaded))
    assert victim(p) == "new-unloaded"


def test_among_loaded_ones_another_configuration_goes_first_then_the_least_recent():
    a = FakeWorker("default-old", loaded=b"tiny")
    b = FakeWorker("grpcio-new", loaded=b"tiny")
    c = FakeWorker("default-new", loaded=b"chat")
    assert victim(pool((DEFAULT_CONFIG, a), (GRPCIO, b), (DEFAULT_CONFIG, c))) == "grpcio-new"
    assert victim(pool((DEFAULT_CONFIG, a), (DEFAULT_CONFIG, c))) == "default-old"


def test_an_exited_worker_goes_first_and_a_leased_one_never():
    dead = FakeWorker("dead", loaded=b"tiny", proc=FakeProc(returncode=0))
    held = FakeWorker("held")
    idle = FakeWorker("idle")
    assert victim(pool((DEFAULT_CONFIG, idle), (DEFAULT_CONFIG, dead))) == "dead"
    assert victim(pool((DEFAULT_CONFIG, held), (DEFAULT_CONFIG, idle), leased=(held,))) == "idle"
    assert victim(pool((DEFAULT_CONFIG, held), leased=(held,))) is None


def test_room_for_a_process_unless_an_engine_would_be_stopped_for_it():
    loaded = [FakeWorker(f"l{i}", loaded=b"tiny") for i in range(2)]
    spare = FakeWorker("spare")
    below = pool(*((DEFAULT_CONFIG, w) for w in loaded), size=3)
    assert below._room()
    full_cheap = pool(*((DEFAULT_CONFIG, w) for w in loaded), (GRPCIO, spare), size=3)
    assert full_cheap._room()
    full_loaded = pool(*((DEFAULT_CONFIG, w) for w in loaded), size=2)
    assert not full_loaded._room()
    all_held = pool((DEFAULT_CONFIG, spare), size=1, leased=(spare,))
    assert not all_held._room()
