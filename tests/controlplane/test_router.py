import time
from collections import Counter

import pytest

from sage_nb.controlplane.errors import BadRequest, NotFound
from sage_nb.controlplane.routing.router import NoBackend, Router
from sage_nb.controlplane.store.registry import Engine, Registry


@pytest.fixture
def router(tmp_path):
    reg = Registry(tmp_path / "r.db")
    with reg.transaction() as txn:
        for i, (kind, served) in enumerate([("llm", "m"), ("llm", "m"), ("llm", "m"), ("embedding", "e")]):
            txn.insert(Engine(id=f"id{i}", name=f"n{i}", model=f"/models/{served}", served_model_name=served,
                              kind=kind, state="ready", port=18000 + i))
    return Router(reg)


def test_idle_replicas_take_turns(router):
    picks = Counter(router.pick("llm", "m").id for _ in range(30))
    assert picks == {"id0": 10, "id1": 10, "id2": 10}


def test_least_in_flight_wins(router):
    busy = router.pick("llm", "m")
    router.acquire(busy)
    assert all(router.pick("llm", "m").id != busy.id for _ in range(6))
    router.release(busy)
    assert not router.inflight


def test_by_name_path_or_id_never_by_port_and_errors(router):
    assert router.pick("llm", "n1").id == "id1" and router.pick("llm", "id2").id == "id2"
    assert router.pick("embedding", "/models/e").id == "id3"
    with pytest.raises(BadRequest, match="is an embedding model"):
        router.pick("llm", "e")
    with pytest.raises(NotFound):
        router.pick("llm", "18000")
    with pytest.raises(NoBackend, match="No embedding backend"):
        router.pick("embedding", exclude=frozenset({"id3"}))


def test_own_changes_route_at_once_and_another_process_within_recheck(router, tmp_path):
    from sage_nb.controlplane.routing import router as router_mod

    assert router.is_ready("id0")
    router.registry.update("id0", state="stopping")  # this process's own commit: seen by the next pick
    assert not router.is_ready("id0")
    other = Registry(tmp_path / "r.db")  # another process's view of the same registry
    other.update("id1", state="stopping")
    deadline = time.monotonic() + router_mod.RECHECK_S * 20
    while router.is_ready("id1"):
        assert time.monotonic() < deadline, "another process's change never reached the router"
        time.sleep(0.005)
    assert {e.id for e in router.ready_engines()} == {"id2", "id3"}
