"""What ``bench_idle`` needs around its measurements: synchronous HTTP (a streamed chat timed to its
first token), the server's REST API, waiting for a quiet machine, engine command lines, the stub model
and a stub of the server's kind started on its own to time its wake."""

from __future__ import annotations

import http.client
import json
import os
import sys
import time
from pathlib import Path

from .common import API_SERVER, REGISTRY_ENV, STUB_ENGINE, spawn, wait_until
from .jserver import BASE, TOKEN, JServer

WAKE_MS = 200  # the stub's /wake_up takes this long (STUB_WAKE_MS)


def stop_leftovers(state_dir: Path) -> None:
    """Stop whatever engines a run left in ``state_dir``'s registry."""
    from sage_nb.controlplane import ControlPlane

    leftover = ControlPlane(state_dir=state_dir, monitor=False, adopt_unrecorded=False)
    leftover.stop_all()
    leftover.close()


# --------------------------------------------------------------------------- HTTP, synchronous
def request(port: int, method: str, path: str, headers: dict, body: dict | None = None,
            timeout: float = 60.0, conn: http.client.HTTPConnection | None = None) -> tuple[int, bytes]:
    """One request (on ``conn`` when given: keep-alive); ``(status, body)``."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    data = json.dumps(body).encode() if body is not None else None
    hdrs = {**headers, "Content-Type": "application/json"} if data is not None else dict(headers)
    try:
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        if own:
            conn.close()


def first_token(port: int, path: str, headers: dict, model: str, timeout: float = 300.0) -> dict:
    """Send a streamed chat on a fresh connection; ``perf_counter()`` when the first chunk with text
    came (``token``) and when the first SSE chunk of any kind came (``chunk``)."""
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 8,
            "stream": True, "temperature": 0, "ignore_eos": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    out: dict = {"sent": time.perf_counter(), "chunk": None, "token": None, "status": None}
    try:
        conn.request("POST", path, body=json.dumps(body).encode(),
                     headers={**headers, "Content-Type": "application/json"})
        resp = conn.getresponse()
        out["status"] = resp.status
        if resp.status != 200:
            raise RuntimeError(f"chat to port {port} answered {resp.status}: {resp.read()[:300]!r}")
        while True:
            line = resp.readline()
            if not line:
                break
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            now = time.perf_counter()
            out["chunk"] = out["chunk"] or now
            choices = json.loads(data).get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                out["token"] = now
                break
        resp.close()
    finally:
        conn.close()
    out["token"] = out["token"] or out["chunk"]  # every token decoded to "" (never seen): the first chunk
    if out["token"] is None:
        raise RuntimeError(f"chat to port {port} streamed no chunk")
    return out


class Rest:
    """The server's REST API with the Jupyter token."""

    def __init__(self, server: JServer) -> None:
        self.server = server
        self.headers = {"Authorization": f"token {TOKEN}"}

    def call(self, method: str, path: str, body: dict | None = None, expect=(200, 202)) -> dict:
        status, data = request(self.server.port, method, f"{BASE}sage_nb/api/{path}", self.headers, body, 120)
        if status not in expect:
            raise RuntimeError(f"{method} {path}: {status} {data[:500]!r}")
        return json.loads(data or b"null")

    def engine(self, engine_id: str) -> dict:
        return self.call("GET", f"engines/{engine_id}")

    def wait_state(self, engine_id: str, states: set[str], timeout: float, interval: float = 0.05) -> dict:
        box: dict = {}

        def there() -> bool:
            box["e"] = self.engine(engine_id)
            if box["e"]["state"] == "failed":
                raise RuntimeError(f"engine failed: {box['e'].get('error')}")
            return box["e"]["state"] in states
        wait_until(there, timeout, interval, f"engine {engine_id} {states}")
        return box["e"]


QUIET_CPU, QUIET_WAIT_S = 25.0, 60.0  # % of the whole machine; seconds


def quiet() -> dict:
    """Wait (at most ``QUIET_WAIT_S``) until the machine's CPU use over 1 s is under ``QUIET_CPU`` %;
    called when no process of this run is busy, so what it sees is other users' work."""
    import psutil

    t0 = time.perf_counter()
    while True:
        busy = psutil.cpu_percent(interval=1.0)
        if busy < QUIET_CPU or time.perf_counter() - t0 > QUIET_WAIT_S:
            return {"quiet_wait_s": time.perf_counter() - t0, "others_cpu": busy, "load_before": os.getloadavg()[0]}


def cmdline(pid: int | None, port: int | None) -> list[str]:
    """The engine's command line with its port (the one thing that may differ) blanked."""
    import psutil

    try:
        args = psutil.Process(pid).cmdline()
    except (psutil.Error, TypeError):
        return []
    return ["<port>" if a == str(port) else a for a in args[1:]]


# --------------------------------------------------------------------------- (b) sleeping
def stub_model_dir(root: Path) -> str:
    """A sized model directory (config.json and a sparse 1 GiB weight file) for placement on the fake GPU."""
    path = root / "stub-model"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 16, "num_attention_heads": 16,
        "num_key_value_heads": 8, "hidden_size": 2048, "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}))
    with open(path / "model.safetensors", "wb") as f:
        f.truncate(2**30)
    return str(path)


def start_sleepy_stub(port: int, key: str, log: Path) -> object:
    """A stub like the server's (sleep mode on, the same wake delay), started here to time its wake."""
    cmd = [sys.executable, "-m", API_SERVER, "--model", "/models/sleepy-direct", "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", "sleepy-direct", "--enable-sleep-mode"]
    env = {**os.environ, "PYTHONPATH": STUB_ENGINE, "VLLM_API_KEY": key, "VLLM_SERVER_DEV_MODE": "1",
           "STUB_WAKE_MS": str(WAKE_MS), REGISTRY_ENV: str(log.parent / "no-registry")}
    return spawn(cmd, env, log)
