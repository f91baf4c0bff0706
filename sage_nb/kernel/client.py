"""The notebook's client: engines through a transport chosen once (the server's REST API, or the
same control plane embedded in this process when no server with the extension is reachable).

``llm()`` and ``embeddings()`` return ready ``openai.OpenAI`` objects chosen by kind from the
backends (never by port); the chosen served name is their ``.model`` attribute.
``langchain_chat()`` and ``langchain_embeddings()`` do the same for LangChain. The kernel's
shared client is :func:`get_client` (``sage_nb.client`` re-exports these functions).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sage_nb.controlplane import ControlPlane, EngineFailed, EngineState, LaunchRequest, NoBackend, NotFound, validation
from sage_nb.controlplane.routing.router import BackendIndex, upstream_model

from . import integrations
from .connection import ServerInfo, this_kernel
from .transport import Transport, connect

# (pattern in the engine log, phase shown while it loads, where \1 is the pattern's group); the last one
# found wins. Downloads are huggingface_hub's own lines, which the engine logs for a hub model
# (the supervisor sets HF_HUB_VERBOSITY=debug for it): vLLM logs nothing while it downloads weights.
WEIGHT_FILE = r"[^'\n]+\.(?:safetensors|bin|pt|pth|gguf)"
PHASES = [
    (re.compile(r"Initializing a V1 LLM engine|Initializing a V\d"), "initializing engine"),
    (re.compile(rf"Downloading '({WEIGHT_FILE})' to"), r"downloading weights: \1"),
    (re.compile(r"Downloading '([^'\n]+)' to"), r"downloading \1"),
    (re.compile(r"Starting to load model|Initializing model took|Loading weights(?! took)|Loading safetensors"
                r"|Time spent downloading weights"), "loading weights"),  # the model is built, then loaded
    (re.compile(r"Model loading took|Loading weights took"), "weights loaded"),
    (re.compile(r"KV cache|# (CPU|GPU) blocks|profile, create kv cache"), "allocating KV cache"),
    (re.compile(r"Starting vLLM (API )?server|Application startup complete"), "starting API server"),
]


def loading_phase(log: str) -> str:
    """The latest loading phase seen in an engine's log (at one spot, the first pattern wins)."""
    best, phase = -1, "launching"
    for pattern, name in PHASES:
        for match in pattern.finditer(log):
            if match.start() > best:
                best, phase = match.start(), match.expand(name)
    return phase


LOADING = frozenset({EngineState.STARTING, EngineState.WAKING})  # the states wait_ready polls through


class Client:
    """Engines and OpenAI clients for this notebook, over one :class:`Transport`."""

    def __init__(self, server: ServerInfo | None = None, *, url: str | None = None,
                 token: str | None = None, embedded: bool | None = None, transport: Transport | None = None,
                 **cp_settings) -> None:
        self.transport = transport or connect(server, url=url, token=token, embedded=embedded, **cp_settings)

    @property
    def mode(self) -> str:
        """``"server"`` or ``"embedded"``."""
        return self.transport.mode

    @property
    def server(self) -> ServerInfo | None:
        return self.transport.server

    @property
    def why_embedded(self) -> str:
        return self.transport.why_embedded

    @property
    def control_plane(self) -> ControlPlane | None:
        """The embedded control plane (``None`` in server mode)."""
        return self.transport.control_plane

    # -------------------------------------------------------------- engines
    def backends(self) -> dict:
        return self.transport.backends()

    def engines(self) -> list[dict]:
        return self.transport.engines()

    def engine(self, id_or_name: str) -> dict:
        return self.transport.engine(id_or_name)

    def gpus(self) -> dict:
        return self.transport.gpus()

    def settings(self) -> dict:
        """The effective settings of the control plane this client talks to."""
        return self.transport.settings()

    def gpu_doctor(self) -> dict:
        """The GPU doctor's report (``python -m sage_nb.doctor --gpu``) of the control plane this client talks
        to: in server mode the server's GPUs, ``CUDA_VISIBLE_DEVICES`` and ``gpus`` setting."""
        return self.transport.gpu_doctor()

    def usage(self, days: int = 1, user: str | None = None) -> dict:
        """Usage of the box service's shared engines over the last ``days`` days (UTC): your rows (an admin:
        everyone's, or ``user``'s), each engine's share of work by user, your limits and tokens today."""
        return self.transport.usage(validation.integer("days", days), user)

    def metrics(self, id_or_name: str | None = None, window: float = 600.0, points: bool = False) -> dict:
        """What the engines are doing: every engine's latest figures (``engines``; with ``points``, each
        one's series too), or with ``id_or_name`` one engine's series over the last ``window`` seconds
        (points, latency quantiles, totals)."""
        window = validation.seconds("window", window)
        if id_or_name is None:
            return self.transport.metrics(window, points)
        return self.transport.engine_metrics(id_or_name, window)

    def gpu_metrics(self, window: float = 600.0) -> dict:
        """Each GPU's memory over the last ``window`` seconds, by owner."""
        return self.transport.gpu_metrics(validation.seconds("window", window))

    def logs(self, id_or_name: str, lines: int = 100) -> str:
        return self.transport.logs(id_or_name, validation.integer("lines", lines))

    def prune(self, kernel_id: str | None = None, notebook: str | None = None) -> list[str]:
        """Remove stopped and failed engine records: every one, or (``kernel_id``/``notebook``, as
        :func:`.connection.this_kernel` gives them) those that kernel or notebook started. Returns the
        removed ids."""
        return self.transport.prune(kernel_id, notebook)

    def stop(self, id_or_name: str) -> dict:
        return self.transport.stop(id_or_name)

    def start(self, model: str, kind: str = "llm", *, wait: bool = True, timeout: float | None = None,
              on_progress: Callable[[dict, str], None] | None = None, **options) -> dict:
        """Start an engine (options as ``ControlPlane.start_engine``); with ``wait``, block until it
        is ready, calling ``on_progress(engine, phase)`` as the loading phase changes. In a kernel,
        ``kernel_id`` and ``notebook`` are this kernel's unless given; ``scope="kernel"`` stops the
        engine when this kernel shuts down."""
        kernel_id, notebook = this_kernel()  # who starts it (and the kernel scope="kernel" ties it to)
        options.setdefault("kernel_id", kernel_id)
        options.setdefault("notebook", notebook)
        req = LaunchRequest(model=model, kind=kind, **options)  # bad input fails here, before any call
        engine = self.transport.start(req)
        return self.wait_ready(engine["id"], timeout, on_progress) if wait else engine

    def wait_ready(self, id_or_name: str, timeout: float | None = None,
                   on_progress: Callable[[dict, str], None] | None = None) -> dict:
        """Poll while the engine is ``starting`` or ``waking``; :class:`EngineFailed` if it does not
        end ``ready``. ``on_progress(engine, phase)`` is called as the phase changes."""
        limit = timeout or 3600
        deadline = time.monotonic() + limit
        phase = None
        while True:
            engine = self.engine(id_or_name)
            if engine["state"] not in LOADING:
                break
            if on_progress is not None:
                new = self.phase(engine)
                if new != phase:
                    phase = new
                    on_progress(engine, phase)
            if time.monotonic() > deadline:
                raise EngineFailed(f"engine {engine['name']!r} is not ready after {limit:.0f} s")
            time.sleep(0.5)
        if engine["state"] != EngineState.READY:
            raise EngineFailed(f"engine {engine['name']!r} {engine['state']}: {engine.get('error') or ''}".strip())
        if on_progress is not None:
            on_progress(engine, "ready")
        return engine

    def phase(self, engine: dict) -> str | None:
        """What a loading engine does now: ``waking``, or its loading phase from its log
        (``downloading weights: <file>``, ``loading weights``...); None when it is not loading."""
        if engine["state"] == EngineState.WAKING:
            return "waking"
        if engine["state"] == EngineState.STARTING:
            return loading_phase(self.transport.logs(engine["id"], 400))
        return None

    # -------------------------------------------------------------- idle engines
    def sleep(self, id_or_name: str, mode: str = "auto") -> dict:
        """Give a ready engine's GPU memory back: ``sleep`` (vLLM sleep mode, the process stays),
        ``unload`` (the process stops, the record stays) or ``auto`` (sleep where it can)."""
        return self.transport.sleep(id_or_name, mode)

    def wake(self, id_or_name: str, *, wait: bool = True, timeout: float | None = None,
             on_progress: Callable[[dict, str], None] | None = None) -> dict:
        """Wake a sleeping or unloaded engine; with ``wait``, block until it is ready (as :meth:`wait_ready`)."""
        engine = self.transport.wake(id_or_name)
        return self.wait_ready(engine["id"], timeout, on_progress) if wait else engine

    def set_keep_alive(self, id_or_name: str, keep_alive: float | str | None) -> dict:
        """How long the engine stays loaded once idle: seconds, ``"10m"``, ``"1h30m"``; ``None``,
        ``-1`` or ``"forever"``: never idle out. Checked here first, sent as given."""
        validation.duration("keep_alive", keep_alive)
        return self.transport.set_keep_alive(id_or_name, keep_alive)

    # -------------------------------------------------------------- LoRA adapters
    def load_adapter(self, name: str, path: str, engine: str | None = None, share: list[str] | None = None) -> dict:
        """Load the LoRA adapter at ``path`` (peft's ``save_pretrained`` directory) as ``name`` onto
        ``engine`` (default: the one engine started with ``lora=True``); then ``llm(name)`` uses it. On a
        shared engine of the box service, ``share`` says who else may use it (user names, ``@group``, ``*``)."""
        validation.adapter_name(name)
        where = Path(path).expanduser()  # the kernel's working directory, not the server's
        return self.transport.load_adapter(name, str(where.resolve() if where.exists() else where), engine, share)

    def unload_adapter(self, name: str, engine: str | None = None) -> list[dict]:
        """Unload adapter ``name`` (from ``engine``, default every engine holding it); the removed ones."""
        return self.transport.unload_adapter(name, engine)

    def adapters(self) -> list[dict]:
        """Every LoRA adapter on the engines, with its engine and base model (``parent``)."""
        return self.transport.adapters()

    # -------------------------------------------------------------- OpenAI clients
    def backend(self, kind: str, model: str | None = None) -> dict:
        """The backend a request of ``kind`` (``llm``/``embedding``) for ``model`` would use (the
        gateway's own rule, :class:`BackendIndex`)."""
        backends = self.backends()
        try:
            return BackendIndex(backends["llm_backends"] + backends["embedding_backends"]).candidates(kind, model)[0]
        except (NoBackend, NotFound):  # none ready: an idle one is woken by the first request
            idle = BackendIndex(self.engines()).wakeable(kind, model)
            if idle is None:
                raise
            return idle

    def openai(self, kind: str, model: str | None = None):
        """A ready ``openai.OpenAI`` for ``kind``; its ``.model`` is the served name to use."""
        import openai

        chosen = self.backend(kind, model)
        client = openai.OpenAI(**self._endpoint(chosen))
        client.model = upstream_model(chosen, model)  # an adapter's name stays: it picks the adapter
        client.backend = chosen
        return client

    def llm(self, model: str | None = None):
        """An ``openai.OpenAI`` for an LLM backend (``client.model`` names it)."""
        return self.openai("llm", model)

    def embeddings(self, model: str | None = None):
        """An ``openai.OpenAI`` for an embedding backend (``client.model`` names it)."""
        return self.openai("embedding", model)

    # -------------------------------------------------------------- LangChain (langchain-openai, not a dependency)
    def langchain_chat(self, model: str | None = None, **kwargs):
        """A ``langchain_openai.ChatOpenAI`` for an LLM backend (chosen like :meth:`llm`); ``kwargs``
        go to ``ChatOpenAI`` (``temperature``, ``max_tokens``, ...)."""
        integrations.langchain_openai()  # a missing package is said before any request
        chosen = self.backend("llm", model)
        return integrations.chat_model(model=upstream_model(chosen, model), **self._endpoint(chosen), **kwargs)

    def langchain_embeddings(self, model: str | None = None, **kwargs):
        """A ``langchain_openai.OpenAIEmbeddings`` for an embedding backend that sends raw strings
        (``check_embedding_ctx_length=False``: never OpenAI's tiktoken ids); ``kwargs`` pass through."""
        integrations.langchain_openai()  # a missing package is said before any request
        chosen = self.backend("embedding", model)
        return integrations.embeddings_model(model=chosen["served_model_name"], **self._endpoint(chosen), **kwargs)

    def _endpoint(self, chosen: dict) -> dict:
        """``base_url``, ``api_key`` and (embedded: requests that wake idle engines) ``http_client``."""
        base_url, api_key = self.transport.endpoint(chosen)
        http = self.transport.http_client(chosen)
        return {"base_url": base_url, "api_key": api_key, **({"http_client": http} if http is not None else {})}

    def gateway_url(self) -> str | None:
        """The gateway's OpenAI base URL (``<server>/sage_nb/v1``), or ``None`` without a server."""
        return self.server.api("sage_nb/v1") if self.server is not None else None


# ---------------------------------------------------------------------- the kernel's shared client
_lock = threading.Lock()
_default: Client | None = None


def get_client(refresh: bool = False) -> Client:
    """The kernel's shared :class:`Client` (created on first use)."""
    global _default
    with _lock:
        if _default is None or refresh:
            _default = Client()
        return _default


def set_client(client: Client | None) -> None:
    """Replace the shared client (``None``: find the server again on next use)."""
    global _default
    with _lock:
        _default = client
