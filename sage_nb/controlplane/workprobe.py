"""Work probes: catch an engine that answers ``/health`` but completes no request.

vLLM's ``/health`` is served by the API process and only reports an EngineCore that has
*errored*; a core that hangs (deadlock, stopped process, stuck device) still looks healthy.
So every ``work_probe_interval`` seconds each ready engine gets one tiny real request (a
1-token completion, or one embedding) with ``work_probe_timeout``. A probe that times out
counts as a failed health probe — unless the engine's own counters (``/metrics``) moved
meanwhile: then it is busy, not hung. Probes run on their own daemon threads, so a hung
engine never slows the health pass that watches the others.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from . import probe

# vLLM's Prometheus counters that move whenever the engine makes progress on any request
PROGRESS_COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                     "vllm:request_success_total")

OK, STUCK = "ok", "stuck"  # verdicts; None when the probe proved nothing (engine unreachable)


def progress(host: str, port: int, api_key: str | None, timeout: float) -> float | None:
    """The sum of the engine's progress counters, or None when ``/metrics`` gives none."""
    reply = probe.get(host, port, "/metrics", api_key, timeout)
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
    reply = probe.call(host, port, "POST", path, api_key, timeout, body)
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
