"""LoRA adapters on running engines: load, unload, list, and load again wherever an engine comes back.

An engine started with ``--lora`` (``LaunchRequest.lora``) runs vLLM with ``--enable-lora`` and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; an adapter is then loaded with ``POST
/v1/load_lora_adapter {lora_name, lora_path}`` and picked by a request that names it in ``model``.
The registry records each engine's adapters (``Engine.adapters``): that record is the truth, and
:meth:`AdapterKeeper.restore` makes a (re)started engine match it before it is marked ready — after
an unload and wake, a relaunch on a new port, a relaunch on a Ray node — so a request for an adapter
never reaches an engine that answers with the base model instead. An engine that is not ready when an
adapter is loaded (starting, sleeping, unloaded) gets it recorded now and loaded when it is back.
"""

from __future__ import annotations

import logging
import time

from .. import validation
from ..errors import BadRequest, Conflict, EngineFailed, Forbidden, NotFound
from ..state import ENDED, EngineState
from ..store.registry import Engine, Registry
from . import check

log = logging.getLogger(__name__)
LOAD_TIMEOUT = 120.0  # vLLM reads the adapter's files on the engine's loop: large ones take a while


def _error_text(reply) -> str:
    data = reply.json()
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(data.get("detail"), str):
            return data["detail"]
    return (reply.body.decode(errors="replace").strip() or reply.error or f"HTTP {reply.status}")[:500]


def at_start(req, engine: Engine, engines: list[Engine]) -> list[dict]:
    """The records of the adapters a launch request names (``req.adapters``: name -> path), each checked
    as a load would check it; they are loaded once the engine is ready (:meth:`AdapterKeeper.restore`)."""
    records: list[dict] = []
    weights = check.model_weights(engine.model) if req.adapters else None
    for name, path in (req.adapters or {}).items():
        files = check.read_adapter(path)
        check.check_fits(files, engine.name, engine.lora["max_lora_rank"], weights)
        AdapterKeeper._check_name(engines + [engine], engine, name, files.path)
        records.append({"name": name, "path": files.path, "rank": files.rank, "base": files.base,
                        "owner": None, "users": [], "loaded_at": None, "error": None})
    return records


class AdapterKeeper:
    """The one owner of adapters: every load and unload goes through it and is recorded in the registry."""

    def __init__(self, registry: Registry, call) -> None:
        self.registry = registry
        self._call = call  # engines.probes.call: (host, port, method, path, api_key, timeout, body) -> Reply

    # ------------------------------------------------------------------ queries
    def listing(self) -> list[dict]:
        """Every recorded adapter with its engine (name, id, state, base model)."""
        out = []
        for e in self.registry.engines():
            if e.state in ENDED:
                continue
            out += [{**a, "engine": e.name, "engine_id": e.id, "engine_state": e.state,
                     "parent": e.served_model_name} for a in e.adapters]
        return out

    # ------------------------------------------------------------------ load
    def load(self, name: str, path: str, engine: str | None = None, owner: str | None = None,
             users: list[str] | None = None) -> dict:
        """Load the adapter at ``path`` as ``name`` onto ``engine`` (id or name; default: the one engine
        started with ``--lora``). Checked first: the files, rank, settings vLLM rejects, that its modules
        and shapes are the engine's model's, the name. ``owner`` and ``users``: on a shared engine, who
        loaded it and whom they share it with (``uploads.may_use``). Returns the adapter's model."""
        validation.adapter_name(name)
        files = check.read_adapter(path)
        target = self._target(engine)
        check.check_fits(files, target.name, target.lora["max_lora_rank"], check.model_weights(target.model))
        record = {"name": name, "path": files.path, "rank": files.rank, "base": files.base, "owner": owner,
                  "users": list(users or []), "loaded_at": None, "error": None}
        with self.registry.transaction() as txn:
            current = txn.get(target.id)
            self._check_name(txn.engines(), current, name, files.path)
            same = next((a for a in current.adapters if a["name"] == name), None)
            if same is None:
                txn.update(current.id, adapters=current.adapters + [record])
            elif users is not None and same.get("owner") == owner and same.get("users") != record["users"]:
                txn.update(current.id, adapters=[{**a, "users": record["users"]} if a is same else a
                                                 for a in current.adapters])  # loaded again: shared anew
                current = txn.get(target.id)
        if same is not None and not (same.get("error") and current.state == EngineState.READY):
            return self._model(current, name)  # the same files under the same name: nothing to do
        if current.state == EngineState.READY:
            error = self._load_now(current, record)
            if error:  # refused: the record goes, nothing is left behind
                if same is None:
                    self._forget(current.id, name)
                raise error
        return self._model(self.registry.find(target.id), name)

    def _target(self, engine: str | None) -> Engine:
        if engine is not None:
            target = self.registry.find(engine)
            if target.state in ENDED:
                raise Conflict(f"engine {target.name!r} is {target.state}: start it again with --lora")
        else:
            live = [e for e in self.registry.engines() if e.state not in ENDED and e.kind == "llm"]
            able = [e for e in live if e.lora]
            if len(able) != 1:
                if not able:
                    hint = (f" ({', '.join(e.name for e in live)} were started without it)" if live else "")
                    raise BadRequest("no engine takes LoRA adapters: start one with "
                                     f"%llm start MODEL --lora{hint}")
                raise BadRequest(f"several engines take adapters ({', '.join(e.name for e in able)}): "
                                 "say which with --engine NAME")
            target = able[0]
        if target.kind != "llm":
            raise BadRequest(f"engine {target.name!r} is an embedding engine: LoRA adapters are for LLM engines")
        if not target.lora:
            raise BadRequest(f"engine {target.name!r} was started without --lora, so vLLM cannot load adapters "
                             f"into it: start it with %llm start {target.model} --lora")
        return target

    @staticmethod
    def _check_name(engines: list[Engine], target: Engine, name: str, path: str) -> None:
        """A name is one thing for every request: no engine's name, served model or id, and on another
        engine only as the same files (replicas of one base may each hold it)."""
        for e in engines:
            if e.state in ENDED:
                continue
            if name in (e.name, e.served_model_name, e.id, e.model):
                raise Conflict(f"adapter name {name!r} is taken: engine {e.name!r} serves that name; "
                               "choose another")
            for a in e.adapters:
                if a["name"] == name and a["path"] != path:
                    where = "this engine" if e.id == target.id else f"engine {e.name!r}"
                    whose = f"{a['owner']}'s adapter" if a.get("owner") else f"an adapter from {a['path']}"
                    raise Conflict(f"adapter name {name!r} is taken on {where} by {whose}: unload it first "
                                   "(%llm adapter unload NAME) or choose another name")

    def _load_now(self, engine: Engine, record: dict) -> Exception | None:
        """POST the adapter to the engine; the record gets ``loaded_at`` (or ``error``). Returns the error
        to raise, ``None`` when it is loaded."""
        reply = self._call(engine.host, engine.port, "POST", "/v1/load_lora_adapter", engine.api_key,
                           LOAD_TIMEOUT, {"lora_name": record["name"], "lora_path": record["path"]})
        text = _error_text(reply)
        if reply.status == 200 or (reply.status == 400 and "already been loaded" in text):
            self._mark(engine.id, record["name"], loaded_at=time.time(), error=None)
            return None
        self._mark(engine.id, record["name"], error=f"vLLM: {text}")
        if reply.status in (400, 404, 422):
            return BadRequest(f"engine {engine.name!r} refused adapter {record['name']!r}: {text}")
        return EngineFailed(f"engine {engine.name!r} did not load adapter {record['name']!r}: {text}")

    # ------------------------------------------------------------------ unload
    def unload(self, name: str, engine: str | None = None, owner: str | None = None) -> list[dict]:
        """Unload ``name`` from ``engine`` (default: from every engine holding it) and forget it. ``owner``:
        only an adapter that user loaded (a shared engine's users; ``None``: any, as a publisher may).
        Returns the adapters removed."""
        holders = [e for e in self.registry.engines() if e.state not in ENDED
                   and any(a["name"] == name for a in e.adapters)]
        if engine is not None:
            wanted = self.registry.find(engine)
            holders = [e for e in holders if e.id == wanted.id]
        if not holders:
            where = f" on engine {engine!r}" if engine else ""
            raise NotFound(f"no adapter named {name!r}{where}; %llm adapters lists them")
        for e in holders:
            adapter = next(a for a in e.adapters if a["name"] == name)
            if owner is not None and adapter.get("owner") != owner:
                who = f"was loaded by {adapter['owner']}" if adapter.get("owner") else "came with the engine"
                raise Forbidden(f"adapter {name!r} on engine {e.name!r} {who}: only they (or a publisher) may "
                                "unload it")
        removed = []
        for e in holders:
            adapter = next(a for a in e.adapters if a["name"] == name)
            if e.state == EngineState.READY:
                reply = self._call(e.host, e.port, "POST", "/v1/unload_lora_adapter", e.api_key, LOAD_TIMEOUT,
                                   {"lora_name": name})
                if reply.status not in (200, 404) and not (reply.status == 400 and "not" in _error_text(reply)):
                    raise EngineFailed(f"engine {e.name!r} did not unload adapter {name!r}: {_error_text(reply)}")
            self._forget(e.id, name)
            removed.append({**adapter, "engine": e.name, "engine_id": e.id})
        return removed

    # ------------------------------------------------------------------ restore
    def restore(self, engine: Engine) -> list[str]:
        """Load the engine's recorded adapters that its vLLM does not hold (called before a started or
        woken engine is marked ready). Failures are kept on the adapter's record (``error``), not raised:
        the engine itself is fine. Returns the names loaded."""
        if not engine.lora or not engine.adapters:
            return []
        held = self._held(engine)
        loaded = []
        for record in engine.adapters:
            if record["name"] in held:
                continue
            error = self._load_now(engine, record)
            if error is None:
                loaded.append(record["name"])
            else:
                log.warning("sage_nb: engine %s could not load adapter %s again: %s", engine.name, record["name"],
                            error)
        return loaded

    def _held(self, engine: Engine) -> set[str]:
        reply = self._call(engine.host, engine.port, "GET", "/v1/models", engine.api_key, 5.0, None)
        data = reply.json() if reply.status == 200 else None
        if not isinstance(data, dict):
            return set()
        return {m.get("id") for m in data.get("data", []) if isinstance(m, dict) and m.get("parent")}

    # ------------------------------------------------------------------ records
    def _mark(self, engine_id: str, name: str, **changes) -> None:
        with self.registry.transaction() as txn:
            e = txn.get(engine_id)
            txn.update(engine_id, adapters=[{**a, **changes} if a["name"] == name else a for a in e.adapters])

    def _forget(self, engine_id: str, name: str) -> None:
        with self.registry.transaction() as txn:
            e = txn.get(engine_id)
            txn.update(engine_id, adapters=[a for a in e.adapters if a["name"] != name])

    @staticmethod
    def _model(engine: Engine, name: str) -> dict:
        adapter = next(a for a in engine.adapters if a["name"] == name)
        return {**adapter, "engine": engine.name, "engine_id": engine.id, "engine_state": engine.state,
                "parent": engine.served_model_name}
