"""Engine processes: launch in their own process group, identify, read back, kill the whole tree.

One vLLM engine is several processes in one process group (api_server, a
resource tracker, ``VLLM::EngineCore``, ``VLLM::Worker``); killing the
api_server alone leaves the others as orphans that keep GPU memory, so every
kill here is by process group and verified.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path

import psutil

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
VLLM_TITLE_PREFIX = "VLLM::"


def engine_command(python: str, model: str, port: int, served_model_name: str, *,
                   kind: str, host: str = "127.0.0.1", tensor_parallel_size: int = 1,
                   max_model_len: int | None = None, dtype: str | None = None,
                   gpu_memory_utilization: float | None = None,
                   extra_args: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The argv of a vLLM OpenAI-compatible server. The API key travels in the
    environment (``VLLM_API_KEY``), not in argv, which every local user can read."""
    cmd = [python, "-m", API_SERVER_MODULE, "--model", model, "--host", host,
           "--port", str(port), "--served-model-name", served_model_name]
    if kind == "embedding" and not _has_flag(extra_args, "--runner", "--convert", "--task"):
        cmd += ["--runner", "pooling"]
    if tensor_parallel_size != 1:
        cmd += ["--tensor-parallel-size", str(tensor_parallel_size)]
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if dtype:
        cmd += ["--dtype", dtype]
    if gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", f"{gpu_memory_utilization:.4f}"]
    return cmd + list(extra_args)


def _has_flag(args, *flags: str) -> bool:
    return any(a == f or a.startswith(f + "=") for a in args for f in flags)


def launch(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start ``cmd`` (never through a shell) in a new session, output to its own log file."""
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, close_fds=True)
    finally:
        os.close(fd)


def start_time(pid: int | None) -> float | None:
    """The process's start time (to tell it from a later process with a reused pid)."""
    if not pid:
        return None
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, ValueError):
        return None


def is_alive(pid: int | None, create_time: float | None) -> bool:
    """True if ``pid`` runs, is not a zombie and, when given, started at ``create_time``."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 0.5:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def group_members(pgid: int, not_before: float | None = None) -> list[psutil.Process]:
    """Live (non-zombie) processes of process group ``pgid`` started at or after ``not_before``.

    With ``not_before`` (the leader's start time), a live leader that started at
    another time means the pid was reused: that group is not the engine's.
    """
    if not_before is not None:
        leader_start = start_time(pgid)
        if leader_start is not None and abs(leader_start - not_before) > 0.5:
            return []
    members = []
    for proc in psutil.process_iter(["status", "create_time"]):
        try:
            if os.getpgid(proc.pid) != pgid or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
        except (ProcessLookupError, PermissionError, OSError):
            continue
        if not_before is not None and (proc.info["create_time"] or 0) < not_before - 1.0:
            continue
        members.append(proc)
    return members


def tree_pids(pid: int | None, create_time: float | None) -> set[int]:
    """Pids of an engine: its process group (orphans included) and any descendants."""
    if not pid:
        return set()
    pids = {p.pid for p in group_members(pid, create_time)}
    if is_alive(pid, create_time):
        pids.add(pid)
        try:
            pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass
    return pids


def trees_pids(engines: Mapping[str, tuple[int | None, float | None]]) -> dict[str, set[int]]:
    """:func:`tree_pids` of many engines (id -> (pid, start time)) from one scan of the process table:
    GPU attribution asks for every engine's processes on each reading, and one scan per engine made
    that cost grow with the engines (the metrics collector reads the GPUs every few seconds)."""
    wanted = {eid: (pid, start) for eid, (pid, start) in engines.items() if pid}
    if not wanted:
        return {}
    starts: dict[int, float] = {}
    zombies: set[int] = set()
    groups: dict[int, set[int]] = {}
    children: dict[int, list[int]] = {}
    for proc in psutil.process_iter(["ppid", "status", "create_time"]):
        info = proc.info
        starts[proc.pid] = info["create_time"] or 0.0
        if info["status"] == psutil.STATUS_ZOMBIE:
            zombies.add(proc.pid)
            continue
        children.setdefault(info["ppid"], []).append(proc.pid)
        try:
            groups.setdefault(os.getpgid(proc.pid), set()).add(proc.pid)
        except OSError:  # gone since the scan listed it
            continue
    out: dict[str, set[int]] = {}
    for eid, (pid, start) in wanted.items():
        leader = starts.get(pid)
        if start is not None and leader is not None and abs(leader - start) > 0.5:
            out[eid] = set()  # the pid was reused: neither its group nor its children are the engine's
            continue
        pids = {p for p in groups.get(pid, ()) if start is None or starts[p] >= start - 1.0}
        if leader is not None and pid not in zombies:
            stack = [pid]
            while stack:
                kids = children.get(stack.pop(), [])
                pids.update(kids)
                stack.extend(kids)
            pids.add(pid)
        out[eid] = pids
    return out


def kill_tree(pid: int | None, create_time: float | None, grace: float = 15.0,
              popen: subprocess.Popen | None = None) -> list[int]:
    """TERM the engine's process group and descendants, KILL what is left after ``grace``.

    Returns the pids still alive afterwards (empty when the tree is verified gone).
    """
    if not pid:
        return []

    def remaining() -> list[psutil.Process]:
        if popen is not None:
            popen.poll()  # reap our own child so it does not linger as a zombie
        procs = {p.pid: p for p in group_members(pid, create_time)}
        if is_alive(pid, create_time):
            try:
                root = psutil.Process(pid)
                procs[pid] = root
                procs.update({c.pid: c for c in root.children(recursive=True)})
            except psutil.Error:
                pass
        return [p for p in procs.values() if _running(p)]

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        procs = remaining()
        if not procs:
            return []
        _signal_group(pid, sig)
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and remaining():
            time.sleep(0.1)
    return [p.pid for p in remaining()]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def log_tail(path: str | os.PathLike | None, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ('' if it cannot be read)."""
    if not path:
        return ""
    try:
        with open(path, errors="replace") as f:
            return "".join(deque(f, maxlen=max(1, lines)))
    except OSError:
        return ""
