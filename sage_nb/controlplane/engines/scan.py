"""Scanning processes for vLLM servers and orphans of this user, from their command lines and
environment (never by scanning ports)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import psutil

from .process import API_SERVER_MODULE, VLLM_TITLE_PREFIX

ENGINE_ID_ENV = "SAGE_NB_ENGINE_ID"
REGISTRY_ENV = "SAGE_NB_REGISTRY"  # which registry launched an engine: others leave it alone
EMBEDDING_TASKS = {"embed", "embedding", "pooling", "score", "classify", "reward"}


@dataclass
class FoundServer:
    """A running vLLM OpenAI server as read from its process."""

    pid: int
    create_time: float
    model: str
    port: int
    host: str
    served_model_name: str
    kind: str
    api_key: str = ""
    gpu_ids: list[int] = field(default_factory=list)  # the inventory's, from cuda_visible (adoption)
    cuda_visible: str | None = None   # its CUDA_VISIBLE_DEVICES: indices, GPU- or MIG- UUIDs
    cuda_order: str | None = None     # its CUDA_DEVICE_ORDER (how CUDA read indices there)
    engine_id: str | None = None      # set when sage_nb launched it
    registry: str | None = None       # the registry of the sage_nb that launched it
    tensor_parallel_size: int = 1
    max_model_len: int | None = None


def _flags(args: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Split argv into ``{flag: values}`` and positionals (``--a=b``, ``--a b c`` forms)."""
    flags: dict[str, list[str]] = {}
    positionals: list[str] = []
    current: str | None = None
    for arg in args:
        if arg.startswith("-") and len(arg) > 1 and not _is_number(arg):
            key, eq, value = arg.partition("=")
            flags.setdefault(key, [])
            current = None if eq else key
            if eq:
                flags[key].append(value)
        elif current is not None:
            flags[current].append(arg)
        else:
            positionals.append(arg)
    return flags, positionals


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def parse_cmdline(cmdline: list[str]) -> dict | None:
    """Read a vLLM server's settings from its argv, or ``None`` if it is not one.

    Knows ``python -m vllm.entrypoints.openai.api_server ...`` and ``vllm serve MODEL ...``.
    """
    rest: list[str] | None = None
    for i, arg in enumerate(cmdline):
        if arg == "-m" and i + 1 < len(cmdline) and cmdline[i + 1] == API_SERVER_MODULE:
            rest = cmdline[i + 2:]
            break
        if os.path.basename(arg) == "vllm" and i + 1 < len(cmdline) and cmdline[i + 1] == "serve":
            rest = cmdline[i + 2:]
            break
    if rest is None:
        return None
    flags, positionals = _flags(rest)

    def first(*names: str, default=None):
        for n in names:
            values = flags.get(n)
            if values:
                return values[0]
        return default

    model = first("--model", default=positionals[0] if positionals else None)
    if model is None:
        model = "facebook/opt-125m"  # vLLM's own default
    runner, convert, task = first("--runner"), first("--convert"), first("--task")
    embedding = runner == "pooling" or convert in EMBEDDING_TASKS or task in EMBEDDING_TASKS
    try:
        port = int(first("--port", default=8000))
        tp = int(first("--tensor-parallel-size", "-tp", default=1))
        mml = first("--max-model-len")
        max_model_len = int(mml) if mml else None
    except ValueError:
        return None
    return {"model": model, "port": port, "host": first("--host", default="0.0.0.0"),
            "served_model_name": first("--served-model-name", default=model),
            "kind": "embedding" if embedding else "llm", "api_key": first("--api-key", default=""),
            "tensor_parallel_size": tp, "max_model_len": max_model_len}


def find_servers() -> list[FoundServer]:
    """Every vLLM OpenAI server process of the current user."""
    me = os.getuid()
    found = []
    for proc in psutil.process_iter(["pid", "uids", "cmdline", "create_time"]):
        info = proc.info
        try:
            if not info["uids"] or info["uids"].real != me or not info["cmdline"]:
                continue
            parsed = parse_cmdline(info["cmdline"])
            if parsed is None or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
        except psutil.Error:
            continue
        host = parsed.pop("host")
        found.append(FoundServer(
            pid=proc.pid, create_time=info["create_time"],
            host="127.0.0.1" if host in ("0.0.0.0", "", "::", "localhost") else host,
            cuda_visible=env.get("CUDA_VISIBLE_DEVICES"), cuda_order=env.get("CUDA_DEVICE_ORDER"),
            engine_id=env.get(ENGINE_ID_ENV), registry=env.get(REGISTRY_ENV),
            **{**parsed, "api_key": parsed["api_key"] or env.get("VLLM_API_KEY", "")}))
    return found


def find_orphans(known_groups: set[int]) -> list[dict]:
    """``VLLM::`` processes of this user whose group belongs to no live engine (they hold GPU memory)."""
    me = os.getuid()
    orphans = []
    for proc in psutil.process_iter(["pid", "ppid", "uids", "cmdline", "name"]):
        info = proc.info
        try:
            title = (info["cmdline"] or [info["name"] or ""])[0]
            if not info["uids"] or info["uids"].real != me or not title.startswith(VLLM_TITLE_PREFIX):
                continue
            pgid = os.getpgid(proc.pid)
        except (psutil.Error, OSError):
            continue
        if pgid in known_groups:
            continue
        leader_alive = psutil.pid_exists(pgid) and pgid != proc.pid
        if not leader_alive or info["ppid"] == 1:
            orphans.append({"pid": proc.pid, "pgid": pgid, "title": title})
    return orphans
