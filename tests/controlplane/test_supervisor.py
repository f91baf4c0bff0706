"""The Supervisor over the stub engine: dead, exiting, slow and unlaunchable engines fail; stop,
stop_all, relaunch on a fresh port. test_vllm_engines.py repeats the lifecycle with real engines."""

import os
import signal
import socket
import time

import pytest

from sage_nb.controlplane import EngineFailed
from sage_nb.controlplane.engines.process import group_members

from ..conftest import BUSY_BOX, STUB_PATH, leases, wait_for


def test_dead_engine_fails_within_seconds_and_prune_frees(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=BUSY_BOX)
    e = cp.start_engine(str(model_dir(1)), name="victim")
    t0 = time.monotonic()
    os.kill(e["pid"], signal.SIGKILL)
    failed = wait_for(lambda: (x := cp.engine("victim"))["state"] == "failed" and x, timeout=10)
    assert time.monotonic() - t0 < 5
    assert "died" in failed["error"]
    assert cp.backends()["llm_backends"] == []
    assert cp.prune() == [e["id"]]
    assert leases(cp) == ({}, []) and cp.engines() == []


def test_engine_that_exits_during_start_fails_with_log_tail(stub_cp, model_dir):
    cp = stub_cp(engine_env={"PYTHONPATH": "/nonexistent"}, engine_python="/bin/false")
    with pytest.raises(EngineFailed, match="before it was ready"):
        cp.start_engine(str(model_dir(1)), name="bad")
    assert cp.engine("bad")["state"] == "failed"
    assert leases(cp) == ({}, [])


def test_missing_interpreter_fails_cleanly(stub_cp, model_dir):
    cp = stub_cp(engine_python="/nonexistent/python")
    with pytest.raises(EngineFailed, match="could not be launched"):
        cp.start_engine(str(model_dir(1)), name="nopython")
    assert cp.engine("nopython")["state"] == "failed" and leases(cp) == ({}, [])


def test_startup_timeout(stub_cp, model_dir):
    cp = stub_cp(engine_env={"PYTHONPATH": STUB_PATH, "STUB_STARTUP_DELAY": "30"},
                 startup_timeout=1.5)
    with pytest.raises(EngineFailed, match="not ready within"):
        cp.start_engine(str(model_dir(1)), name="slow")
    e = cp.engine("slow")
    assert not group_members(e["pid"]) and leases(cp) == ({}, [])


def test_stop_a_starting_engine(stub_cp, model_dir):
    cp = stub_cp(engine_env={"PYTHONPATH": STUB_PATH, "STUB_STARTUP_DELAY": "30"})
    e = cp.start_engine(str(model_dir(1)), name="early", wait=False)
    assert e["state"] == "starting"
    assert cp.stop_engine("early")["state"] == "stopped"
    assert leases(cp) == ({}, [])


def test_port_taken_between_lease_and_bind_moves_to_a_fresh_port(stub_cp, model_dir):
    cp = stub_cp(engine_env={"PYTHONPATH": STUB_PATH, "STUB_STARTUP_DELAY": "1.5"})
    e = cp.start_engine(str(model_dir(1)), name="raced", wait=False)
    with socket.socket() as thief:  # someone else binds the leased port before vLLM does
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        thief.bind(("127.0.0.1", e["port"]))
        thief.listen()
        ready = cp.wait_ready("raced", timeout=30)
    assert ready["state"] == "ready" and ready["port"] != e["port"]
    assert f"port {e['port']} was taken" in ready["note"]
    assert list(leases(cp)[0]) == [ready["port"]]  # the first lease was released
    # an explicitly requested port is not moved: the engine fails with the reason
    cp.stop_engine("raced")
    with socket.socket() as thief:
        f = cp.start_engine(str(model_dir(1)), name="pinned", port=ready["port"], wait=False)
        thief.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        thief.bind(("127.0.0.1", f["port"]))
        thief.listen()
        with pytest.raises(EngineFailed, match="Address already in use"):
            cp.wait_ready("pinned", timeout=30)
    assert leases(cp) == ({}, [])


def test_engine_command_carries_the_derived_flags():
    from sage_nb.controlplane.engines.process import engine_command

    cmd = engine_command("py", "/m", 18001, "m", kind="embedding", tensor_parallel_size=2, max_model_len=4096,
                         gpu_memory_utilization=0.4567, extra_args=["--seed", "1"])
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.4567"
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2" and cmd[cmd.index("--runner") + 1] == "pooling"
    assert cmd[-2:] == ["--seed", "1"] and cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_stop_all_stops_every_live_engine_then_prunes(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=BUSY_BOX)
    ready = cp.start_engine(str(model_dir(1)), name="ready-one")
    starting = cp.start_engine(str(model_dir(1)), kind="embedding", name="still-starting", wait=False)
    kept = stub_cp(fake_gpus=BUSY_BOX, monitor=False).stop_all(prune=False)  # another process, same registry
    assert sorted(kept["stopped"]) == sorted([ready["id"], starting["id"]]) and kept["pruned"] == []
    assert {e["state"] for e in cp.engines()} == {"stopped"} and leases(cp) == ({}, [])
    assert not group_members(ready["pid"]) and not group_members(starting["pid"])
    assert cp.stop_all() == {"stopped": [], "failed": [], "pruned": [ready["id"], starting["id"]]}
    assert cp.engines() == []


def test_the_supervisor_is_the_one_owner_of_engine_processes(stub_cp, model_dir):
    cp = stub_cp()
    e = cp.start_engine(str(model_dir(1)), name="owned")
    assert cp.supervisor.popens[e["id"]].pid == e["pid"] and cp.supervisor.monitoring
    cp.stop_engine("owned")
    assert e["id"] not in cp.supervisor.popens  # reaped with the stop
    cp.close()
    assert not cp.supervisor.monitoring
