import pytest

from sage_nb.controlplane.errors import IllegalTransition, NotFound
from sage_nb.controlplane.state import EngineState, check_transition
from sage_nb.controlplane.store.registry import Engine, Registry

LEGAL = [("starting", "ready"), ("ready", "stopping"), ("stopping", "stopped"),
         ("starting", "failed"), ("ready", "failed"), ("starting", "stopping"),
         ("stopping", "failed"),
         # idle engines
         ("ready", "sleeping"), ("sleeping", "waking"), ("waking", "ready"), ("sleeping", "ready"),
         ("ready", "unloaded"), ("unloaded", "starting"), ("sleeping", "unloaded"),
         ("sleeping", "stopping"), ("waking", "stopping"), ("unloaded", "stopping"),
         ("sleeping", "failed"), ("waking", "failed"), ("unloaded", "failed")]
ILLEGAL = [("stopped", "ready"), ("stopped", "starting"), ("failed", "ready"), ("ready", "starting"),
           ("ready", "stopped"), ("starting", "stopped"), ("failed", "stopping"), ("stopped", "failed"),
           ("starting", "sleeping"), ("unloaded", "ready"), ("waking", "sleeping"), ("stopped", "unloaded"),
           ("failed", "waking"), ("starting", "unloaded")]


@pytest.mark.parametrize("cur,new", LEGAL)
def test_legal_transitions(cur, new):
    assert check_transition(cur, new) == EngineState(new)


@pytest.mark.parametrize("cur,new", ILLEGAL)
def test_illegal_transitions_raise(cur, new):
    with pytest.raises(IllegalTransition, match=f"{cur} -> {new}"):
        check_transition(cur, new)


def test_unknown_state_is_rejected():
    with pytest.raises(ValueError):
        check_transition("ready", "paused")


def _engine(i="e1", name="one"):
    return Engine(id=i, name=name, model="m", served_model_name=name, kind="llm", api_key="k")


def test_registry_enforces_state_machine(tmp_path):
    reg = Registry(tmp_path / "r.db")
    with reg.transaction() as txn:
        txn.insert(_engine())
    assert reg.update("e1", state="ready").state == "ready"
    with pytest.raises(IllegalTransition):
        reg.update("e1", state="starting")
    assert reg.find("one").state == "ready"  # the failed change left nothing behind


def test_registry_transaction_rolls_back(tmp_path):
    reg = Registry(tmp_path / "r.db")
    with pytest.raises(RuntimeError), reg.transaction() as txn:
        txn.insert(_engine())
        txn.lease_port(18000, "e1")
        raise RuntimeError("boom")
    assert reg.engines() == []
    with reg.snapshot() as txn:
        assert txn.leases() == {}


def test_registry_is_shared_and_private(tmp_path):
    a, b = Registry(tmp_path / "r.db"), Registry(tmp_path / "r.db")
    with a.transaction() as txn:
        txn.insert(_engine())
    assert [e.id for e in b.engines()] == ["e1"]
    assert (tmp_path / "r.db").stat().st_mode & 0o077 == 0
    with b.snapshot() as txn:
        assert txn.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_find_by_id_or_name_and_not_found(tmp_path):
    reg = Registry(tmp_path / "r.db")
    with reg.transaction() as txn:
        txn.insert(_engine("e1", "one"))
        txn.insert(_engine("e2", "two"))
    assert reg.find("e2").name == "two"
    assert reg.find("one").id == "e1"
    with pytest.raises(NotFound):
        reg.find("three")


def test_public_model_hides_secrets():
    model = _engine().to_model()
    assert "api_key" not in model and "create_time" not in model
    assert model["state"] == "starting"
