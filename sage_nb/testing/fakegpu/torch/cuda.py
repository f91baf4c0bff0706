"""``torch.cuda`` of the fake torch: the devices ``CUDA_VISIBLE_DEVICES`` gives this process, read from
the fake NVML's state file; each device's first use takes the state's ``context_mib`` (a CUDA context)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pynvml as nvml  # the fake one beside this package

MIB = 1024 * 1024
_contexts: set[str] = set()  # the devices this process has a context on


def _visible(state: dict) -> list[dict]:
    """The devices named by ``CUDA_VISIBLE_DEVICES`` (indices, GPU-/MIG- UUID prefixes; the first entry that
    names nothing ends the list), or every device when it is unset."""
    units = nvml.units(state)
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return units
    out: list[dict] = []
    for token in (t.strip() for t in value.split(",") if value.strip()):
        gpus = state.get("gpus", [])
        if token.isdigit() and int(token) < len(gpus):
            gpu = gpus[int(token)]
            found = gpu["mig"] if isinstance(gpu.get("mig"), list) else [gpu]
        else:
            prefix = token.lower()
            matches = [u for u in units if u["uuid"].lower().startswith(prefix)]
            parents = [g for g in gpus if isinstance(g.get("mig"), list) and g["uuid"].lower().startswith(prefix)]
            found = matches if len(matches) == 1 else parents[0]["mig"] if not matches and len(parents) == 1 else []
        if not found:  # CUDA ignores it and every entry after it
            break
        out += [u for u in found if u not in out]
    return out


def _state() -> dict | None:
    try:
        state = nvml.read_state()
    except nvml.NVMLError:
        return None
    return None if state.get("init_error") else state


def is_available() -> bool:
    state = _state()
    return bool(state and _visible(state))


def device_count() -> int:
    state = _state()
    return len(_visible(state)) if state else 0


def index_of(device) -> int:
    """``None``, ``0``, ``"cuda"``, ``"cuda:1"`` → the index among the visible devices."""
    if device is None:
        return 0
    if isinstance(device, int):
        return device
    text = str(device)
    return int(text.partition(":")[2] or 0)


def _unit(index: int) -> dict:
    state = _state()
    devices = _visible(state) if state else []
    if not 0 <= index < len(devices):
        raise RuntimeError(f"CUDA error: invalid device ordinal {index} ({len(devices)} visible)")
    return devices[index]


def _init(unit: dict) -> None:
    if unit["uuid"] not in _contexts:
        _contexts.add(unit["uuid"])
        mib = int(nvml.read_state().get("context_mib", 0))
        if mib:
            _record(unit["uuid"], mib, keep=False)


def _record(uuid: str, mib: int, keep: bool) -> None:
    with nvml.changing_state() as state:
        state.setdefault("allocations", []).append({"pid": os.getpid(), "uuid": uuid, "mib": mib, "keep": keep})


def allocate(index: int, mib: int) -> None:
    """Take ``mib`` on visible device ``index``, as ``FAKE_TORCH_MODE`` says."""
    unit = _unit(index)
    _init(unit)
    mode = os.environ.get("FAKE_TORCH_MODE", "")
    if mode == "noop":
        return
    uuid = unit["uuid"]
    if mode == "wrong-gpu":
        uuid = next((u["uuid"] for u in nvml.units(nvml.read_state()) if u["uuid"] != uuid), uuid)
    free = mem_get_info(index)[0] // MIB
    if mib > free:
        raise RuntimeError(f"CUDA out of memory. Tried to allocate {mib} MiB; {free} MiB free")
    _record(uuid, mib, keep=mode == "leak")


def mem_get_info(device=None) -> tuple[int, int]:
    """(free, total) bytes of a visible device, as CUDA sees it (``torch_skew_mib`` less free than NVML)."""
    unit = _unit(index_of(device))
    _init(unit)
    state = nvml.read_state()
    used = nvml._used_mib(unit, state) + int((state.get("torch_skew_mib") or {}).get(unit["uuid"], 0))
    total = unit["total_mib"]
    return max(0, total - used) * MIB, total * MIB


def get_device_properties(device) -> SimpleNamespace:
    unit = _unit(index_of(device))
    return SimpleNamespace(name=unit["name"], total_memory=unit["total_mib"] * MIB,
                           uuid=unit["uuid"].split("-", 1)[1] if "-" in unit["uuid"] else unit["uuid"])
