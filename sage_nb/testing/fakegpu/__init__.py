"""Fake NVIDIA GPUs for tests on machines without one: put this folder on ``PYTHONPATH`` (or load
``pynvml.py`` as ``pynvml``) and name a state file in ``$SAGE_NB_FAKE_NVML``. ``pynvml.py`` reports the
GPUs, MIG devices, processes and driver versions the file describes; ``torch/`` is a torch with CUDA
whose ``mem_get_info`` reads the same file and whose CUDA allocations are written into it, so a
process's memory appears in the fake NVML while it lives (``FAKE_TORCH_MODE``: ``noop`` allocates
nothing, ``leak`` keeps it after the process ends, ``wrong-gpu`` puts it on another device)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

PATH = str(Path(__file__).resolve().parent)


def load_pynvml() -> ModuleType:
    """The fake ``pynvml`` as a module object (to put in ``sys.modules["pynvml"]``), nothing else on sys.path."""
    spec = importlib.util.spec_from_file_location("pynvml", Path(PATH) / "pynvml.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gpu(name: str, uuid: str, total_mib: int, used_mib: int = 0, processes: list[dict] | None = None,
        **extra) -> dict:
    """One GPU (or MIG device) of a state file."""
    return {"name": name, "uuid": uuid, "total_mib": total_mib, "used_mib": used_mib,
            "processes": processes or [], **extra}

