"""NVML as the doctor asks it: whether it loads, the driver's versions, a GPU's whole memory (a GPU in MIG
mode too, which the inventory replaces by its MIG devices). Every NVML error is caught and said."""

from __future__ import annotations

from ..gpus.inventory import MIB


def _nvml():
    """``(pynvml, None)`` once NVML is initialised, else ``(None, why)``."""
    try:
        import pynvml
    except ImportError as e:
        return None, f"the NVML Python package (nvidia-ml-py) is not installed: {e}"
    try:
        pynvml.nvmlInit()
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    return pynvml, None


def no_library(error: str | None) -> bool:
    """Whether an NVML error means there is no NVIDIA driver at all (the machine has no NVIDIA GPU)."""
    return bool(error) and ("LibraryNotFound" in error or "Shared Library Not Found" in error)


def cuda_version(value: int | None) -> str | None:
    """NVML's CUDA version number as text: 12040 → ``"12.4"``."""
    return None if not value else f"{value // 1000}.{value % 1000 // 10}"


def driver() -> dict:
    """``{"found", "error", "no_driver", "driver_version", "cuda_driver_version", "gpu_count"}``."""
    nvml, error = _nvml()
    out = {"found": nvml is not None, "error": error, "no_driver": no_library(error), "driver_version": None,
           "cuda_driver_version": None, "gpu_count": 0}
    if nvml is None:
        return out
    try:
        version = nvml.nvmlSystemGetDriverVersion()
        out["driver_version"] = version.decode() if isinstance(version, bytes) else str(version)
    except Exception as e:
        out["error"] = f"nvmlSystemGetDriverVersion: {e}"
    for name in ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"):
        try:
            out["cuda_driver_version"] = cuda_version(int(getattr(nvml, name)()))
            break
        except Exception:  # an older driver or nvidia-ml-py without _v2: the other one
            continue
    try:
        out["gpu_count"] = int(nvml.nvmlDeviceGetCount())
    except Exception as e:
        out["error"] = f"nvmlDeviceGetCount: {e}"
    return out


def gpu_memory(index: int) -> tuple[int, int] | None:
    """(total, used) MiB of GPU ``index`` (NVML's order) as NVML reports the whole GPU, or ``None``."""
    nvml, _error = _nvml()
    if nvml is None:
        return None
    try:
        mem = nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index))
        return int(mem.total) // MIB, int(mem.used) // MIB
    except Exception:
        return None
