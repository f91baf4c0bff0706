"""GPU inventory: live NVML readings, or a configured fake inventory.

No NVIDIA GPU is a normal case: every NVML error is caught and the inventory is
then empty (engines run on CPU), with the reason kept in :attr:`GpuInventory.error`.

The inventory lists *placement units*: each GPU, except that a GPU in MIG mode is replaced by its
MIG devices (each with its own memory and ``MIG-`` UUID). A whole GPU's index is its NVML index
(PCI bus order, as ``nvidia-smi`` shows it); MIG devices are numbered after the last GPU, in the
order of their GPU and their MIG index. Only the units this server may use are placed on (its own
``CUDA_VISIBLE_DEVICES`` and the ``gpus`` setting, see :mod:`.visible`); the indices stay those of
the whole machine, so every user of a box means the same device by the same number.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from . import visible

MIB = 1024 * 1024
log = logging.getLogger(__name__)


class PhysicalGpu(NamedTuple):
    """A GPU of the machine (in MIG mode or not): what ``CUDA_VISIBLE_DEVICES`` indices and
    ``GPU-`` UUIDs name."""

    index: int  # NVML's
    uuid: str
    name: str


@dataclass
class GpuDevice:
    """One placement unit (a GPU, or one MIG device of a GPU in MIG mode) as NVML or the fake
    inventory sees it now."""

    index: int
    uuid: str
    name: str
    total_mib: int
    used_mib: int
    utilization: int | None = None
    process_mib: dict[int, int] = field(default_factory=dict)  # pid -> MiB on this device
    gpu_index: int | None = None     # the NVML index of its GPU (a MIG device's parent's)
    parent_uuid: str | None = None   # MIG devices: their GPU's UUID
    node: str | None = None          # the node it is on (Ray node id); None: this machine

    def __post_init__(self) -> None:
        if self.gpu_index is None:
            self.gpu_index = self.index

    @property
    def free_mib(self) -> int:
        return max(0, self.total_mib - self.used_mib)

    @property
    def mig(self) -> bool:
        """A MIG device: one process may use one of them, never two (no tensor parallel)."""
        return self.parent_uuid is not None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GpuInventory:
    """Reads the GPUs: the fake inventory when one is configured, else NVML. :meth:`devices` are
    the units this server may use; :meth:`all_devices` every unit of the machine."""

    def __init__(self, fake: list[dict] | None = None, use_nvml: bool = True,
                 allowed: list[int | str] | None = None, environ: Mapping[str, str] | None = None) -> None:
        self.fake = fake
        self.use_nvml = use_nvml
        self.allowed = allowed  # the ``gpus`` setting: None, or indices and UUIDs
        self.environ = os.environ if environ is None else environ
        self.error: str | None = None
        self.warning: str | None = None  # what about the visible devices is doubtful or ignored
        self._logged: set[str] = set()
        self._nvml = None
        self._lock = threading.Lock()

    @property
    def source(self) -> str:
        """``"fake"``, ``"nvml"`` or ``"none"``."""
        if self.fake is not None:
            return "fake"
        return "nvml" if self._init_nvml() is not None else "none"

    def devices(self) -> list[GpuDevice]:
        """The units this server may use now; an empty list when there is none."""
        units, gpus = self.read()
        if not units and not gpus:
            return []
        view = visible.visible(units, gpus, self.environ.get("CUDA_VISIBLE_DEVICES"),
                               self.environ.get("CUDA_DEVICE_ORDER"), self.allowed)
        self.warning = "; ".join(view.warnings) or None
        for w in view.warnings:
            if w not in self._logged:
                self._logged.add(w)
                log.warning("sage_nb GPUs: %s", w)
        if not view.devices:
            self.error = view.why_none
        return view.devices

    def all_devices(self) -> list[GpuDevice]:
        """Every unit of the machine, those this server may not use too."""
        return self.read()[0]

    def hidden(self) -> bool:
        """Whether the machine has GPUs but this server may use none of them."""
        units, gpus = self.read()
        return bool(units or gpus) and not self.devices()

    def resolve(self, cuda_visible: str | None, order: str | None = None) -> list[GpuDevice]:
        """The units a process with that ``CUDA_VISIBLE_DEVICES`` (and ``CUDA_DEVICE_ORDER``) uses,
        in its order ([] when it is unset)."""
        units, gpus = self.read()
        return visible.named_by_cuda(cuda_visible, order, units, gpus)[0] if cuda_visible is not None else []

    def read(self) -> tuple[list[GpuDevice], list[PhysicalGpu]]:
        """Every placement unit and every GPU of the machine (a GPU in MIG mode too)."""
        if self.fake is not None:
            return self._read_fake()
        nvml = self._init_nvml()
        if nvml is None:
            return [], []
        try:
            return self._read_nvml(nvml)
        except Exception as e:  # any NVML failure means "no GPU we can use"
            self.error = f"NVML query failed: {e}"
            return [], []

    def _read_fake(self) -> tuple[list[GpuDevice], list[PhysicalGpu]]:
        def unit(index: int, d: dict, gpu_index: int, parent: str | None = None) -> GpuDevice:
            return GpuDevice(index=index, uuid=d["uuid"], name=d["name"], total_mib=d["total_mib"],
                             used_mib=d["used_mib"], gpu_index=gpu_index, parent_uuid=parent,
                             process_mib={p["pid"]: p["used_mib"] for p in d.get("processes") or []},
                             node=self.fake[gpu_index].get("node"))  # a MIG device: its GPU's node

        units = [unit(i, d, i) for i, d in enumerate(self.fake) if d.get("mig") is None]
        slices = [(i, d["uuid"], s) for i, d in enumerate(self.fake) for s in d.get("mig") or []]
        units += [unit(len(self.fake) + k, s, i, parent) for k, (i, parent, s) in enumerate(slices)]
        return units, [PhysicalGpu(i, d["uuid"], d["name"]) for i, d in enumerate(self.fake)]

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

    @classmethod
    def _read_nvml(cls, nvml) -> tuple[list[GpuDevice], list[PhysicalGpu]]:
        count = nvml.nvmlDeviceGetCount()
        units, gpus, slices = [], [], []
        for i in range(count):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            uuid = _text(nvml.nvmlDeviceGetUUID(handle))
            gpus.append(PhysicalGpu(i, uuid, _text(nvml.nvmlDeviceGetName(handle))))
            if cls._mig_enabled(nvml, handle):
                slices += [(i, uuid, h) for h in cls._mig_handles(nvml, handle)]
            else:
                units.append(cls._read(nvml, handle, i))
        units += [cls._read(nvml, h, count + k, i, parent) for k, (i, parent, h) in enumerate(slices)]
        return units, gpus

    @staticmethod
    def _mig_enabled(nvml, handle) -> bool:
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(handle)
        except Exception:  # NVML_ERROR_NOT_SUPPORTED: a GPU without MIG
            return False
        return current == getattr(nvml, "NVML_DEVICE_MIG_ENABLE", 1)

    @staticmethod
    def _mig_handles(nvml, handle) -> list:
        """The MIG devices that exist on a GPU in MIG mode (their indices may have gaps)."""
        handles = []
        for k in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
            try:
                handles.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, k))
            except Exception:  # NVML_ERROR_NOT_FOUND: no MIG device at that index
                continue
        return handles

    @staticmethod
    def _read(nvml, handle, index: int, gpu_index: int | None = None,
              parent_uuid: str | None = None) -> GpuDevice:
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            util = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:  # not supported on MIG devices
            util = None
        procs: dict[int, int] = {}
        try:
            for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                used = p.usedGpuMemory or 0
                procs[int(p.pid)] = procs.get(int(p.pid), 0) + int(used) // MIB
        except Exception:
            pass
        return GpuDevice(
            index=index, uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
            name=_text(nvml.nvmlDeviceGetName(handle)), total_mib=int(mem.total) // MIB,
            used_mib=int(mem.used) // MIB, utilization=util, process_mib=procs,
            gpu_index=gpu_index, parent_uuid=parent_uuid)
