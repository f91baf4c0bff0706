"""The GPU doctor's report on fake boxes (a fake ``pynvml`` over a state file, a fake torch and fake vLLM builds
in the engine's Python): every branch of what it says, its statuses and exit code, and its text."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from sage_nb.controlplane.doctor import render, report

from ..conftest import STUB_PATH
from ..fakegpus import A100, H100, MIG_BOX, MIXED, TWO, engine_env, fake_vllm, install, python_without_site


@pytest.fixture(autouse=True)
def clean_cuda_env(monkeypatch):
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "SAGE_NB_FAKE_GPUS", "SAGE_NB_GPUS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def vllm_dirs(tmp_path):
    return {"cpu": fake_vllm(tmp_path / "vllm-cpu"),
            "cuda": fake_vllm(tmp_path / "vllm-cuda", "vllm", "0.32.0", "cuda")}


def doctor(stub_cp, vllm: str, **settings) -> dict:
    """The report of a control plane whose engine Python sees ``vllm`` (a folder) and the fake torch."""
    env = settings.pop("env", {})
    cp = stub_cp(engine_env=engine_env(vllm, **env), **settings)
    model = report.collect(cp, probe_timeout=30)
    json.dumps(model)  # the REST route and --json send it as it is
    return model


def statuses(model: dict, check: str) -> list[str]:
    return [c["status"] for c in model["checks"] if c["check"] == check]


def detail(model: dict, check: str) -> str:
    return " | ".join(c["detail"] for c in model["checks"] if c["check"] == check)


def test_no_nvidia_gpu_is_said_plainly_and_is_no_problem(stub_cp, monkeypatch, tmp_path, vllm_dirs):
    install(monkeypatch, tmp_path)  # NVML's library is missing
    model = doctor(stub_cp, vllm_dirs["cpu"])
    assert model["nvml"]["found"] is False and model["nvml"]["no_driver"]
    assert statuses(model, "NVML") == ["INFO"] and "no NVIDIA GPU on this machine" in detail(model, "NVML")
    assert model["devices"] == [] and model["server"]["devices"] == []
    assert statuses(model, "torch") == ["INFO"] and "nothing to compare" in detail(model, "torch")
    assert statuses(model, "vLLM") == ["OK"] and "vllm-cpu 0.32.0 (cpu build, platform cpu)" in detail(model, "vLLM")
    assert model["vllm"]["sleep_mode"] is False and statuses(model, "sleep mode") == ["INFO"]
    assert model["exit_code"] == 0 and model["problems"] == 0
    assert "all good (exit status 0)" in render.text(model)
    assert "GPU devices: no NVIDIA GPU on this machine; engines run on the CPU" in render.text(model)


def test_a_driver_that_does_not_start_is_a_warning(stub_cp, monkeypatch, tmp_path, vllm_dirs):
    install(monkeypatch, tmp_path, [], init_error="DriverNotLoaded")
    model = doctor(stub_cp, vllm_dirs["cpu"])
    assert statuses(model, "NVML") == ["WARN"] and "Driver Not Loaded" in detail(model, "NVML")
    assert model["exit_code"] == 1


def test_two_mixed_gpus_with_driver_versions_memory_and_the_order_warning(stub_cp, monkeypatch, tmp_path, vllm_dirs):
    install(monkeypatch, tmp_path, MIXED, cuda_v2=False)  # an old driver: nvmlSystemGetCudaDriverVersion only
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")  # by index, default CUDA_DEVICE_ORDER
    model = doctor(stub_cp, vllm_dirs["cuda"])
    n = model["nvml"]
    assert (n["driver_version"], n["cuda_driver_version"], n["gpu_count"]) == ("550.54.15", "12.4", 2)
    rows = model["devices"]
    assert [(r["index"], r["name"], r["total_mib"], r["used_mib"], r["free_mib"], r["usable"]) for r in rows] == [
        (0, H100, 81559, 1024, 80535, True), (1, L4 := "NVIDIA L4", 23034, 0, 23034, True)]
    assert model["server"]["cuda_visible_devices"] == "1,0" and len(model["server"]["devices"]) == 2
    order = [c for c in model["checks"] if "CUDA_DEVICE_ORDER=PCI_BUS_ID" in c["detail"]]
    assert [c["status"] for c in order] == ["WARN"] and "different GPU models" in order[0]["detail"]
    assert model["exit_code"] == 1
    # the same indices with PCI bus order, or UUIDs: no warning (visible.py's rule, not a second one)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert not doctor(stub_cp, vllm_dirs["cuda"])["server"]["warnings"]
    monkeypatch.delenv("CUDA_DEVICE_ORDER")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-l4")
    model = doctor(stub_cp, vllm_dirs["cuda"])
    assert not model["server"]["warnings"] and model["server"]["devices"] == [
        {"index": 1, "uuid": "GPU-l4-bbbb", "name": L4}]
    assert [r["usable"] for r in model["devices"]] == [False, True]
    assert "may use 1 of 2 GPU device(s): 1 (GPU-l4-bbbb)" in detail(model, "devices")
    assert model["exit_code"] == 0, model["checks"]


def test_the_gpus_setting_narrows_and_a_setting_that_leaves_none_fails(stub_cp, monkeypatch, tmp_path, vllm_dirs):
    install(monkeypatch, tmp_path, MIXED)
    model = doctor(stub_cp, vllm_dirs["cuda"], gpus=[0, 7])
    assert [d["index"] for d in model["server"]["devices"]] == [0] and model["server"]["gpus_setting"] == [0, 7]
    assert "the gpus setting names 7, which is no GPU device of this machine" in detail(model, "devices")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    model = doctor(stub_cp, vllm_dirs["cuda"], gpus=[0])
    assert statuses(model, "devices")[0] == "FAIL" and "leaves this server none" in detail(model, "devices")
    assert model["exit_code"] == 1


def test_mig_devices_and_their_gpu(stub_cp, monkeypatch, tmp_path, vllm_dirs):
    install(monkeypatch, tmp_path, MIG_BOX)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-2g")
    model = doctor(stub_cp, vllm_dirs["cuda"])
    rows = model["devices"]
    assert [(r["kind"], r["index"], r["gpu_index"], r["usable"]) for r in rows] == [
        ("gpu", 0, 0, False), ("mig-gpu", None, 1, True), ("mig", 2, 1, False), ("mig", 3, 1, True)]
    assert (rows[1]["total_mib"], rows[1]["used_mib"], rows[1]["mig_devices"]) == (81920, 512, 2)
    assert (rows[3]["total_mib"], rows[3]["used_mib"], rows[3]["parent_uuid"]) == (19968, 512, "GPU-a100-mig")
    assert [render.device_label(r) for r in rows] == ["0", "GPU1 (MIG mode)", "2 (MIG of GPU1)", "3 (MIG of GPU1)"]
    # torch sees the one MIG device it is given, matched by UUID
    assert rows[3]["torch"]["agrees"] and [d["nvml_uuid"] for d in model["torch"]["devices"]] == ["MIG-2g-1111"]
    assert model["exit_code"] == 0, model["checks"]


def test_torch_agreeing_and_disagreeing_beyond_the_tolerance(stub_cp, monkeypatch, tmp_path, vllm_dirs):
    box = install(monkeypatch, tmp_path, TWO, torch_skew_mib={"GPU-a100-0000": 1000})  # within 2 % of 80 GiB
    model = doctor(stub_cp, vllm_dirs["cuda"])
    first, second = (r["torch"] for r in model["devices"])
    assert (first["diff_mib"], first["tolerance_mib"], first["agrees"]) == (-1000, 1638, True)
    assert (second["diff_mib"], second["agrees"]) == (0, True)
    # both readings are taken while the probe holds its CUDA context: NVML's then, not NVML's before it
    assert second["nvml_free_mib"] == 81920 - 512 == second["free_mib"]
    assert statuses(model, "torch") == ["OK"] and "largest difference 1000 MiB" in detail(model, "torch")
    assert model["exit_code"] == 0
    box.update(torch_skew_mib={"GPU-a100-1111": 2000})
    model = doctor(stub_cp, vllm_dirs["cuda"])
    assert statuses(model, "torch") == ["WARN", "OK"] and model["exit_code"] == 1
    assert "cuda:1 = GPU-a100-1111: torch sees 79408 MiB free, NVML 81408 MiB: -2000 MiB, beyond 1638 MiB " \
           "(max(256 MiB, 2 % of the device's total))" in detail(model, "torch")
    assert "79,408 vs 81,408 (-2,000 !)" in render.text(model)


def test_torch_without_cuda_on_a_gpu_box_and_without_torch(stub_cp, monkeypatch, tmp_path, vllm_dirs):
    install(monkeypatch, tmp_path, TWO)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # no GPU for the server (nor for its torch)
    model = doctor(stub_cp, vllm_dirs["cuda"])
    assert statuses(model, "torch") == ["WARN"] and "sees no CUDA device while NVML lists 2" in detail(model, "torch")
    assert statuses(model, "devices") == ["FAIL"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    cp = stub_cp(engine_env={"PYTHONPATH": str(vllm_dirs["cuda"])}, engine_python=python_without_site(tmp_path))
    model = report.collect(cp)
    assert model["torch"]["installed"] is False and statuses(model, "torch") == ["INFO"]
    assert statuses(model, "vLLM") == ["OK"] and model["vllm"]["build"] == "cuda"


def test_processes_attributed_to_an_engine_and_a_foreign_one(stub_cp, monkeypatch, tmp_path, vllm_dirs, model_dir):
    box = install(monkeypatch, tmp_path, TWO)
    cp = stub_cp(engine_env=engine_env(STUB_PATH))  # the engine is the stub
    engine = cp.start_engine(str(model_dir(1)), name="mine", gpu_memory_utilization=0.1)
    foreign = subprocess.Popen(["sleep", "30"])
    try:
        box.add_process(engine["gpu_ids"][0], engine["pid"], 7000)
        box.add_process(1, foreign.pid, 3000)
        model = report.collect(cp)
    finally:
        foreign.kill()
        foreign.wait()
    holders = {r["index"]: r["holders"] for r in model["devices"]}
    assert holders[0] == [{"kind": "engine", "engine": "mine", "engine_id": engine["id"], "user": None, "mine": True,
                           "used_mib": 7000, "booked_mib": engine["booked_mib"]}]
    assert holders[1] == [{"kind": "process", "pid": foreign.pid, "user": model["user"], "command": "sleep",
                           "used_mib": 3000}]
    text = render.text(model)
    assert f"engine mine, yours ({model['user']}), booked {engine['booked_mib']:,} MiB" in text
    assert f"process sleep (pid {foreign.pid}) of {model['user']}" in text


def test_vllm_absent_cpu_build_on_gpus_and_cuda_build_without_gpu(stub_cp, monkeypatch, tmp_path, vllm_dirs):
    install(monkeypatch, tmp_path, TWO)
    cp = stub_cp(engine_env=engine_env(), engine_python=python_without_site(tmp_path))
    model = report.collect(cp)
    assert model["vllm"]["importable"] is False and statuses(model, "vLLM") == ["FAIL"]
    said = detail(model, "vLLM")
    assert "vLLM is not installed for" in said and "pip install 'sage_nb[gpu]'" in said
    assert model["exit_code"] == 1
    model = doctor(stub_cp, vllm_dirs["cpu"])
    assert statuses(model, "vLLM") == ["FAIL"] and "on a machine with 2 NVIDIA GPU(s): engines would run on the CPU" \
        in detail(model, "vLLM")
    assert "cpu build" in model["vllm"]["sleep_why"] and not model["vllm"]["sleep_mode"]
    model = doctor(stub_cp, vllm_dirs["cuda"], sleep_mode="on")
    assert statuses(model, "vLLM") == ["OK"] and statuses(model, "sleep mode") == ["OK"] and model["exit_code"] == 0
    install(monkeypatch, tmp_path, None)
    model = doctor(stub_cp, vllm_dirs["cuda"], sleep_mode="on")
    assert statuses(model, "vLLM") == ["FAIL"] and "without NVIDIA GPU" in detail(model, "vLLM")
    assert statuses(model, "sleep mode") == ["WARN"]


def test_a_plus_cpu_version_the_stub_and_a_failing_platform(stub_cp, monkeypatch, tmp_path):
    install(monkeypatch, tmp_path, None)
    model = doctor(stub_cp, fake_vllm(tmp_path / "src", "vllm", "0.33.0+cpu", None))
    assert (model["vllm"]["build"], model["vllm"]["distribution"]) == ("cpu", "vllm")
    assert statuses(model, "vLLM") == ["OK", "WARN"] and "RuntimeError: no platform" in detail(model, "vLLM")
    model = doctor(stub_cp, STUB_PATH)
    assert model["vllm"]["build"] == "stand-in" and statuses(model, "vLLM")[0] == "WARN"


def test_an_engine_python_that_does_not_run_or_hangs(stub_cp, monkeypatch, tmp_path):
    install(monkeypatch, tmp_path, TWO)
    model = report.collect(stub_cp(engine_python=str(tmp_path / "no-python")))
    assert statuses(model, "vLLM") == ["FAIL"] and "cannot run the engine's Python" in detail(model, "vLLM")
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nexec sleep 30\n")
    hang.chmod(0o755)
    t0 = time.monotonic()
    model = report.collect(stub_cp(engine_python=str(hang)), probe_timeout=0.5)
    assert time.monotonic() - t0 < 10 and "did not answer in 0.5 s" in detail(model, "vLLM")
    assert "did not answer" in detail(model, "vLLM") and model["exit_code"] == 1


def test_a_fake_inventory_is_said(stub_cp, monkeypatch, tmp_path, vllm_dirs):
    install(monkeypatch, tmp_path, None)
    model = doctor(stub_cp, vllm_dirs["cpu"], fake_gpus=[{"name": A100, "total_mib": 81920, "used_mib": 100,
                                                           "uuid": "GPU-fake-x"}])
    assert model["source"] == "fake" and statuses(model, "fake inventory") == ["INFO"]
    assert [(r["uuid"], r["used_mib"], r["torch"]) for r in model["devices"]] == [("GPU-fake-x", 100, None)]
    assert "GPU devices (fake inventory; MiB)" in render.text(model)
