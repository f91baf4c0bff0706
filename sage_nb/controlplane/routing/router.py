"""Routing: which ready, healthy engine serves a request, by kind and model — never by port.

Several engines of one model share load by in-flight requests. The view of the
registry is cached and refreshed only when the registry changed: at once for this
process's own commits, and within ``RECHECK_S`` for another process's (SQLite's
``data_version``, asked at most that often), so a routing decision costs microseconds.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import defaultdict

from ..engines.idle import Usage
from ..errors import BadRequest, NoBackend, NotFound
from ..state import is_routable, is_wakeable
from ..store.registry import Engine, Registry

KIND_LABEL = {"llm": "LLM", "embedding": "embedding"}
START_HINT = {"llm": "%llm start <model>", "embedding": "%llm start <model> --embedding"}


def no_backend_message(kind: str | None) -> str:
    """What to do when no engine of ``kind`` is routable (``None``: of any kind)."""
    kind = kind or "llm"
    return f"No {KIND_LABEL[kind]} backend available. Start one with: {START_HINT[kind]}"


def _fields(engine, *names: str) -> tuple:
    if isinstance(engine, dict):
        return tuple(engine[n] for n in names)
    return tuple(getattr(engine, n) for n in names)


def _field(engine, name: str):
    return engine[name] if isinstance(engine, dict) else getattr(engine, name)


def adapter_names(engine) -> set[str]:
    """The LoRA adapters an engine holds (loaded, or to be loaded again when it wakes), by name."""
    held = engine.get("adapters") if isinstance(engine, dict) else getattr(engine, "adapters", None)
    return {a["name"] for a in held or () if not a.get("error")}


def upstream_model(engine, model: str | None) -> str:
    """What a request's ``model`` becomes at the engine: the adapter's name when it asks for one the
    engine holds (vLLM applies it then), else the engine's served name."""
    return model if model and model in adapter_names(engine) else _field(engine, "served_model_name")


class BackendIndex:
    """Routable engines by kind and by every name a request may use for them (served name, model
    path, engine name, id). :meth:`candidates` is the one rule for "which engines serve a request
    of this kind for this model", used by the gateway's router and the kernel's client alike.
    Takes engine records or their JSON models."""

    def __init__(self, engines) -> None:
        engines = list(engines)
        self.engines = [e for e in engines if is_routable(e)]
        self.idle = [e for e in engines if is_wakeable(e)]  # woken by a request for them
        self.by_key: dict[str, list] = defaultdict(list)
        self.by_kind: dict[str, list] = defaultdict(list)
        self.ids = set()
        for e in self.engines:
            kind, served, model, name, engine_id = _fields(e, "kind", "served_model_name", "model", "name", "id")
            self.by_kind[kind].append(e)
            for key in {served, model, name, engine_id} | adapter_names(e):
                self.by_key[key].append(e)
            self.ids.add(engine_id)

    def candidates(self, kind: str | None, model: str | None = None) -> list:
        """The engines of ``kind`` (``None``: any kind) serving ``model`` (any of ``kind`` when it is
        empty). Raises
        :class:`NoBackend` (503) when no engine of ``kind`` is routable, :class:`NotFound` (404,
        naming the models of ``kind`` there are) when none serves ``model``, and
        :class:`BadRequest` (400) when ``model`` is served by engines of the other kind only."""
        of_kind = self.engines if kind is None else self.by_kind.get(kind, [])
        if not model:
            if not of_kind:
                raise NoBackend(no_backend_message(kind))
            return of_kind
        named = self.by_key.get(model, [])
        right = named if kind is None else [e for e in named if _field(e, "kind") == kind]
        if right:
            return right
        if named:
            other = _field(named[0], "kind")
            raise BadRequest(f"model {model!r} is an {KIND_LABEL[other]} model (kind {other!r}); "
                             f"this route needs an {KIND_LABEL[kind]} model")
        if not of_kind:
            raise NoBackend(no_backend_message(kind))
        served = sorted({_field(e, "served_model_name") for e in of_kind})
        label = KIND_LABEL[kind] + " " if kind else ""
        raise NotFound(f"model {model!r} is not served by any ready {label}engine; "
                       f"{label}models available: {served}")


    def wakeable(self, kind: str | None, model: str | None = None):
        """An idle engine of ``kind`` serving ``model`` (any of ``kind`` when empty) that a request
        may wake when no engine is routable for it (the one waking already first), or ``None``."""
        for e in sorted(self.idle, key=lambda e: not _field(e, "wake_started_at")):
            if kind is not None and _field(e, "kind") != kind:
                continue
            if not model or model in {_field(e, n) for n in ("served_model_name", "model", "name", "id")} \
                    or model in adapter_names(e):
                return e
        return None


RECHECK_S = 0.05  # how stale another process's registry change may be to the router (a query per request
#                  was 4% of the server's time under load; a stale pick of a stopped engine is retried)


class Router:
    """Picks engines for requests and counts what is in flight on each."""

    def __init__(self, registry: Registry, usage: Usage | None = None) -> None:
        self.registry = registry
        self.usage = usage or Usage()  # the control plane's: requests keep engines from going idle
        self.inflight: dict[str, int] = self.usage.inflight
        self._version: tuple | None = None
        self._checked = (-1, 0.0)  # (this process's commit count, monotonic time) at the last check
        self._index = BackendIndex([])
        self._lock = threading.Lock()
        self._tiebreak = itertools.count()

    def refresh(self) -> None:
        """Read the registry again at the next decision (another process may have just changed it)."""
        self._checked = (-1, 0.0)

    def index(self) -> BackendIndex:
        """The routable engines (cached until the registry changes)."""
        commits, now = self.registry.commits, time.monotonic()
        if commits == self._checked[0] and now - self._checked[1] < RECHECK_S:
            return self._index
        self._checked = (commits, now)
        version = self.registry.version()
        if version != self._version:
            with self._lock:
                self._index = BackendIndex(self.registry.engines())
                self._version = version
        return self._index

    def ready_engines(self) -> list[Engine]:
        """Routable engines (ready and healthy)."""
        return self.index().engines

    def is_ready(self, engine_id: str) -> bool:
        """Whether the engine is still routable."""
        return engine_id in self.index().ids

    def models(self) -> list[dict]:
        """One entry per served name of a ready or idle engine (a request wakes those), with its
        kind and replicas."""
        out: dict[str, dict] = {}
        index = self.index()
        for e in index.engines + index.idle:
            entry = out.setdefault(e.served_model_name, {
                "id": e.served_model_name, "object": "model", "owned_by": "sage_nb", "kind": e.kind,
                "root": e.model, "created": int(e.ready_at or e.created_at), "engines": []})
            entry["engines"].append({"id": e.id, "name": e.name, "state": e.state})
        for e in index.engines + index.idle:  # adapters under their base, as vLLM lists them (parent)
            for a in e.adapters:
                if a.get("error"):
                    continue
                entry = out.setdefault(a["name"], {
                    "id": a["name"], "object": "model", "owned_by": a.get("owner") or "sage_nb", "kind": e.kind,
                    "root": a["path"], "parent": e.served_model_name, "adapter": True,
                    "created": int(a.get("loaded_at") or e.created_at), "engines": []})
                entry["engines"].append({"id": e.id, "name": e.name, "state": e.state})
        return list(out.values())

    def is_idle(self, engine_id: str) -> bool:
        """Whether the engine is sleeping, unloaded or waking (a request for it may wait)."""
        self.refresh()
        return any(e.id == engine_id for e in self.index().idle)

    def wakeable(self, kind: str | None, model: str | None = None) -> Engine | None:
        """An idle engine a request for ``model`` may wake (see :meth:`BackendIndex.wakeable`)."""
        return self.index().wakeable(kind, model)

    def pick(self, kind: str | None, model: str | None = None, exclude: frozenset[str] = frozenset()) -> Engine:
        """The least-loaded engine of ``kind`` serving ``model`` (served name, model path or
        engine name); any engine of ``kind`` when ``model`` is empty."""
        candidates = self.index().candidates(kind, model)
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
        self.usage.begin(engine.id)

    def release(self, engine: Engine) -> None:
        self.usage.end(engine.id)
