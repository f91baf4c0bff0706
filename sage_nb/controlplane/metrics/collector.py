"""The metrics collector: every ``interval`` seconds, each ready engine's ``/metrics`` (all at once,
each bounded by ``timeout``) and each GPU's memory by owner, kept for ``horizon`` seconds.

One collector per control plane, in a thread of its own, so the server's event loop and the
Supervisor's monitor loop never wait for an engine's metrics: an engine whose ``/metrics`` hangs costs a
worker thread for ``timeout`` seconds and shows as "no metrics" with the reason. Only ``ready``
engines are read: collection never wakes a sleeping engine or launches an unloaded one.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..errors import NotFound
from . import scrape
from .history import History

log = logging.getLogger("sage_nb.metrics")
MAX_PAGE = 8 * 1024 * 1024  # bytes of a /metrics page read at most


def fetch(host: str, port: int, timeout: float) -> str:
    """An engine's ``/metrics`` page; ``OSError``/``ValueError`` with the reason when it cannot be read."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read(MAX_PAGE)
        if response.status != 200:
            raise ValueError(f"/metrics answered HTTP {response.status}")
        return body.decode("utf-8", "replace")
    finally:
        conn.close()


class EngineMetrics:
    """One engine's history and how its last collection went."""

    def __init__(self, engine_id: str, horizon: float, interval: float) -> None:
        self.engine_id = engine_id
        self.history = History(horizon, interval)
        self.error: str | None = None
        self.state: str | None = None
        self.served: dict[str, str] = {}
        self.read_at: float | None = None  # wall clock of the last good reading


class MetricsCollector:
    """Bounded histories of every engine's metrics and every GPU's memory. ``engines``: the records
    to consider (each with ``id``, ``name``, ``state``, ``host``, ``port``); ``gpus``: the control
    plane's GPU models (with ``parts``), or None."""

    def __init__(self, engines: Callable[[], list], gpus: Callable[[], list[dict]] | None = None, *,
                 interval: float = 2.0, horizon: float = 900.0, timeout: float = 1.0) -> None:
        self.engines_of, self.gpus_of = engines, gpus
        self.interval, self.horizon, self.timeout = interval, horizon, timeout
        self.engines: dict[str, EngineMetrics] = {}
        self.names: dict[str, str] = {}  # engine name -> id
        self.gpus: deque[tuple[float, float, list[dict]]] = deque(maxlen=int(horizon / max(interval, 0.1)) + 2)
        self.ticks = 0
        self.collected_at = float("-inf")  # when the last round started (monotonic)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="sage-nb-metrics")

    # ---------------------------------------------------------------- the loop
    def start(self) -> None:
        """Collect every ``interval`` seconds in a daemon thread (once; a no-op when running)."""
        if self.interval <= 0 or (self._thread is not None and self._thread.is_alive()):
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="sage-nb-metrics", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout + 2)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        # a round taken just before the thread started (an embedded kernel's first question) counts
        while not self._stop.wait(max(0.0, self.collected_at + self.interval - time.monotonic())):
            try:
                self.collect()
            except Exception:  # a bad tick must not end collection
                log.exception("sage_nb metrics: collection failed")

    def collect(self) -> None:
        """One round: every ready engine's metrics and the GPUs' memory."""
        now, wall = time.monotonic(), time.time()
        self.collected_at = now
        records = list(self.engines_of())
        ready = [e for e in records if e.state == "ready" and e.port]
        pages = {e.id: self._pool.submit(fetch, e.host, e.port, self.timeout) for e in ready}
        gpus = self._gpus() if self.gpus_of is not None else None
        with self._lock:
            seen = set()
            for e in records:
                seen.add(e.id)
                self.names[e.name] = e.id
                m = self.engines.get(e.id) or self.engines.setdefault(e.id, EngineMetrics(e.id, self.horizon,
                                                                                          self.interval))
                m.state = e.state
                if e.id not in pages:
                    m.error = (f"no metrics: the engine is {e.state} (collection never wakes an engine)"
                               if e.state in ("sleeping", "unloaded") else f"no metrics: the engine is {e.state}")
        results = {}
        for engine_id, future in pages.items():
            try:
                results[engine_id] = scrape.read(future.result(), now)
            except (OSError, ValueError, http.client.HTTPException) as exc:
                results[engine_id] = _reason(exc, self.timeout)
        with self._lock:
            for engine_id, result in results.items():
                m = self.engines[engine_id]
                if isinstance(result, str):
                    m.error = result
                else:
                    m.history.add(result)
                    m.error, m.served, m.read_at = None, result.served, wall
            for engine_id in set(self.engines) - seen:  # removed from the registry
                del self.engines[engine_id]
            self.names = {n: i for n, i in self.names.items() if i in self.engines}
            if gpus is not None:
                self.gpus.append((now, wall, gpus))
            self.ticks += 1

    def _gpus(self) -> list[dict] | None:
        try:
            return [gpu_point(g) for g in self.gpus_of()]
        except Exception as e:  # the GPU reading failed this round; the engines' metrics still count
            log.warning("sage_nb metrics: GPUs not read: %s", e)
            return None

    # ---------------------------------------------------------------- the models
    def engine_series(self, id_or_name: str, seconds: float = 600.0) -> dict:
        """One engine's series over the last ``seconds`` (JSON model)."""
        now, wall = time.monotonic(), time.time()
        with self._lock:
            m = self.engines.get(id_or_name) or self.engines.get(self.names.get(id_or_name, ""))
            if m is None:
                raise NotFound(f"no metrics for engine {id_or_name!r} (yet): it is not in the registry, or the "
                               f"collector has not run since it started")
            name = next((n for n, i in self.names.items() if i == m.engine_id), m.engine_id)
            return {"engine_id": m.engine_id, "name": name, "state": m.state,
                    "status": "ok" if m.error is None else "no metrics", "reason": m.error,
                    "read_at": m.read_at, "interval_s": self.interval, "window_s": seconds,
                    "points": m.history.points(seconds, now, wall), "summary": m.history.summary(seconds),
                    "totals": m.history.totals(),
                    "metric_names": dict(m.served)}

    def overview(self, seconds: float = 60.0, points: bool = False) -> list[dict]:
        """Every engine's latest figures (for ``%llm top``): state, running, waiting, KV cache, token
        rates, and the window's latency quantiles; with ``points``, its series too (the dashboard)."""
        out = []
        with self._lock:
            names = sorted(self.names)
        for name in names:
            try:
                series = self.engine_series(name, seconds)
            except NotFound:  # removed since the names were listed
                continue
            last = series["points"][-1] if series["points"] else {}
            out.append({k: series[k] for k in ("engine_id", "name", "state", "status", "reason")}
                       | {k: last.get(k) for k in ("running", "waiting", "kv_cache_pct", "prompt_tps",
                                                     "generation_tps")}
                       | {k: series["summary"].get(k) for k in ("ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms",
                                                                 "itl_p95_ms", "prefix_hit_rate")}
                       | ({"points": series["points"]} if points else {}))
        return out

    def gpu_series(self, seconds: float = 600.0) -> dict:
        """Each GPU's memory over the last ``seconds``: used MiB and MiB by owner."""
        now, wall = time.monotonic(), time.time()
        with self._lock:
            ticks = [(t, w, g) for t, w, g in self.gpus if now - t <= seconds]
        series: dict[str, dict] = {}
        for t, _w, gpus in ticks:
            for g in gpus:
                s = series.setdefault(g["uuid"], {"uuid": g["uuid"], "index": g["index"], "name": g["name"],
                                                  "total_mib": g["total_mib"], "points": []})
                s["points"].append({"t": round(wall - (now - t), 3), "used_mib": g["used_mib"], "by": g["by"]})
        return {"interval_s": self.interval, "window_s": seconds, "gpus": list(series.values())}

    def memory_bytes(self) -> int:
        """About what the engines' histories take."""
        with self._lock:
            return sum(m.history.memory_bytes() for m in self.engines.values())


def gpu_point(g: dict) -> dict:
    """One GPU's memory by owner from the control plane's GPU model: this user's engines by name, other
    users' engines by user, other processes by user, the rest as "other"."""
    by: dict[str, int] = {}
    parts = g.get("parts") or {}
    for e in parts.get("mine", []):
        by[e["name"]] = by.get(e["name"], 0) + max(e["used_mib"], 0)
    for e in parts.get("others", []):
        by[e["user"]] = by.get(e["user"], 0) + max(e["used_mib"], 0)
    for p in parts.get("processes", []):
        key = f"{p['user']} (other processes)"
        by[key] = by.get(key, 0) + p["used_mib"]
    if parts.get("unaccounted_mib"):
        by["other"] = parts["unaccounted_mib"]
    return {"uuid": g.get("uuid"), "index": g.get("index"), "name": g.get("name"), "total_mib": g.get("total_mib"),
            "used_mib": g.get("used_mib"), "by": by}


def _reason(exc: Exception, timeout: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"no metrics: /metrics did not answer within {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "no metrics: nothing listens on the engine's port"
    if isinstance(exc, ValueError) and "HTTP" in str(exc):
        return f"no metrics: {exc}"
    return f"no metrics: {type(exc).__name__}: {exc}"
