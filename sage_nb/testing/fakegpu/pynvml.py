"""A fake ``pynvml`` (nvidia-ml-py) over a JSON state file, for tests on machines without an NVIDIA GPU.

The state file is named by ``$SAGE_NB_FAKE_NVML``; it is read again at every call, so a test (or a
process using the fake ``torch`` beside this module) changes what NVML reports while it runs::

    {"driver": "550.54.15", "cuda": 12040,        # nvmlSystemGetDriverVersion, ...GetCudaDriverVersion
     "cuda_v2": true,                              # false: no nvmlSystemGetCudaDriverVersion_v2 (old driver)
     "init_error": null,                           # "LibraryNotFound", "DriverNotLoaded" or any text: nvmlInit fails
     "gpus": [{"name", "uuid", "total_mib", "used_mib", "processes": [{"pid", "used_mib"}],
               "mig": [...]}],                     # a GPU in MIG mode: its MIG devices (same keys);
                                                   # "mig": null: MIG-capable, MIG mode off; absent: no MIG
     "context_mib": 512,                           # what the fake torch's CUDA context takes on a device
     "torch_skew_mib": {"GPU-...": 1024},          # the fake torch sees this much less free memory than NVML
     "allocations": [{"pid", "uuid", "mib", "keep"}]}  # written by the fake torch (see torch/__init__.py)

``used_mib`` of a device includes its listed ``processes``; an allocation adds to it while its process
lives (as the driver frees a dead process's memory), or for good with ``"keep": true`` (a leak). Without
``$SAGE_NB_FAKE_NVML`` (or with a missing file) nvmlInit fails as on a machine without the driver.
"""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from types import SimpleNamespace

MIB = 1024 * 1024
ENV = "SAGE_NB_FAKE_NVML"
NVML_DEVICE_MIG_ENABLE = 1
NVML_DEVICE_MIG_DISABLE = 0
MAX_MIG = 7


class NVMLError(Exception):
    """Like pynvml's: ``value`` is NVML's return code."""

    def __init__(self, value: int, text: str | None = None) -> None:
        super().__init__(text or MESSAGES.get(value, f"NVML error {value}"))
        self.value = value


MESSAGES = {3: "Not Supported", 6: "Not Found", 9: "Driver Not Loaded", 12: "NVML Shared Library Not Found",
            13: "Function Not Found", 999: "Unknown Error"}


def _error(name: str, value: int) -> type[NVMLError]:
    return type(f"NVMLError_{name}", (NVMLError,), {"__init__": lambda self, text=None: NVMLError.__init__(
        self, value, text)})


NVMLError_NotSupported = _error("NotSupported", 3)
NVMLError_NotFound = _error("NotFound", 6)
NVMLError_DriverNotLoaded = _error("DriverNotLoaded", 9)
NVMLError_LibraryNotFound = _error("LibraryNotFound", 12)
NVMLError_FunctionNotFound = _error("FunctionNotFound", 13)
NVMLError_Unknown = _error("Unknown", 999)


# ---------------------------------------------------------------------- the state file
def state_path() -> str | None:
    return os.environ.get(ENV) or None


def read_state() -> dict:
    path = state_path()
    if not path:
        raise NVMLError_LibraryNotFound()
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise NVMLError_LibraryNotFound() from None


@contextmanager
def changing_state():
    """The state, to change in place; written back atomically under a lock when the block ends."""
    path = state_path()
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = read_state()
        yield state
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(state, f)
        os.replace(tmp, path)


def write_state(path: str, state: dict) -> None:
    """Write a whole state file (tests)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"  # a zombie's memory is freed already
    except (OSError, IndexError):
        return False


def live_allocations(state: dict) -> list[dict]:
    return [a for a in state.get("allocations", []) if a.get("keep") or _alive(a["pid"])]


def units(state: dict) -> list[dict]:
    """The devices a process may be given, in NVML's order: each GPU, or a MIG-mode GPU's MIG devices."""
    out = []
    for gpu in state.get("gpus", []):
        out += gpu["mig"] if isinstance(gpu.get("mig"), list) else [gpu]
    return out


# ---------------------------------------------------------------------- pynvml's functions
class _Handle(SimpleNamespace):
    """A device: ``gpu`` (index), ``mig`` (its MIG device's index, or None)."""


def _device(handle: _Handle, state: dict) -> dict:
    gpu = state["gpus"][handle.gpu]
    return gpu if handle.mig is None else gpu["mig"][handle.mig]


def nvmlInit() -> None:
    state = read_state()
    error = state.get("init_error")
    if error:
        known = {"LibraryNotFound": NVMLError_LibraryNotFound, "DriverNotLoaded": NVMLError_DriverNotLoaded}
        raise known[error]() if error in known else NVMLError_Unknown(error)


def nvmlShutdown() -> None:
    pass


def nvmlSystemGetDriverVersion() -> str:
    return read_state().get("driver", "550.54.15")


def nvmlSystemGetCudaDriverVersion() -> int:
    return int(read_state().get("cuda", 12040))


def nvmlSystemGetCudaDriverVersion_v2() -> int:
    state = read_state()
    if not state.get("cuda_v2", True):
        raise NVMLError_FunctionNotFound()
    return int(state.get("cuda", 12040))


def nvmlDeviceGetCount() -> int:
    return len(read_state().get("gpus", []))


def nvmlDeviceGetHandleByIndex(index: int) -> _Handle:
    if not 0 <= index < nvmlDeviceGetCount():
        raise NVMLError(2, "Invalid Argument")
    return _Handle(gpu=index, mig=None)


def nvmlDeviceGetUUID(handle: _Handle) -> str:
    return _device(handle, read_state())["uuid"]


def nvmlDeviceGetName(handle: _Handle) -> str:
    return _device(handle, read_state())["name"]


def nvmlDeviceGetMigMode(handle: _Handle) -> list[int]:
    gpu = read_state()["gpus"][handle.gpu]
    if handle.mig is not None or "mig" not in gpu:
        raise NVMLError_NotSupported()
    return [NVML_DEVICE_MIG_ENABLE if isinstance(gpu["mig"], list) else NVML_DEVICE_MIG_DISABLE, 0]


def nvmlDeviceGetMaxMigDeviceCount(handle: _Handle) -> int:
    return MAX_MIG


def nvmlDeviceGetMigDeviceHandleByIndex(handle: _Handle, index: int) -> _Handle:
    slices = read_state()["gpus"][handle.gpu].get("mig") or []
    if index >= len(slices):
        raise NVMLError_NotFound()
    return _Handle(gpu=handle.gpu, mig=index)


def _used_mib(device: dict, state: dict) -> int:
    own = device["used_mib"] + sum(a["mib"] for a in live_allocations(state) if a["uuid"] == device["uuid"])
    if isinstance(device.get("mig"), list):  # a MIG-mode GPU: what its MIG devices use too
        own += sum(_used_mib(s, state) for s in device["mig"])
    return own


def nvmlDeviceGetMemoryInfo(handle: _Handle, version=None) -> SimpleNamespace:
    state = read_state()
    device = _device(handle, state)
    total = device["total_mib"]
    used = min(total, _used_mib(device, state))
    return SimpleNamespace(total=total * MIB, used=used * MIB, free=(total - used) * MIB)


def nvmlDeviceGetUtilizationRates(handle: _Handle) -> SimpleNamespace:
    if handle.mig is not None:
        raise NVMLError_NotSupported()
    return SimpleNamespace(gpu=0, memory=0)


def nvmlDeviceGetComputeRunningProcesses(handle: _Handle) -> list[SimpleNamespace]:
    state = read_state()
    device = _device(handle, state)
    procs = [(p["pid"], p["used_mib"]) for p in device.get("processes") or []]
    procs += [(a["pid"], a["mib"]) for a in live_allocations(state) if a["uuid"] == device["uuid"]]
    return [SimpleNamespace(pid=pid, usedGpuMemory=mib * MIB, gpuInstanceId=None, computeInstanceId=None)
            for pid, mib in procs]
