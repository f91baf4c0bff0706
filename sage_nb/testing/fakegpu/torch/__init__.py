"""A fake ``torch`` with CUDA over the fake NVML's state file (``../pynvml.py``): enough of torch for
sage_nb's GPU doctor (``torch.cuda.mem_get_info``, device properties) and for the stand-in engine's
memory grab (``torch.empty(n, dtype=torch.uint8, device="cuda")``), which is written into the state file
under this process's pid."""

from __future__ import annotations

from types import SimpleNamespace

from . import cuda

__version__ = "2.99.0+fake"
uint8 = "uint8"
version = SimpleNamespace(cuda="12.4")


class Tensor:
    """A block of device memory (never freed before the process ends, which is all the stand-in needs)."""

    def __init__(self, nbytes: int, device: str) -> None:
        self.nbytes, self.device = nbytes, device


def empty(size: int, dtype=None, device=None) -> Tensor:
    """``size`` bytes (``uint8``) on a CUDA device: recorded in the fake NVML's state."""
    where = str(device or "cpu")
    if where.startswith("cuda"):
        cuda.allocate(cuda.index_of(where), int(size) // cuda.MIB)
    return Tensor(int(size), where)
