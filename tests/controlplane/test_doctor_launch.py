"""The GPU doctor's launch check on CPU: the real Supervisor starts real stand-in processes (the stub engine with
``STUB_GPU_MEMORY``) whose memory grab, through the fake torch, appears in the fake NVML while they live; the
check's PASS path, and its FAIL paths: memory that never appears, memory left after the stop, the wrong GPU."""

from __future__ import annotations

import os

import psutil
import pytest

from sage_nb.controlplane import ControlPlane, Settings
from sage_nb.controlplane.doctor import launch
from sage_nb.testing.fakegpu import gpu

from ..fakegpus import A100, TWO, engine_env, install


@pytest.fixture(autouse=True)
def clean_cuda_env(monkeypatch):
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "SAGE_NB_FAKE_GPUS", "SAGE_NB_GPUS"):
        monkeypatch.delenv(name, raising=False)


def check(tmp_path, mode: str = "", **limits) -> tuple[list[dict], list[dict]]:
    """Run the launch check; returns its steps and what ``say`` heard."""
    env = engine_env(**({"FAKE_TORCH_MODE": mode} if mode else {}))
    base = Settings(state_dir=tmp_path / "user-state", engine_env=env, port_range=(18500, 18599))
    heard: list[dict] = []
    limits = {"ready_s": 20.0, "appear_s": 1.0, "free_s": 1.0, **limits}
    steps = launch.run(base, ControlPlane, heard.append, **limits)
    assert not (tmp_path / "user-state").exists(), "the user's state folder is never touched"
    return steps, heard


def table(steps: list[dict]) -> list[tuple[str, str]]:
    return [(s["step"], s["status"]) for s in steps]


def no_standin_left() -> None:
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and any(
        "stub_gpu" in a or "doctor-standin" in a for a in p.info["cmdline"]) and p.pid != os.getpid()]
    assert left == []


def test_the_launch_path_on_two_gpus_passes_with_its_figures(tmp_path, monkeypatch):
    box = install(monkeypatch, tmp_path, TWO)
    steps, heard = check(tmp_path)
    assert heard == steps
    assert table(steps) == [("launch", "PASS"), ("memory", "PASS"), ("attributed", "PASS"), ("launch", "PASS"),
                            ("placement", "PASS"), ("memory", "PASS"), ("stop", "PASS"), ("stop", "PASS"),
                            ("nothing left", "PASS")], steps
    first, memory, attributed, second, placement = (s["detail"] for s in steps[:5])
    assert "booked 1024 MiB on device 0 (GPU-a100-0000) (gpu_memory_utilization 0.0125)" in first
    assert "CUDA_VISIBLE_DEVICES='GPU-a100-0000'" in first
    assert "NVML shows 1024 MiB under pids" in memory and "expected about 1024 MiB (768 to 1536)" in memory
    assert "attributes 1024 MiB of device 0 (GPU-a100-0000) to doctor-standin-1" in attributed
    assert "on device 1 (GPU-a100-1111)" in second
    assert "went to device 1 while a foreign process" in placement and "holds 80128 MiB on device 0" in placement
    assert "NVML shows its 1024 MiB gone" in steps[6]["detail"] and "booking and port released" in steps[6]["detail"]
    assert not [a for a in box.state().get("allocations", []) if psutil.pid_exists(a["pid"])]
    no_standin_left()


def test_on_one_gpu_the_second_stand_in_is_refused_with_the_numbers(tmp_path, monkeypatch):
    install(monkeypatch, tmp_path, TWO[:1])
    steps, _ = check(tmp_path)
    assert table(steps) == [("launch", "PASS"), ("memory", "PASS"), ("attributed", "PASS"), ("placement", "PASS"),
                            ("stop", "PASS"), ("nothing left", "PASS")], steps
    assert "refused while a foreign process" in steps[3]["detail"]
    assert "no GPU has room" in steps[3]["detail"] and "free: GPU0 256 MiB" in steps[3]["detail"]
    no_standin_left()


def test_memory_that_never_appears_fails(tmp_path, monkeypatch):
    install(monkeypatch, tmp_path, TWO, context_mib=0)
    steps, _ = check(tmp_path, "noop")
    assert table(steps) == [("launch", "PASS"), ("memory", "FAIL"), ("stop", "PASS"), ("nothing left", "PASS")]
    assert "NVML shows 0 MiB under pids" in steps[1]["detail"] and "expected about 1024 MiB" in steps[1]["detail"]
    no_standin_left()


def test_memory_left_after_the_stop_fails(tmp_path, monkeypatch):
    install(monkeypatch, tmp_path, TWO[:1], context_mib=0)
    steps, _ = check(tmp_path, "leak")
    statuses = dict(table(steps))
    assert statuses["stop"] == "FAIL" and statuses["nothing left"] == "FAIL"
    stop = next(s["detail"] for s in steps if s["step"] == "stop")
    assert "but NVML still shows 512 MiB on device 0 (GPU-a100-0000)" in stop
    no_standin_left()


def test_memory_on_the_wrong_gpu_fails(tmp_path, monkeypatch):
    install(monkeypatch, tmp_path, TWO, context_mib=0)
    steps, _ = check(tmp_path, "wrong-gpu")
    assert table(steps)[:2] == [("launch", "PASS"), ("memory", "FAIL")]
    assert "wrong GPU: NVML shows 512 MiB on device 1 (GPU-a100-1111)" in steps[1]["detail"]
    assert "its booking is device 0 (GPU-a100-0000)" in steps[1]["detail"]
    no_standin_left()


def test_a_stand_in_that_cannot_take_memory_fails_with_its_reason(tmp_path, monkeypatch):
    install(monkeypatch, tmp_path, [gpu(A100, "GPU-a100-0000", 81920)], context_mib=0)
    env = {"PYTHONPATH": ""}  # the real (CPU) torch: no CUDA, and no libcuda.so.1 here
    base = Settings(state_dir=tmp_path / "user-state", engine_env=env, port_range=(18500, 18599))
    steps = launch.run(base, ControlPlane, ready_s=20.0, appear_s=1.0, free_s=1.0)
    assert table(steps) == [("launch", "FAIL")]
    assert "cannot take GPU memory" in steps[0]["detail"] and "sees no CUDA device" in steps[0]["detail"]
    no_standin_left()


def test_without_a_gpu_there_is_nothing_to_launch_on(tmp_path, monkeypatch):
    install(monkeypatch, tmp_path, None)
    steps, _ = check(tmp_path)
    assert table(steps) == [("GPU", "SKIP")] and "no NVIDIA GPU" in steps[0]["detail"]
