"""``%llm doctor``: check the setup from this kernel and say how to fix each problem; ``%llm doctor --gpu``:
the GPU doctor's report (``python -m sage_nb.doctor --gpu``) as the server sees its GPUs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from sage_nb.controlplane.doctor import render
from sage_nb.controlplane.state import EngineState, is_routable

from .client import Client
from .views import Table

FIND_VLLM = "import importlib.util as u; s = u.find_spec('vllm'); print(s.origin if s else '')"


def checks(client: Client) -> list[list[str]]:
    """Rows of ``[check, status, detail, fix]``; status is OK, WARN or FAIL."""
    rows = []
    if client.mode == "server":
        rows.append(["server extension", "OK", f"reachable at {client.server.url} (from {client.server.source})", ""])
        rows.append(["token", "OK", "accepted by the server", ""])
    else:
        token_problem = "token" in client.why_embedded or "403" in client.why_embedded
        rows.append(["server extension", "WARN", f"embedded mode: {client.why_embedded}",
                     "start JupyterLab from the environment where sage_nb is installed; "
                     "`jupyter server extension list` must show sage_nb OK"])
        rows.append(["token", "FAIL" if token_problem else "OK",
                     client.why_embedded if token_problem else "no server to ask",
                     "set SAGE_NB_TOKEN to the server's token" if token_problem else ""])
    try:
        settings = client.settings()  # the server's own in server mode, not this kernel's defaults
    except Exception as e:
        settings = None
        rows.append(["settings", "FAIL", f"cannot read the control plane's settings: {e}",
                     "upgrade sage_nb in the server's environment and restart it"])
    if settings is not None:
        rows.append(registry_check(settings["db_path"]))
        rows.append(vllm_check(settings["engine_python"]))
    try:
        gpus = client.gpus()
    except Exception as e:  # report, don't crash the doctor
        gpus = {"source": "none", "error": str(e), "devices": []}
    rows.append(gpu_check(gpus))
    try:
        engines = client.engines()
    except Exception as e:
        engines = []
        rows.append(["engines", "FAIL", f"cannot list engines: {e}", "see the server log"])
    for e in engines:
        name = f"engine {e['name']}"
        if e["state"] == EngineState.FAILED:
            first = (e.get("error") or "").splitlines()[0] if e.get("error") else "failed"
            rows.append([name, "FAIL", first, f"%llm logs {e['name']}; then %llm prune"])
        elif e["state"] == EngineState.STARTING:
            rows.append([name, "WARN", "still starting", f"%llm logs {e['name']}"])
        elif is_routable(e):
            rows.append([name, "OK", f"ready on port {e['port']}", ""])
        elif e["state"] == EngineState.READY:
            rows.append([name, "WARN", f"ready but not routed to: {e.get('health_failures')} failed "
                                       "probe(s) in a row", f"%llm logs {e['name']}"])
    return rows


def gpu_check(gpus: dict) -> list[str]:
    """OK with GPUs, and on a machine without any (engines run on CPU: nothing to fix); WARN where the
    machine has GPUs that this server may not use or cannot read."""
    if gpus["devices"]:
        return ["GPUs", "OK", f"{len(gpus['devices'])} GPU(s) via {gpus['source']}", ""]
    if gpus["source"] != "none" and gpus.get("error"):
        return ["GPUs", "WARN", f"no GPU this server may use: {gpus['error']}",
                "check the server's CUDA_VISIBLE_DEVICES and its gpus setting (%llm gpus), and nvidia-smi"]
    return ["GPUs", "OK", f"no NVIDIA GPU ({gpus.get('error') or 'none found'}): engines run on CPU; "
            "nothing to fix", ""]


def registry_check(db_path: str) -> list[str]:
    db = Path(db_path)
    writable = os.access(db.parent if db.parent.exists() else db.parent.parent, os.W_OK)
    return ["registry", "OK" if writable else "FAIL", str(db),
            "" if writable else f"make {db.parent} writable or set SAGE_NB_STATE_DIR"]


def vllm_check(python: str) -> list[str]:
    try:
        out = subprocess.run([python, "-c", FIND_VLLM], capture_output=True, text=True, timeout=60)
        origin = out.stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return ["vLLM", "FAIL", f"engine interpreter {python} does not run: {e}", "set SAGE_NB_ENGINE_PYTHON"]
    if not origin:
        return ["vLLM", "FAIL", f"vllm is not importable by {python}",
                "pip install 'sage_nb[cpu]' (no GPU) or 'sage_nb[gpu]' in that environment"]
    return ["vLLM", "OK", f"importable by {python}", ""]


def report(client: Client) -> Table:
    rows = checks(client)
    bad = sum(r[1] == "FAIL" for r in rows)
    footer = "all good" if not bad else f"{bad} problem(s): see the fix column"
    return Table("sage_nb doctor", ["check", "status", "detail", "fix"], rows, footer=footer)


class Tables:
    """Several tables shown as one output (HTML in a notebook, aligned text in a terminal)."""

    def __init__(self, tables: list[Table]) -> None:
        self.tables = tables

    def __repr__(self) -> str:
        return "\n\n".join(repr(t) for t in self.tables)

    def _repr_html_(self) -> str:
        return "".join(t._repr_html_() for t in self.tables)


def gpu_report(client: Client) -> Tables:
    """The GPU report of the control plane this kernel talks to: the server's (its ``CUDA_VISIBLE_DEVICES``
    and ``gpus`` setting) in server mode, this kernel's embedded one otherwise."""
    model = client.gpu_doctor()
    where = f"the server at {client.server.url}" if client.mode == "server" else "this kernel (embedded mode)"
    tables = [Table(title, columns or ["device"], rows, empty="none", footer=footer)
              for title, columns, rows, footer in render.sections(model)]
    tables[0].title += f", as {where} sees it"
    return Tables(tables)
