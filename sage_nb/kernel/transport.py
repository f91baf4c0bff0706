"""How a notebook's client reaches the control plane. One class per transport, with the same
methods: :class:`RestTransport` talks to the Jupyter server's sage_nb extension, and
:class:`EmbeddedTransport` drives a :class:`ControlPlane` in this process (no server reachable).
:func:`connect` picks one, once, when a client is built."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol
from urllib.parse import quote

from sage_nb.controlplane import BadRequest, ControlPlane, LaunchRequest, NotFound, validation
from sage_nb.controlplane.doctor import report as doctor_report
from sage_nb.controlplane.engines.scope import KernelHost

from . import engine_http
from .connection import ServerInfo, find_server, reachable, request, this_kernel

if TYPE_CHECKING:
    import httpx


class Transport(Protocol):
    """What a client needs from a transport (every method returns JSON models)."""

    mode: str                           # "server" or "embedded"
    server: ServerInfo | None           # the Jupyter server, when there is one
    control_plane: ControlPlane | None  # the in-process control plane, when embedded
    why_embedded: str                   # why no server is used ("" in server mode)

    def engines(self) -> list[dict]: ...
    def engine(self, id_or_name: str) -> dict: ...
    def backends(self) -> dict: ...
    def gpus(self) -> dict: ...
    def logs(self, id_or_name: str, lines: int) -> str: ...
    def prune(self, kernel_id: str | None = None, notebook: str | None = None) -> list[str]: ...
    def stop(self, id_or_name: str) -> dict: ...
    def start(self, req: LaunchRequest) -> dict: ...
    def sleep(self, id_or_name: str, mode: str) -> dict: ...
    def wake(self, id_or_name: str) -> dict: ...
    def set_keep_alive(self, id_or_name: str, keep_alive: float | str | None) -> dict: ...
    def settings(self) -> dict: ...
    def gpu_doctor(self) -> dict: ...
    def adapters(self) -> list[dict]: ...
    def load_adapter(self, name: str, path: str, engine: str | None, share: list[str] | None = None) -> dict: ...
    def unload_adapter(self, name: str, engine: str | None) -> list[dict]: ...
    def usage(self, days: int, user: str | None) -> dict: ...
    def metrics(self, window: float, points: bool = False) -> dict: ...
    def engine_metrics(self, id_or_name: str, window: float) -> dict: ...
    def gpu_metrics(self, window: float) -> dict: ...
    def endpoint(self, backend: dict) -> tuple[str, str]: ...
    def http_client(self, backend: dict) -> httpx.Client | None: ...


def _path_part(value: str) -> str:
    """An engine id or name as a REST path part (a name no engine can have is not found)."""
    if not validation.is_engine_name(value):
        raise NotFound(f"no engine with id or name {value!r}")
    return value


class RestTransport:
    """The server's REST API (``sage_nb/api/...``); OpenAI calls go through its gateway."""

    mode = "server"
    control_plane = None
    why_embedded = ""

    def __init__(self, server: ServerInfo) -> None:
        self.server = server

    def _call(self, method: str, path: str, body=None):
        return request(self.server, method, path, body)

    def engines(self) -> list[dict]:
        return self._call("GET", "sage_nb/api/engines")

    def engine(self, id_or_name: str) -> dict:
        return self._call("GET", f"sage_nb/api/engines/{_path_part(id_or_name)}")

    def backends(self) -> dict:
        return self._call("GET", "sage_nb/api/backends")

    def gpus(self) -> dict:
        return self._call("GET", "sage_nb/api/gpus")

    def logs(self, id_or_name: str, lines: int) -> str:
        path = f"sage_nb/api/engines/{_path_part(id_or_name)}/logs?lines={quote(str(lines))}"
        return self._call("GET", path)["log"]

    def prune(self, kernel_id: str | None = None, notebook: str | None = None) -> list[str]:
        body = {k: v for k, v in (("kernel_id", kernel_id), ("notebook", notebook)) if v is not None}
        return self._call("POST", "sage_nb/api/engines/prune", body or None)["removed"]

    def stop(self, id_or_name: str) -> dict:
        return self._call("DELETE", f"sage_nb/api/engines/{_path_part(id_or_name)}")

    def start(self, req: LaunchRequest) -> dict:
        return self._call("POST", "sage_nb/api/engines", {k: v for k, v in vars(req).items() if v is not None})

    def sleep(self, id_or_name: str, mode: str) -> dict:
        return self._call("POST", f"sage_nb/api/engines/{_path_part(id_or_name)}/sleep", {"mode": mode})

    def wake(self, id_or_name: str) -> dict:
        return self._call("POST", f"sage_nb/api/engines/{_path_part(id_or_name)}/wake", {})

    def set_keep_alive(self, id_or_name: str, keep_alive: float | str | None) -> dict:
        return self._call("PATCH", f"sage_nb/api/engines/{_path_part(id_or_name)}", {"keep_alive": keep_alive})

    def settings(self) -> dict:
        return self._call("GET", "sage_nb/api/settings")

    def gpu_doctor(self) -> dict:
        return request(self.server, "GET", "sage_nb/api/doctor/gpu", timeout=180.0)  # it probes the engine's Python

    def adapters(self) -> list[dict]:
        return self._call("GET", "sage_nb/api/adapters")

    def load_adapter(self, name: str, path: str, engine: str | None, share: list[str] | None = None) -> dict:
        body = {"name": name, "path": path, **({"engine": engine} if engine else {}),
                **({"share": share} if share is not None else {})}
        return self._call("POST", "sage_nb/api/adapters", body)

    def unload_adapter(self, name: str, engine: str | None) -> list[dict]:
        query = f"?engine={quote(engine)}" if engine else ""
        return self._call("DELETE", f"sage_nb/api/adapters/{_path_part(name)}{query}")["removed"]

    def usage(self, days: int, user: str | None) -> dict:
        query = f"days={days}" + (f"&user={quote(user)}" if user else "")
        return self._call("GET", f"sage_nb/api/box/usage?{query}")

    def metrics(self, window: float, points: bool = False) -> dict:
        return self._call("GET", f"sage_nb/api/metrics?window={window:g}" + ("&points=true" if points else ""))

    def engine_metrics(self, id_or_name: str, window: float) -> dict:
        return self._call("GET", f"sage_nb/api/metrics/engines/{_path_part(id_or_name)}?window={window:g}")

    def gpu_metrics(self, window: float) -> dict:
        return self._call("GET", f"sage_nb/api/metrics/gpus?window={window:g}")

    def endpoint(self, backend: dict) -> tuple[str, str]:
        """Through the gateway, with the Jupyter token."""
        return self.server.api("sage_nb/v1"), self.server.token or "none"

    def http_client(self, backend: dict) -> httpx.Client | None:
        """None: the OpenAI client's own (the gateway wakes idle engines and counts use)."""
        return None


class EmbeddedTransport:
    """A control plane in this process, on the same registry a server would use."""

    mode = "embedded"
    server = None

    def __init__(self, control_plane: ControlPlane, why_embedded: str) -> None:
        self.control_plane = control_plane
        self.why_embedded = why_embedded

    def engines(self) -> list[dict]:
        return self.control_plane.engines()

    def engine(self, id_or_name: str) -> dict:
        return self.control_plane.engine(id_or_name)

    def backends(self) -> dict:
        return self.control_plane.backends()

    def gpus(self) -> dict:
        return self.control_plane.gpu_report()

    def logs(self, id_or_name: str, lines: int) -> str:
        return self.control_plane.logs(id_or_name, lines)

    def prune(self, kernel_id: str | None = None, notebook: str | None = None) -> list[str]:
        return self.control_plane.prune(kernel_id, notebook)

    def stop(self, id_or_name: str) -> dict:
        return self.control_plane.stop_engine(id_or_name)

    def start(self, req: LaunchRequest) -> dict:
        if req.shared:
            raise BadRequest("shared engines are published through the box service, by a Jupyter server "
                             f"configured with box_service; this kernel has no server ({self.why_embedded})")
        return self.control_plane.start(req, wait=False)

    def sleep(self, id_or_name: str, mode: str) -> dict:
        return self.control_plane.sleep_engine(id_or_name, mode)

    def wake(self, id_or_name: str) -> dict:
        return self.control_plane.wake_engine(id_or_name, wait=False)

    def set_keep_alive(self, id_or_name: str, keep_alive: float | str | None) -> dict:
        return self.control_plane.set_keep_alive(id_or_name, keep_alive)

    def settings(self) -> dict:
        return self.control_plane.settings.to_model()

    def gpu_doctor(self) -> dict:
        return doctor_report.collect(self.control_plane)

    def adapters(self) -> list[dict]:
        return self.control_plane.adapters()

    def load_adapter(self, name: str, path: str, engine: str | None, share: list[str] | None = None) -> dict:
        if share:
            raise BadRequest("share is for adapters on the box service's shared engines; without a server "
                             "this kernel's engines serve only you")
        return self.control_plane.load_adapter(name, path, engine)

    def unload_adapter(self, name: str, engine: str | None) -> list[dict]:
        return self.control_plane.unload_adapter(name, engine)

    def _collector(self):
        """The control plane's metrics collector, started on first use (one round at once, so the first
        answer has figures)."""
        collector = self.control_plane.metrics
        if not collector.running:
            collector.collect()
            self.control_plane.start_metrics()
        return collector

    def metrics(self, window: float, points: bool = False) -> dict:
        collector = self._collector()
        return {"collecting": collector.running, "interval_s": collector.interval, "window_s": window,
                "engines": collector.overview(window, points)}

    def engine_metrics(self, id_or_name: str, window: float) -> dict:
        return self._collector().engine_series(id_or_name, window)

    def gpu_metrics(self, window: float) -> dict:
        return self._collector().gpu_series(window)

    def usage(self, days: int, user: str | None) -> dict:
        raise NotFound("usage is counted on the box service's shared engines, and this kernel reaches no "
                       f"server ({self.why_embedded}); run it in a notebook of a server linked to the box service")

    def endpoint(self, backend: dict) -> tuple[str, str]:
        """Straight to the engine, with its private key (see :meth:`http_client`)."""
        return backend.get("base_url") or engine_http.PLACEHOLDER, self.control_plane.api_key(backend["id"])

    def http_client(self, backend: dict) -> httpx.Client | None:
        """An ``httpx.Client`` that sends each request to the engine as it is now, waking it first
        when it is idle, and counts it as use."""
        return engine_http.http_client(self.control_plane, backend)[1]


def connect(server: ServerInfo | None = None, *, url: str | None = None, token: str | None = None,
            embedded: bool | None = None, **cp_settings) -> Transport:
    """The server's REST API when its sage_nb extension answers, else an embedded control plane
    (``embedded=True``: always embedded; ``embedded=False``: a server or ``ConnectionError``)."""
    why = "embedded mode was asked for"
    if not embedded:
        candidate = server or find_server(url, token)
        ok, why = reachable(candidate) if candidate else (False, "no Jupyter server found for this kernel")
        if ok:
            return RestTransport(candidate)
        if embedded is False:
            raise ConnectionError(f"sage_nb server extension not reachable: {why}")
    control_plane = ControlPlane(**cp_settings)
    kernel_id = this_kernel()[0]
    if kernel_id is not None:  # in a kernel: engines may be tied to it (scope "kernel")
        control_plane.set_kernel_host(KernelHost.this_process(kernel_id))
    control_plane.discover()
    return EmbeddedTransport(control_plane, why)
