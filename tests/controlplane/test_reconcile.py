"""Reconciliation after a restart over the stub engine: re-attach, fail the dead, adopt hand-started
servers (with clean names), recover from a corrupt registry."""

import os
import signal
import subprocess
import sys
from contextlib import contextmanager

from sage_nb.controlplane import ControlPlane
from sage_nb.controlplane.engines.probes import healthy
from sage_nb.controlplane.validation import is_engine_name

from ..conftest import BUSY_BOX, STUB_PATH, wait_for


def test_rediscovery_by_a_new_control_plane(stub_cp, model_dir, state_dir):
    cp = stub_cp(fake_gpus=BUSY_BOX)
    a = cp.start_engine(str(model_dir(1)), name="a")
    b = cp.start_engine(str(model_dir(1)), kind="embedding", name="b")
    cp.close()  # the "server" goes away; its engines keep running
    again = stub_cp(fake_gpus=BUSY_BOX)
    report = again.discover()
    assert sorted(report["reattached"]) == sorted([a["id"], b["id"]])
    assert report["adopted"] == [] and report["failed"] == []
    assert {(x["id"], x["kind"], x["state"]) for x in again.engines()} == {
        (a["id"], "llm", "ready"), (b["id"], "embedding", "ready")}
    assert again.discover()["adopted"] == []  # idempotent: never registered twice
    assert len(again.engines()) == 2


def test_discovery_marks_dead_records_failed(stub_cp, model_dir):
    cp = stub_cp(monitor=False)
    e = cp.start_engine(str(model_dir(1)), name="gone")
    os.kill(e["pid"], signal.SIGKILL)
    cp.supervisor.popens[e["id"]].wait()
    report = stub_cp(monitor=False).discover()
    assert report["failed"] == [e["id"]]
    assert cp.engine("gone")["state"] == "failed"


def test_engines_of_another_registry_are_not_adopted(stub_cp, model_dir, tmp_path):
    cp = stub_cp()
    mine = cp.start_engine(str(model_dir(1)), name="mine")
    other = ControlPlane(state_dir=tmp_path / "other-state", monitor=False)
    try:
        report = other.discover()
        assert mine["id"] not in report["adopted"] and other.engines() == []
    finally:
        other.close()


def test_corrupt_registry_is_moved_aside_and_engines_are_readopted(stub_cp, model_dir, state_dir):
    cp = stub_cp()
    e = cp.start_engine(str(model_dir(1)), kind="embedding", name="survivor")
    cp.close()
    db = state_dir / "registry.sqlite3"
    for suffix in ("-wal", "-shm"):
        if (state_dir / f"registry.sqlite3{suffix}").exists():
            (state_dir / f"registry.sqlite3{suffix}").unlink()
    db.write_bytes(b"this is not a database" * 100)
    again = stub_cp()
    assert again.registry.recovered_from is not None and again.registry.recovered_from.exists()
    report = again.discover()
    assert report["adopted"] == [e["id"]]  # same id, recovered from the engine's own environment
    engine = again.engine(e["id"])
    assert engine["kind"] == "embedding" and engine["state"] == "ready" and "lost" in engine["note"]
    assert again.stop_engine(e["id"])["state"] == "stopped"


@contextmanager
def hand_started(port: int, *args: str, env: dict | None = None):
    """A stub vLLM server started by hand, outside sage_nb (no registry, no engine id); ``env``: more
    of its environment."""
    hand = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
                             "--port", str(port), *args], env={**os.environ, "PYTHONPATH": STUB_PATH, **(env or {})},
                            stdout=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: healthy("127.0.0.1", port), timeout=10)
        yield hand
    finally:
        hand.kill()
        hand.wait()


def test_hand_started_servers_are_adopted_only_when_allowed(stub_cp):
    with hand_started(18490, "--model", "hand", "--runner", "pooling") as hand:
        assert stub_cp(adopt_unrecorded=False).discover()["adopted"] == []
        report = stub_cp(adopt_unrecorded=True).discover()
        hand_engines = [e for e in stub_cp().engines() if e["pid"] == hand.pid]
        assert len(hand_engines) == 1 and hand_engines[0]["id"] in report["adopted"]
        assert hand_engines[0]["kind"] == "embedding" and hand_engines[0]["adopted"]


def test_adopted_names_follow_the_rule_of_launched_ones(stub_cp):
    with hand_started(18491, "--model", "/models/org/model", "--served-model-name", "org/model:latest") as hand:
        cp = stub_cp(adopt_unrecorded=True)
        assert len(cp.discover()["adopted"]) == 1
        engine = next(e for e in cp.engines() if e["pid"] == hand.pid)
        assert engine["name"] == "model-latest" and is_engine_name(engine["name"])
        assert engine["served_model_name"] == "org/model:latest"  # what clients ask for is unchanged
        assert cp.engine("model-latest")["id"] == engine["id"]
        assert cp.stop_engine("model-latest")["state"] == "stopped"
        assert hand.wait(timeout=10) is not None
