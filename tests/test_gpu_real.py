"""On a machine with a real NVIDIA GPU: ``python -m sage_nb.doctor --gpu`` and ``--launch`` for real (NVML, the
driver, torch's CUDA and the CUDA vLLM of the engine's Python; stand-in engines that take real GPU memory).
These tests carry the ``gpu`` marker and are skipped only where NVML finds no GPU: the only skips allowed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu


def nvidia_gpus() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:  # no driver, no library: no GPU here
        return 0


@pytest.fixture(autouse=True)
def needs_a_gpu():
    if not nvidia_gpus():
        pytest.skip("no NVIDIA GPU on this machine (NVML finds none)")


def doctor(tmp_path, *args: str) -> tuple[int, dict]:
    env = {**os.environ, "SAGE_NB_STATE_DIR": str(tmp_path / "state")}
    out = subprocess.run([sys.executable, "-m", "sage_nb.doctor", "--gpu", "--json", *args], capture_output=True,
                         text=True, env=env, timeout=600)
    assert out.returncode in (0, 1), out.stdout + out.stderr
    return out.returncode, json.loads(out.stdout)


def test_the_report_reads_the_real_gpus(tmp_path):
    code, model = doctor(tmp_path)
    print(json.dumps(model["checks"], indent=1))
    assert model["nvml"]["found"] and model["nvml"]["driver_version"] and model["nvml"]["cuda_driver_version"]
    assert model["devices"] and all(r["total_mib"] for r in model["devices"])
    assert not [c for c in model["checks"] if c["status"] == "FAIL"], model["checks"]
    if model["torch"].get("cuda"):  # torch with CUDA: every device it sees is one NVML lists
        assert all(d["nvml_uuid"] for d in model["torch"]["devices"]), model["torch"]
    assert code == model["exit_code"]


def test_the_launch_check_passes_on_real_gpus(tmp_path):
    _code, model = doctor(tmp_path, "--launch")
    steps = model["launch"]
    print("\n".join(f"{s['status']} {s['step']}: {s['detail']}" for s in steps))
    assert steps and all(s["status"] == "PASS" for s in steps), steps
    assert steps[-1]["step"] == "nothing left"
