"""The HTTP transport of an embedded client's OpenAI objects: every request goes to the engine's
address and key as they are now, wakes the engine first when it is idle (sleeping or unloaded: it
may come back on another port), and counts as use, so a notebook that keeps calling keeps it loaded.
In server mode none of this is needed: the gateway does the same for every caller."""

from __future__ import annotations

import httpx

from sage_nb.controlplane import ControlPlane, ControlPlaneError, EngineState

PLACEHOLDER = "http://sage-nb-engine.invalid/v1"  # the base URL of an engine that is idle now


class EngineTransport(httpx.BaseTransport):
    """Routes each request of one ``openai.OpenAI`` to one engine of an embedded control plane."""

    def __init__(self, control_plane: ControlPlane, engine_id: str) -> None:
        self.cp = control_plane
        self.engine_id = engine_id
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        try:
            engine = self.cp.registry.find(self.engine_id)
            if engine.state != EngineState.READY:
                self.cp.wake_engine(self.engine_id)  # one wake, shared with every other caller
                engine = self.cp.registry.find(self.engine_id)
        except ControlPlaneError as e:
            status = e.status if e.status >= 400 else 503
            return httpx.Response(503 if status == 409 else status, request=request,
                                  json={"error": {"message": e.message, "code": status}})
        request.url = request.url.copy_with(scheme="http", host=engine.host, port=engine.port)
        request.headers["Host"] = f"{engine.host}:{engine.port}"
        request.headers["Authorization"] = f"Bearer {engine.api_key}"
        self.cp.usage.begin(self.engine_id)
        try:
            return self.inner.handle_request(request)
        finally:
            self.cp.usage.end(self.engine_id)

    def close(self) -> None:
        self.inner.close()


def http_client(control_plane: ControlPlane, backend: dict) -> tuple[str, httpx.Client]:
    """The base URL and ``httpx.Client`` for an embedded client's requests to ``backend``."""
    return backend.get("base_url") or PLACEHOLDER, httpx.Client(transport=EngineTransport(control_plane, backend["id"]))
