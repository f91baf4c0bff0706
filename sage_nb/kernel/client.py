"""The notebook's client: engines through the server's REST API, or, when no server with the
extension is reachable, through the same control plane embedded in this process.

``llm()`` and ``embeddings()`` return ready ``openai.OpenAI`` objects chosen by kind from the
backends (never by port); the chosen served name is their ``.model`` attribute.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from sage_nb.controlplane import BadRequest, ControlPlane, EngineFailed, LaunchRequest, NotFound
from sage_nb.controlplane.process import log_tail
from sage_nb.controlplane.router import KIND_LABEL, NoBackend, no_backend_message

from .connection import ServerInfo, find_server, reachable, request

# (pattern in the engine log, phase shown while it loads); the last one found wins
PHASES = [
    (re.compile(r"Initializing a V1 LLM engine|Initializing a V\d"), "initializing engine"),
    (re.compile(r"Starting to load model|Loading weights|Loading safetensors"), "loading weights"),
    (re.compile(r"Model loading took|Loading weights took|Initializing model took"), "weights loaded"),
    (re.compile(r"KV cache|# (CPU|GPU) blocks|profile, create kv cache"), "allocating KV cache"),
    (re.compile(r"Starting vLLM (API )?server|Application startup complete"), "starting API server"),
]


def loading_phase(log: str) -> str:
    """The latest loading phase seen in an engine's log."""
    best, phase = -1, "launching"
    for pattern, name in PHASES:
        for match in pattern.finditer(log):
            if match.start() > best:
                best, phase = match.start(), name
    return phase


class Client:
    """Engines and OpenAI clients for this notebook (server mode or embedded mode)."""

    def __init__(self, server: ServerInfo | None = None, *, url: str | None = None,
                 token: str | None = None, embedded: bool | None = None, **cp_settings) -> None:
        self.server: ServerInfo | None = None
        self.why_embedded = "embedded mode was asked for"
        self._cp: ControlPlane | None = None
        if not embedded:
            candidate = server or find_server(url, token)
            ok, why = reachable(candidate) if candidate else (False, "no Jupyter server found for this kernel")
            if ok:
                self.server = candidate
            elif embedded is False:
                raise ConnectionError(f"sage_nb server extension not reachable: {why}")
            else:
                self.why_embedded = why
        if self.server is None:
            self._cp = ControlPlane(**cp_settings)
            self._cp.discover()

    @property
    def mode(self) -> str:
        return "server" if self.server else "embedded"

    @property
    def control_plane(self) -> ControlPlane | None:
        """The embedded control plane (``None`` in server mode)."""
        return self._cp

    def _rest(self, method: str, path: str, body=None):
        return request(self.server, method, path, body)

    # -------------------------------------------------------------- engines
    def backends(self) -> dict:
        return self._rest("GET", "sage_nb/api/backends") if self.server else self._cp.backends()

    def engines(self) -> list[dict]:
        return self._rest("GET", "sage_nb/api/engines") if self.server else self._cp.engines()

    def engine(self, id_or_name: str) -> dict:
        if self.server:
            return self._rest("GET", f"sage_nb/api/engines/{_path_part(id_or_name)}")
        return self._cp.engine(id_or_name)

    def gpus(self) -> dict:
        return self._rest("GET", "sage_nb/api/gpus") if self.server else self._cp.gpu_report()

    def logs(self, id_or_name: str, lines: int = 100) -> str:
        if self.server:
            return self._rest("GET", f"sage_nb/api/engines/{_path_part(id_or_name)}/logs?lines={int(lines)}")["log"]
        return self._cp.logs(id_or_name, lines)

    def prune(self) -> list[str]:
        return self._rest("POST", "sage_nb/api/engines/prune")["removed"] if self.server else self._cp.prune()

    def stop(self, id_or_name: str) -> dict:
        if self.server:
            return self._rest("DELETE", f"sage_nb/api/engines/{_path_part(id_or_name)}")
        return self._cp.stop_engine(id_or_name)

    def start(self, model: str, kind: str = "llm", *, wait: bool = True, timeout: float | None = None,
              on_progress: Callable[[dict, str], None] | None = None, **options) -> dict:
        """Start an engine (options as ``ControlPlane.start_engine``); with ``wait``, block until it
        is ready, calling ``on_progress(engine, phase)`` as the loading phase changes."""
        req = LaunchRequest(model=model, kind=kind, **options)  # bad input fails here, before any call
        if self.server:
            body = {k: v for k, v in vars(req).items() if v is not None}
            engine = self._rest("POST", "sage_nb/api/engines", body)
        else:
            engine = self._cp.start(req, wait=False)
        return self.wait_ready(engine["id"], timeout, on_progress) if wait else engine

    def wait_ready(self, id_or_name: str, timeout: float | None = None,
                   on_progress: Callable[[dict, str], None] | None = None) -> dict:
        """Poll until the engine leaves ``starting``; :class:`EngineFailed` if it fails."""
        deadline = time.monotonic() + (timeout or 3600)
        phase = None
        while True:
            engine = self.engine(id_or_name)
            if engine["state"] != "starting":
                break
            if on_progress is not None:
                text = self.logs(engine["id"], 400) if self.server else log_tail(engine["log_path"], 400)
                new = loading_phase(text)
                if new != phase:
                    phase = new
                    on_progress(engine, phase)
            if time.monotonic() > deadline:
                raise EngineFailed(f"engine {engine['name']!r} is not ready after {timeout:.0f} s")
            time.sleep(0.5)
        if engine["state"] != "ready":
            raise EngineFailed(f"engine {engine['name']!r} {engine['state']}: {engine.get('error') or ''}".strip())
        if on_progress is not None:
            on_progress(engine, "ready")
        return engine

    # -------------------------------------------------------------- OpenAI clients
    def backend(self, kind: str, model: str | None = None) -> dict:
        """The backend a request of ``kind`` (``llm``/``embedding``) for ``model`` would use."""
        backends = self.backends()
        pool = backends["llm_backends"] + backends["embedding_backends"]
        if model:
            named = [b for b in pool if model in (b["served_model_name"], b["model"], b["name"], b["id"])]
            if not named:
                raise BadRequest(f"no ready engine serves {model!r}; ready: "
                                 f"{sorted(b['served_model_name'] for b in pool) or 'none'}")
            right = [b for b in named if b["kind"] == kind]
            if not right:
                raise BadRequest(f"model {model!r} is an {KIND_LABEL[named[0]['kind']]} model; "
                                 f"this needs an {KIND_LABEL[kind]} model")
            return right[0]
        of_kind = backends[f"{kind}_backends"]
        if not of_kind:
            raise NoBackend(no_backend_message(kind))
        return of_kind[0]

    def openai(self, kind: str, model: str | None = None):
        """A ready ``openai.OpenAI`` for ``kind``; its ``.model`` is the served name to use."""
        import openai

        chosen = self.backend(kind, model)
        if self.server:  # through the gateway, with the Jupyter token
            client = openai.OpenAI(base_url=self.server.api("sage_nb/v1"), api_key=self.server.token or "none")
        else:  # embedded: straight to the engine, with its private key
            client = openai.OpenAI(base_url=chosen["base_url"], api_key=self._cp.api_key(chosen["id"]))
        client.model = chosen["served_model_name"]
        client.backend = chosen
        return client

    def llm(self, model: str | None = None):
        """An ``openai.OpenAI`` for an LLM backend (``client.model`` names it)."""
        return self.openai("llm", model)

    def embeddings(self, model: str | None = None):
        """An ``openai.OpenAI`` for an embedding backend (``client.model`` names it)."""
        return self.openai("embedding", model)


def _path_part(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", str(value)):
        raise NotFound(f"no engine with id or name {value!r}")
    return value
