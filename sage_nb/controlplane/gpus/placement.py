"""GPU selection: live free memory minus bookings NVML cannot see yet, best fit for N GPUs.

This is the one selection path for every caller (server, kernel, REST, magics).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import BadRequest, NoRoom
from .inventory import GpuDevice


@dataclass
class GpuView:
    """A GPU with what sage_nb has booked on it."""

    device: GpuDevice
    booked_mib: int = 0        # all bookings of sage_nb engines on this GPU
    outstanding_mib: int = 0   # the part of them NVML does not show as used yet

    @property
    def available_mib(self) -> int:
        return max(0, self.device.free_mib - self.outstanding_mib)

    def to_model(self) -> dict:
        d = self.device
        return {"index": d.index, "uuid": d.uuid, "name": d.name, "total_mib": d.total_mib,
                "used_mib": d.used_mib, "free_mib": d.free_mib, "booked_mib": self.booked_mib,
                "available_mib": self.available_mib, "utilization": d.utilization,
                "mig": d.mig, "parent_uuid": d.parent_uuid, "node": d.node}


def gpu_views(devices: Iterable[GpuDevice], bookings: Iterable[tuple[str, int, str, int]],
              engine_pids: dict[str, set[int]]) -> list[GpuView]:
    """Combine live readings with the booking ledger.

    A booking is *outstanding* by what the engine's processes do not yet use on
    that GPU according to NVML; a fake inventory reports no processes, so there
    every booking counts in full.
    """
    views = {d.uuid: GpuView(d) for d in devices}
    for engine_id, _index, uuid, mib in bookings:
        view = views.get(uuid)
        if view is None:
            continue
        pids = engine_pids.get(engine_id, set())
        visible = sum(view.device.process_mib.get(pid, 0) for pid in pids)
        view.booked_mib += mib
        view.outstanding_mib += max(0, mib - visible)
    return list(views.values())


def describe(views: list[GpuView]) -> str:
    return ", ".join(f"GPU{v.device.index} {v.available_mib} MiB" for v in views) or "no GPUs"


def by_node(views: Iterable[GpuView]) -> dict[str | None, list[GpuView]]:
    """The views grouped by node (``None``: this machine), in the order the nodes first appear."""
    groups: dict[str | None, list[GpuView]] = {}
    for v in views:
        groups.setdefault(v.device.node, []).append(v)
    return groups


def node_name(node: str | None) -> str:
    return "this machine" if node is None else node


def describe_nodes(views: list[GpuView]) -> str:
    """``node n1: GPU0 1532 MiB, GPU1 ...; node n2: ...``: the free memory per node."""
    return "; ".join(f"node {node_name(n)}: {describe(group)}" for n, group in by_node(views).items()) or "no GPUs"


MIG_TP = ("tensor parallel across MIG devices is not possible: CUDA gives a process one MIG device "
          "only; use one MIG device (tensor_parallel_size 1) or whole GPUs")


def _pool(views: list[GpuView], count: int, gpu_ids: list[int] | None) -> list[GpuView]:
    """The GPUs an engine of ``count`` GPUs may use: those it names, and never MIG devices when
    it needs more than one."""
    pool = views if gpu_ids is None else [v for v in views if v.device.index in gpu_ids]
    return [v for v in pool if not v.device.mig] if count > 1 else pool


def _on_node(views: list[GpuView], node: str | None, gpu_ids: list[int] | None) -> list[GpuView]:
    """The views of the pinned ``node`` (all without a pin); :class:`BadRequest` for a node that has
    none of this server's GPUs, and for ``gpu_ids`` elsewhere or spanning nodes."""
    if gpu_ids is not None:
        nodes = {v.device.node for v in views if v.device.index in gpu_ids}
        if node is None and len(nodes) > 1:
            raise BadRequest(f"gpu_ids {gpu_ids} are on nodes {', '.join(sorted(map(node_name, nodes)))}: "
                             "an engine's GPUs are all on one node")
    if node is None:
        return views
    groups = by_node(views)
    if node not in groups:
        named = [n for n in groups if n is not None]
        there = f"node(s) {', '.join(named)}" if named else "this machine only (no named node)"
        raise BadRequest(f"unknown node {node!r}; this server's GPUs are on {there}")
    if gpu_ids is not None:
        off = [v.device.index for v in views if v.device.index in gpu_ids and v.device.node != node]
        if off:
            raise BadRequest(f"gpu_ids {off} are not on node {node!r}; its GPUs are "
                             f"{[v.device.index for v in groups[node]]}")
    return groups[node]


def choose_gpus(views: list[GpuView], need_mib: int, count: int, gpu_ids: list[int] | None = None,
                what: str = "the engine", node: str | None = None) -> list[GpuView]:
    """Pick ``count`` GPUs of one node with at least ``need_mib`` available each: on each node (the
    pinned one only) the tightest fitting ones, and of those the node whose choice leaves the least
    memory over (ties: the lowest indices).

    Raises :class:`NoRoom` with the numbers (needed, free per GPU, per node) when nothing fits.
    """
    if count < 1:
        raise BadRequest("tensor_parallel_size must be at least 1")
    if gpu_ids is not None:
        by_index = {v.device.index: v for v in views}
        unknown = [i for i in gpu_ids if i not in by_index]
        if unknown:
            raise BadRequest(f"unknown GPU id(s) {unknown}; this server may use "
                             f"{sorted(by_index) or 'no GPUs'}")
        if len(gpu_ids) != count:
            raise BadRequest(f"gpu_ids names {len(gpu_ids)} GPU(s) but tensor_parallel_size is {count}")
        if count > 1 and any(by_index[i].device.mig for i in gpu_ids):
            raise BadRequest(f"gpu_ids {gpu_ids} name MIG devices: {MIG_TP}")
    nodes = any(v.device.node is not None for v in views)
    views = _on_node(views, node, gpu_ids)
    candidates = _pool(views, count, gpu_ids)
    groups = by_node(candidates)
    if all(len(group) < count for group in groups.values()):
        if count > 1 and any(v.device.mig for v in views):
            raise BadRequest(f"{what} needs {count} GPUs but this server has {len(candidates)} whole "
                             f"GPU(s) besides its MIG devices; {MIG_TP}")
        if nodes:
            sizes = ", ".join(f"node {node_name(n)} {len(g)}" for n, g in by_node(views).items())
            raise NoRoom(f"{what} needs {count} GPU(s) of one node but no node has that many: {sizes}")
        raise NoRoom(f"{what} needs {count} GPU(s) but this server may use {len(views)}")
    best, best_key = None, None
    for group in groups.values():
        fitting = sorted((v for v in group if v.available_mib >= need_mib),
                         key=lambda v: (v.available_mib, v.device.index))
        if len(fitting) < count:
            continue
        pick = sorted(fitting[:count], key=lambda v: v.device.index)
        key = (sum(v.available_mib for v in pick), [v.device.index for v in pick])
        if best_key is None or key < best_key:
            best, best_key = pick, key
    if best is None:
        if nodes:
            raise NoRoom(f"no GPU has room for {what}: needs {need_mib} MiB on each of {count} GPU(s) "
                         f"of one node; free: {describe_nodes(candidates)}")
        raise NoRoom(f"no GPU has room for {what}: needs {need_mib} MiB on each of {count} "
                     f"GPU(s); free: {describe(candidates)}")
    return best


def best_available(views: list[GpuView], count: int, gpu_ids: list[int] | None = None,
                   node: str | None = None) -> int:
    """The most memory that ``count`` GPUs of one node can each offer (for shrinking ``max_model_len``)."""
    pool = _pool([v for v in views if node is None or v.device.node == node], count, gpu_ids)
    best = 0
    for group in by_node(pool).values():
        avail = sorted((v.available_mib for v in group), reverse=True)
        if len(avail) >= count:
            best = max(best, avail[count - 1])
    return best


def memory_utilization(need_mib: int, total_mib: int) -> float:
    """``--gpu-memory-utilization`` so vLLM takes about ``need_mib`` and its free-memory check passes."""
    return max(0.01, min(0.98, round(need_mib / total_mib, 4)))
