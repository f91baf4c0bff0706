"""Routing: which ready, healthy engine serves a request, by kind and model — never by port.

Several engines of one model share load by in-flight requests. The view of the
registry is cached and refreshed only when the registry changed (SQLite's
``data_version``), so a routing decision costs microseconds.
"""

from __future__ import annotations

import itertools
import threading
from collections import defaultdict

from .errors import BadRequest, ControlPlaneError, NotFound
from .registry import Engine, Registry
from .state import EngineState

KIND_LABEL = {"llm": "LLM", "embedding": "embedding"}
START_HINT = {"llm": "%llm start <model>", "embedding": "%llm start <model> --embedding"}


class NoBackend(ControlPlaneError):
    """No ready engine of the wanted kind (503)."""

    status = 503


def no_backend_message(kind: str) -> str:
    return f"No {KIND_LABEL[kind]} backend available. Start one with: {START_HINT[kind]}"


class Router:
    """Picks engines for requests and counts what is in flight on each."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.inflight: dict[str, int] = defaultdict(int)
        self._version: tuple | None = None
        self._ready: list[Engine] = []
        self._by_key: dict[str, list[Engine]] = {}
        self._by_kind: dict[str, list[Engine]] = {}
        self._ids: set[str] = set()
        self._lock = threading.Lock()
        self._tiebreak = itertools.count()

    def ready_engines(self) -> list[Engine]:
        """Ready, healthy engines (cached until the registry changes)."""
        version = self.registry.version()
        if version != self._version:
            with self._lock:
                engines = self.registry.engines()
                ready = [e for e in engines if e.state == EngineState.READY and e.health_failures == 0 and e.port]
                by_key: dict[str, list[Engine]] = defaultdict(list)
                by_kind: dict[str, list[Engine]] = defaultdict(list)
                for e in ready:
                    by_kind[e.kind].append(e)
                    for key in {e.served_model_name, e.model, e.name, e.id}:
                        by_key[key].append(e)
                self._ready, self._by_key, self._by_kind = ready, by_key, by_kind
                self._ids = {e.id for e in ready}
                self._version = version
        return self._ready

    def is_ready(self, engine_id: str) -> bool:
        """Whether the engine is still ready and healthy."""
        self.ready_engines()
        return engine_id in self._ids

    def models(self) -> list[dict]:
        """One entry per served name of a ready engine, with its kind and replicas."""
        out: dict[str, dict] = {}
        for e in self.ready_engines():
            entry = out.setdefault(e.served_model_name, {
                "id": e.served_model_name, "object": "model", "owned_by": "sage_nb", "kind": e.kind,
                "root": e.model, "created": int(e.ready_at or e.created_at), "engines": []})
            entry["engines"].append({"id": e.id, "name": e.name})
        return list(out.values())

    def pick(self, kind: str, model: str | None = None, exclude: frozenset[str] = frozenset()) -> Engine:
        """The least-loaded engine of ``kind`` serving ``model`` (served name, model path or
        engine name); any engine of ``kind`` when ``model`` is empty."""
        engines = self.ready_engines()
        if model:
            named = self._by_key.get(model, [])
            if not named:
                raise NotFound(f"model {model!r} is not served by any ready engine; "
                               f"available: {sorted({e.served_model_name for e in engines}) or 'none'}")
            candidates = [e for e in named if e.kind == kind]
            if not candidates:
                other = named[0].kind
                raise BadRequest(f"model {model!r} is an {KIND_LABEL[other]} model "
                                 f"(kind {other!r}); this route needs an {KIND_LABEL[kind]} model")
        else:
            candidates = self._by_kind.get(kind, [])
        if exclude:
            candidates = [e for e in candidates if e.id not in exclude]
        if not candidates:
            raise NoBackend(no_backend_message(kind))
        if len(candidates) == 1:
            return candidates[0]
        # least in flight; ties go round robin (rotating by position, so every replica gets turns)
        turn, n = next(self._tiebreak), len(candidates)
        best = min(range(n), key=lambda i: (self.inflight.get(candidates[i].id, 0), (i - turn) % n))
        return candidates[best]

    def acquire(self, engine: Engine) -> None:
        self.inflight[engine.id] += 1

    def release(self, engine: Engine) -> None:
        self.inflight[engine.id] -= 1
        if self.inflight[engine.id] <= 0:
            del self.inflight[engine.id]
