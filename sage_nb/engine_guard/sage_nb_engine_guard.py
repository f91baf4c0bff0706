"""An API-key guard for every route of a vLLM engine, loaded with ``--middleware sage_nb_engine_guard.KeyGuard``.

vLLM's own ``--api-key`` / ``VLLM_API_KEY`` check (vLLM 0.32.0,
``vllm/entrypoints/serve/middleware/authenticate.py``) guards only paths that start with ``/v1``, ``/v2``,
``/inference`` or ``/cohere``. Everything else is open to any local user: ``/tokenize``, and with
``VLLM_SERVER_DEV_MODE=1`` (needed for sleep mode) the dev routes ``/sleep``, ``/wake_up``, ``/is_sleeping``,
``/collective_rpc``, ``/reset_prefix_cache``... So sage_nb puts this folder on the engine's ``PYTHONPATH``
and adds this middleware: with ``VLLM_API_KEY`` set, every request needs ``Authorization: Bearer <key>``
except ``OPTIONS`` and a few harmless read-only paths (``OPEN_PATHS``); others get vLLM's own 401
``{"error": "Unauthorized"}``. Without a key it does nothing.

vLLM imports it by module name in the engine process, so it imports nothing from sage_nb, only the
standard library (pure ASGI, no Starlette).
"""

from __future__ import annotations

import hashlib
import os
import secrets

OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/metrics", "/openapi.json"})
UNAUTHORIZED_BODY = b'{"error":"Unauthorized"}'
UNAUTHORIZED_HEADERS = [(b"content-type", b"application/json"),
                        (b"content-length", str(len(UNAUTHORIZED_BODY)).encode())]


class KeyGuard:
    """Pure ASGI middleware: a 401 for any http or websocket request without the engine's bearer key."""

    def __init__(self, app) -> None:
        self.app = app
        key = os.environ.get("VLLM_API_KEY")
        self.key_hash = hashlib.sha256(key.encode()).digest() if key else None

    def authorized(self, scope) -> bool:
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() != "bearer":
                    return False
                return secrets.compare_digest(hashlib.sha256(token.encode("latin-1")).digest(), self.key_hash)
        return False

    async def __call__(self, scope, receive, send) -> None:
        if (self.key_hash is None or scope["type"] not in ("http", "websocket")
                or scope.get("method") == "OPTIONS"):
            return await self.app(scope, receive, send)
        root_path = scope.get("root_path", "")
        path = scope["path"].removeprefix(root_path) if root_path else scope["path"]
        if path in OPEN_PATHS or self.authorized(scope):
            return await self.app(scope, receive, send)
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 401, "headers": UNAUTHORIZED_HEADERS})
            await send({"type": "http.response.body", "body": UNAUTHORIZED_BODY})
        elif "websocket.http.response" in (scope.get("extensions") or {}):  # the denial-response extension
            await send({"type": "websocket.http.response.start", "status": 401, "headers": UNAUTHORIZED_HEADERS})
            await send({"type": "websocket.http.response.body", "body": UNAUTHORIZED_BODY})
        else:  # closing before accepting refuses the handshake (a 403)
            await send({"type": "websocket.close", "code": 1008})
