"""Probes of an engine over HTTP (stdlib only): readiness (``/health`` and ``/v1/models``), its
kind (``/openapi.json``), and work probes.

vLLM's ``/health`` is served by the API process and only reports an EngineCore that has
*errored*; a core that hangs (deadlock, stopped process, stuck device) still looks healthy.
So every ``work_probe_interval`` seconds each ready engine gets one tiny real request (a
1-token completion, or one embedding) with ``work_probe_timeout``. A probe that times out
counts as a failed health probe — unless the engine's own counters (``/metrics``) moved
meanwhile: then it is busy, not hung. Work probes run on their own daemon threads, so a hung
engine never slows the health pass that watches the others.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Reply:
    status: int           # 0 when the engine could not be reached
    body: bytes = b""
    error: str | None = None
    timed_out: bool = False  # status 0 because no answer came within the timeout

    def json(self):
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError):
            return None


def call(host: str, port: int, method: str, path: str, api_key: str | None = None,
         timeout: float = 2.0, body: dict | None = None) -> Reply:
    """One request (``body`` sent as JSON); never raises for network errors (they give ``status == 0``)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
        resp = conn.getresponse()
        return Reply(resp.status, resp.read())
    except (OSError, http.client.HTTPException) as e:
        return Reply(0, error=f"{type(e).__name__}: {e}", timed_out=isinstance(e, TimeoutError))
    finally:
        conn.close()


def get(host: str, port: int, path: str, api_key: str | None = None,
        timeout: float = 2.0) -> Reply:
    """One GET; never raises for network errors (they give ``status == 0``)."""
    return call(host, port, "GET", path, api_key, timeout)


def healthy(host: str, port: int, timeout: float = 2.0) -> bool:
    """``/health`` answers 200 (it needs no key)."""
    return get(host, port, "/health", timeout=timeout).status == 200


def served_models(host: str, port: int, api_key: str | None, timeout: float = 2.0) -> list[str]:
    """The ids listed by ``/v1/models`` ([] if it does not answer)."""
    data = get(host, port, "/v1/models", api_key, timeout).json()
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        return []
    return [str(m.get("id")) for m in data["data"] if isinstance(m, dict)]


def ready(host: str, port: int, served_name: str, api_key: str | None,
          timeout: float = 2.0) -> bool:
    """Ready means ``/health`` 200 and the served name listed in ``/v1/models``."""
    return healthy(host, port, timeout) and served_name in served_models(host, port, api_key, timeout)


def kind_from_openapi(host: str, port: int, timeout: float = 5.0) -> str | None:
    """``"llm"`` or ``"embedding"`` from the engine's route table, without any inference."""
    spec = get(host, port, "/openapi.json", timeout=timeout).json()
    if not isinstance(spec, dict) or not isinstance(spec.get("paths"), dict):
        return None
    paths = spec["paths"]
    if "/v1/chat/completions" in paths or "/v1/completions" in paths:
        return "llm"
    if "/v1/embeddings" in paths:
        return "embedding"
    return None

# vLLM's Prometheus counters that move whenever the engine makes progress on any request
PROGRESS_COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                     "vllm:request_success_total")

OK, STUCK = "ok", "stuck"  # verdicts; None when the probe proved nothing (engine unreachable)


def progress(host: str, port: int, api_key: str | None, timeout: float) -> float | None:
    """The sum of the engine's progress counters, or None when ``/metrics`` gives none."""
    reply = get(host, port, "/metrics", api_key, timeout)
    if reply.status != 200:
        return None
    total, seen = 0.0, False
    for line in reply.body.decode(errors="replace").splitlines():
        if line.startswith(PROGRESS_COUNTERS):
            try:
                total += float(line.rsplit(None, 1)[-1])
                seen = True
            except ValueError:
                continue
    return total if seen else None


def run_probe(host: str, port: int, kind: str, served_name: str, api_key: str | None,
              timeout: float) -> str | None:
    """Send one tiny request; ``OK`` if the engine answered at all, ``STUCK`` if it neither
    answered within ``timeout`` nor made progress on anything else meanwhile."""
    before = progress(host, port, api_key, 5.0)
    if kind == "embedding":
        path, body = "/v1/embeddings", {"model": served_name, "input": "ping"}
    else:
        path, body = "/v1/completions", {"model": served_name, "prompt": "ping", "max_tokens": 1}
    reply = call(host, port, "POST", path, api_key, timeout, body)
    if reply.status:
        return OK  # any answer, even an error status, means the engine is not hung
    if not reply.timed_out:
        return None  # unreachable or cut off: /health and the process check judge that
    after = progress(host, port, api_key, 5.0)
    if before is not None and after is not None and after > before:
        return OK  # slow because busy: it is working through other requests
    return STUCK


@dataclass
class _Slot:
    finished: float = 0.0
    thread: threading.Thread | None = None
    verdict: str | None = None
    stuck: bool = False  # the last verdict was STUCK and no probe has answered since


@dataclass
class WorkProbes:
    """Work probes of the engines one health monitor watches (by engine id)."""

    interval: float
    timeout: float
    slots: dict[str, _Slot] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, engine) -> tuple[bool, bool]:
        """``(failed_now, stuck)``: whether a probe of ``engine`` has just been found stuck, and
        whether it is still taken for stuck. Starts the next probe when one is due."""
        if self.interval <= 0:
            return False, False
        now = time.monotonic()
        with self.lock:
            slot = self.slots.get(engine.id)
            if slot is None:  # first seen ready: its first probe comes one interval later
                slot = self.slots[engine.id] = _Slot(finished=now)
            failed_now = False
            if slot.thread is not None and not slot.thread.is_alive():
                slot.thread = None
                if slot.verdict == STUCK:
                    failed_now = slot.stuck = True
                elif slot.verdict == OK:
                    slot.stuck = False
            due = slot.stuck or now - slot.finished >= self.interval
            if slot.thread is None and due:
                slot.verdict = None
                slot.thread = threading.Thread(target=self._probe, args=(engine, slot), daemon=True,
                                               name=f"sage_nb-work-probe-{engine.id}")
                slot.thread.start()
            return failed_now, slot.stuck

    def _probe(self, engine, slot: _Slot) -> None:
        try:
            verdict = run_probe(engine.host, engine.port, engine.kind, engine.served_model_name,
                                engine.api_key, self.timeout)
        except Exception:  # a probe must never take the monitor down
            verdict = None
        with self.lock:
            slot.verdict, slot.finished = verdict, time.monotonic()

    def forget(self, live_ids: set[str]) -> None:
        """Drop the slots of engines that are no longer ready."""
        with self.lock:
            for engine_id in [i for i in self.slots if i not in live_ids]:
                del self.slots[engine_id]
