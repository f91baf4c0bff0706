"""GPU inventory: live NVML readings, or a configured fake inventory.

No NVIDIA GPU is a normal case: every NVML error is caught and the inventory is
then empty (engines run on CPU), with the reason kept in :attr:`GpuInventory.error`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

MIB = 1024 * 1024


@dataclass
class GpuDevice:
    """One GPU as NVML (or the fake inventory) sees it now."""

    index: int
    uuid: str
    name: str
    total_mib: int
    used_mib: int
    utilization: int | None = None
    process_mib: dict[int, int] = field(default_factory=dict)  # pid -> MiB on this GPU

    @property
    def free_mib(self) -> int:
        return max(0, self.total_mib - self.used_mib)


class GpuInventory:
    """Reads the GPUs: the fake inventory when one is configured, else NVML."""

    def __init__(self, fake: list[dict] | None = None, use_nvml: bool = True) -> None:
        self.fake = fake
        self.use_nvml = use_nvml
        self.error: str | None = None
        self._nvml = None
        self._lock = threading.Lock()

    @property
    def source(self) -> str:
        """``"fake"``, ``"nvml"`` or ``"none"``."""
        if self.fake is not None:
            return "fake"
        return "nvml" if self._init_nvml() is not None else "none"

    def devices(self) -> list[GpuDevice]:
        """The devices now; an empty list when there is no usable NVIDIA GPU."""
        if self.fake is not None:
            return [GpuDevice(index=i, uuid=d["uuid"], name=d["name"], total_mib=d["total_mib"],
                              used_mib=d["used_mib"],
                              process_mib={p["pid"]: p["used_mib"] for p in d.get("processes") or []})
                    for i, d in enumerate(self.fake)]
        nvml = self._init_nvml()
        if nvml is None:
            return []
        try:
            return [self._read(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]
        except Exception as e:  # any NVML failure means "no GPU we can use"
            self.error = f"NVML query failed: {e}"
            return []

    def _init_nvml(self):
        if not self.use_nvml:
            self.error = "NVML disabled by configuration"
            return None
        with self._lock:
            if self._nvml is None and self.error is None:
                try:
                    import pynvml

                    pynvml.nvmlInit()
                    self._nvml = pynvml
                except Exception as e:  # ImportError, NVMLError_LibraryNotFound, driver errors
                    self.error = f"NVML unavailable: {e}"
            return self._nvml

    @staticmethod
    def _read(nvml, index: int) -> GpuDevice:
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = nvml.nvmlDeviceGetName(handle)
        uuid = nvml.nvmlDeviceGetUUID(handle)
        try:
            util = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            util = None
        procs: dict[int, int] = {}
        try:
            for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                used = p.usedGpuMemory or 0
                procs[int(p.pid)] = procs.get(int(p.pid), 0) + int(used) // MIB
        except Exception:
            pass
        return GpuDevice(
            index=index,
            uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
            name=name.decode() if isinstance(name, bytes) else str(name),
            total_mib=int(mem.total) // MIB,
            used_mib=int(mem.used) // MIB,
            utilization=util,
            process_mib=procs,
        )
