"""Who holds a GPU's memory: this user's engines (by name), other sage_nb users' engines (by user and
engine, from the shared ledger), other processes NVML lists (by user and command, where psutil can
see them), what nothing accounts for, then booked-but-not-yet-used and free. The dashboard's bar and
``%llm gpus`` show these parts."""

from __future__ import annotations

import psutil

from ..engines import process
from .placement import GpuView


def _process(pid: int) -> tuple[str, str]:
    """(user, command) of a process, as far as this user may see it."""
    try:
        proc = psutil.Process(pid)
        return proc.username(), proc.name()
    except (psutil.Error, KeyError):  # gone, or another user's process hidden by hidepid
        return "?", "?"


def parts(view: GpuView, mine: list[dict], others: list[dict], pids: dict[str, set[int]]) -> dict:
    """The parts of one GPU's memory. ``mine``: this registry's bookings on it (``engine_id``, ``name``,
    ``mib``); ``others``: the shared ledger's rows of other registries on it; ``pids``: each engine's
    processes (to read what NVML shows them using)."""
    device = view.device
    engine_pids: set[int] = set()

    def held(entry: dict, extra: dict) -> dict:
        own = pids.get(entry["engine_id"], set())
        engine_pids.update(own)
        used = sum(device.process_mib.get(p, 0) for p in own)
        return {**extra, "engine_id": entry["engine_id"], "booked_mib": entry["mib"], "used_mib": used}

    out = {"mine": [held(e, {"name": e["name"]}) for e in mine],
           "others": [held(r, {"user": r["owner"], "name": r["engine_name"]}) for r in others]}
    processes = []
    for pid, mib in sorted(device.process_mib.items()):
        if pid not in engine_pids:
            user, command = _process(pid)
            processes.append({"pid": pid, "user": user, "command": command, "used_mib": mib})
    out["processes"] = processes
    accounted = sum(e["used_mib"] for e in out["mine"] + out["others"]) + sum(p["used_mib"] for p in processes)
    out["unaccounted_mib"] = max(0, device.used_mib - accounted)
    out["booked_unused_mib"] = view.outstanding_mib
    out["free_mib"] = view.available_mib
    return out


def engine_pids(engines, foreign: list[dict], remote: set[str] | None = None) -> dict[str, set[int]]:
    """Each engine's processes (this registry's ``engines`` and the ledger's ``foreign`` bookings), to match
    NVML's list. With a Ray cluster (``remote``: its GPUs' uuids), the engines on its nodes and the others'
    bookings of its GPUs are left out: their pids are not this machine's."""
    wanted = {e.id: (e.pid, e.create_time) for e in engines if remote is None or not e.node}
    wanted.update({r["engine_id"]: (r["pid"], r["start_time"]) for r in foreign
                   if remote is None or r["gpu_uuid"] not in remote})
    return process.trees_pids(wanted)
