"""The stub engine as a stand-in CUDA engine, for ``python -m sage_nb.doctor --gpu --launch``.

With ``STUB_GPU_MEMORY=1`` the stub takes, before it listens, the GPU memory vLLM would take:
``--gpu-memory-utilization`` × the device's total (its CUDA context counted in, as vLLM counts it), on the
first device ``CUDA_VISIBLE_DEVICES`` gives it, and holds it until it exits. It uses torch when torch
with CUDA is importable, else the CUDA driver API (``libcuda.so.1``) through ctypes; when neither works
it exits with a line that says why, so the engine fails with that line.

``python -m vllm.entrypoints.openai.stub_gpu --mib N`` (stub folder on PYTHONPATH): a foreign process
that holds N MiB on its first visible device, prints ``holding N MiB`` and exits when its stdin closes.
"""

from __future__ import annotations

import argparse
import ctypes
import sys

MIB = 1024 * 1024
CONTEXT_MIB = 512  # a CUDA context, as sage_nb's sizing counts it (vLLM's budget includes it)


class NoCuda(RuntimeError):
    """Neither torch with CUDA nor the CUDA driver API can take memory here."""


class TorchMemory:
    def __init__(self) -> None:
        import torch

        if not torch.cuda.is_available():
            raise NoCuda(f"torch {torch.__version__} sees no CUDA device")
        self.torch, self.blocks = torch, []

    def total_mib(self) -> int:
        return self.torch.cuda.mem_get_info(0)[1] // MIB

    def take(self, mib: int) -> None:
        self.blocks.append(self.torch.empty(mib * MIB, dtype=self.torch.uint8, device="cuda:0"))


class DriverMemory:
    """cuInit, cuDeviceGet, cuCtxCreate, cuMemAlloc through ctypes (no torch needed)."""

    def __init__(self) -> None:
        try:
            self.cuda = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise NoCuda(f"no CUDA driver library (libcuda.so.1): {e}") from None
        self.device, self.context, self.blocks = ctypes.c_int(), ctypes.c_void_p(), []
        self._check("cuInit", 0)
        self._check("cuDeviceGet", ctypes.byref(self.device), 0)
        self._check("cuCtxCreate_v2", ctypes.byref(self.context), 0, self.device)

    def _check(self, name: str, *args) -> None:
        code = getattr(self.cuda, name)(*args)
        if code != 0:
            raise NoCuda(f"{name} failed with CUresult {code}")

    def total_mib(self) -> int:
        total = ctypes.c_size_t()
        self._check("cuDeviceTotalMem_v2", ctypes.byref(total), self.device)
        return total.value // MIB

    def take(self, mib: int) -> None:
        pointer = ctypes.c_uint64()
        self._check("cuMemAlloc_v2", ctypes.byref(pointer), ctypes.c_size_t(mib * MIB))
        self.blocks.append(pointer)


def device_memory():
    """torch's allocator when torch has CUDA here, else the driver API's; :class:`NoCuda` saying why not."""
    reasons = []
    for kind in (TorchMemory, DriverMemory):
        try:
            return kind()
        except ImportError as e:
            reasons.append(f"torch is not installed ({e})")
        except NoCuda as e:
            reasons.append(str(e))
        except Exception as e:  # a broken CUDA install: say it, try the next way
            reasons.append(f"{kind.__name__}: {type(e).__name__}: {e}")
    raise NoCuda("cannot take GPU memory: " + "; ".join(reasons))


def take(utilization: float | None):
    """Take ``utilization`` × the device's total, less the context (the stand-in engine's memory grab)."""
    if not utilization:
        sys.exit("stub engine: STUB_GPU_MEMORY needs --gpu-memory-utilization (sage_nb passes it on real GPUs)")
    try:
        memory = device_memory()
        total = memory.total_mib()
        mib = max(1, int(utilization * total) - CONTEXT_MIB)
        memory.take(mib)
    except (NoCuda, RuntimeError) as e:
        sys.exit(f"stub engine: {e}")
    print(f"stub engine: holding {mib} MiB of {total} MiB (gpu_memory_utilization {utilization})", flush=True)
    return memory


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Hold GPU memory until stdin closes.")
    parser.add_argument("--mib", type=int, required=True)
    mib = parser.parse_args(argv).mib
    try:
        memory = device_memory()
        memory.take(mib)
    except (NoCuda, RuntimeError) as e:
        sys.exit(f"holder: {e}")
    print(f"holding {mib} MiB", flush=True)
    sys.stdin.read()
    del memory


if __name__ == "__main__":
    main()
