"""HTTP probes of an engine: ``/health``, ``/v1/models`` and ``/openapi.json`` (stdlib only)."""

from __future__ import annotations

import http.client
import json
from dataclasses import dataclass


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
