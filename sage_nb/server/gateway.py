"""The OpenAI-compatible gateway: ``sage_nb/v1/...`` routed by kind to a ready engine.

A streaming proxy on tornado's own HTTP client (curl, with keep-alive to the
engines, when pycurl is installed). The caller authenticates with the Jupyter
token; the gateway adds the engine's private key. Responses pass through chunk
by chunk, and a client that goes away cancels the upstream request.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from jupyter_server.auth.decorator import authorized
from tornado import httpclient, iostream, web
from tornado.ioloop import PeriodicCallback
from tornado.simple_httpclient import HTTPTimeoutError, SimpleAsyncHTTPClient

from sage_nb.controlplane import ControlPlaneError
from sage_nb.controlplane.router import Router

from .handlers import ApiError, SageHandler

log = logging.getLogger("sage_nb.gateway")
# route -> (the engine kind it needs, None: any; the engine's own path)
ROUTES = {"v1/chat/completions": ("llm", "/v1/chat/completions"), "v1/completions": ("llm", "/v1/completions"),
          "v1/embeddings": ("embedding", "/v1/embeddings"),
          "tokenize": (None, "/tokenize"), "detokenize": (None, "/detokenize")}  # vLLM serves these at its root
WATCH_INTERVAL = 1.0  # seconds between checks that the engine of an in-flight request is still ready
PASS_HEADERS = ("Content-Type", "Cache-Control", "X-Request-Id")


def make_http_clients() -> dict[str, httpclient.AsyncHTTPClient]:
    # Jupyter's loggers pass DEBUG records to their handlers (which filter them); with DEBUG
    # enabled tornado's curl client turns on curl's verbose trace for every request.
    logging.getLogger("tornado.curl_httpclient").setLevel(logging.INFO)
    return _clients()


def _clients() -> dict[str, httpclient.AsyncHTTPClient]:
    """The gateway's own clients: curl (keep-alive to the engines) for plain requests when pycurl
    is there; tornado's simple client for streams, since raising in its streaming callback closes
    the upstream connection — that is how a client's disconnect cancels the engine's work."""
    try:
        from tornado.curl_httpclient import CurlAsyncHTTPClient as plain
    except ImportError:
        plain = SimpleAsyncHTTPClient
    return {"sage_nb_http_client": plain(force_instance=True, max_clients=256),
            "sage_nb_stream_client": SimpleAsyncHTTPClient(force_instance=True, max_clients=256)}


class Watchdog:
    """In-flight upstream requests by engine; every ``WATCH_INTERVAL`` s, those whose engine is no
    longer ready are cancelled (one periodic pass for all requests, nothing per request)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.pending: dict[str, dict] = {}
        self.timer: PeriodicCallback | None = None

    def track(self, engine_id: str, future, handler) -> None:
        if self.timer is None:  # started on first use, on the server's running loop
            self.timer = PeriodicCallback(self.check, WATCH_INTERVAL * 1000)
            self.timer.start()
        self.pending.setdefault(engine_id, {})[future] = handler

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.stop()
            self.timer = None

    def untrack(self, engine_id: str, future) -> None:
        futures = self.pending.get(engine_id)
        if futures is not None:
            futures.pop(future, None)
            if not futures:
                del self.pending[engine_id]

    def check(self) -> None:
        for engine_id in [e for e in self.pending if not self.router.is_ready(e)]:
            for future, handler in list(self.pending.get(engine_id, {}).items()):
                handler.engine_lost = True
                handler.client_gone = True  # a streaming upstream is aborted at its next chunk
                future.cancel()


class ClientGone(Exception):
    """Raised inside the streaming callback to abort the upstream request."""


class GatewayHandler(SageHandler):
    """OpenAI clients send the token on every call and never return cookies: minting a signed
    login cookie for each request (Jupyter's default after token auth) is pure cost here."""

    def set_secure_cookie(self, *args, **kwargs) -> None:
        return None


class ModelsHandler(GatewayHandler):
    _track_activity = False

    @web.authenticated
    @authorized
    def get(self) -> None:
        self.reply({"object": "list", "data": self.settings["sage_nb_router"].models()})


class ProxyHandler(GatewayHandler):
    """POST ``chat/completions``, ``completions`` and ``embeddings`` to an engine of the right kind."""

    def initialize(self, route: str, **kwargs) -> None:
        super().initialize(**kwargs)
        self.route = route
        self.kind, self.upstream = ROUTES[route]
        self.client_gone = False
        self.engine_lost = False
        self.upstream_started = False
        self.lost: list[str] = []  # why each replica tried was given up

    def on_connection_close(self) -> None:
        self.client_gone = True

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.json_body()
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "'model' must be a string")
        router: Router = self.settings["sage_nb_router"]
        tried: set[str] = set()
        while True:
            try:
                engine = router.pick(self.kind, model, frozenset(tried))
            except ControlPlaneError as e:
                if tried:  # every replica it went to is unreachable or gone
                    raise ApiError(502, f"{'; '.join(self.lost)}; no other replica is ready: "
                                        f"{e.message}") from None
                raise ApiError(e.status, e.message) from None
            payload = self.request.body
            if body.get("model") != engine.served_model_name:
                payload = json.dumps({**body, "model": engine.served_model_name}).encode()
            router.acquire(engine)
            t0 = time.perf_counter()
            try:
                done = await self._forward(engine, payload, body.get("stream") is True)
            finally:
                router.release(engine)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("sage_nb gateway: %s -> engine %s (%s) %.1f ms", self.route, engine.name,
                          engine.base_url, (time.perf_counter() - t0) * 1000)
            if done:
                return
            tried.add(engine.id)  # connection failed before the first byte: try another replica

    async def _forward(self, engine, payload: bytes, stream: bool) -> bool:
        """Proxy one attempt; False when the engine could not be reached at all."""
        if stream:  # each chunk goes out at once, not held back by Nagle's algorithm
            self.request.connection.stream.set_nodelay(True)
        head: dict = {"code": None, "headers": {}, "complete": False}
        held: list[bytes] = []

        def on_header(line: str) -> None:
            line = line.strip()
            if line.startswith("HTTP/"):
                head.update(code=int(line.split()[1]), headers={}, complete=False)
            elif not line:
                head["complete"] = head["code"] not in (None, 100)
            elif ":" in line:
                name, value = line.split(":", 1)
                head["headers"][name.strip().title()] = value.strip()

        def on_chunk(chunk: bytes) -> None:
            if self.client_gone:
                raise ClientGone()  # aborts the upstream transfer
            if not head["complete"]:
                held.append(chunk)  # curl may deliver body pieces before the last header line
                return
            self._start_reply(head["code"], head["headers"])
            for piece in held:
                self.write(piece)
            held.clear()
            self.write(chunk)
            self.flush()

        request = httpclient.HTTPRequest(
            f"http://{engine.host}:{engine.port}{self.upstream}", method="POST", body=payload,
            headers={"Authorization": f"Bearer {engine.api_key}", "Content-Type": "application/json"},
            header_callback=on_header if stream else None, streaming_callback=on_chunk if stream else None,
            decompress_response=False, connect_timeout=5.0,
            request_timeout=self.settings["sage_nb_request_timeout"])
        try:
            client = self.settings["sage_nb_stream_client" if stream else "sage_nb_http_client"]
            response = await self._watch(engine, client.fetch(request, raise_error=False))
        except ClientGone:
            return True
        except httpclient.HTTPClientError as e:  # 599: could not connect, timed out, broke off
            response = e.response if e.code != 599 and e.response else httpclient.HTTPResponse(
                request, 599, error=e)
        except (OSError, iostream.StreamClosedError) as e:
            response = httpclient.HTTPResponse(request, 599, error=e)
        if self.client_gone:
            return True
        if response.code == 599:
            if self.upstream_started:  # the engine broke off mid-stream: end what we sent
                self.finish()
                return True
            err = response.error
            timed_out = isinstance(err, HTTPTimeoutError) or getattr(err, "errno", None) == 28
            if timed_out and "onnect" not in str(err):
                raise ApiError(504, f"engine {engine.name!r} did not answer within "
                                         f"{request.request_timeout:.0f} s")
            # A request that reached a live engine is not resent (it may be at work on it); one
            # that met a pooled connection of an engine that has since died is safe to resend.
            if _never_connected(err):
                self.lost.append(f"engine {engine.name!r} refused the connection")
            elif await _gone(self.settings["sage_nb_stream_client"], engine):
                self.lost.append(f"engine {engine.name!r} went away with the request unanswered ({err})")
            else:
                raise ApiError(502, f"engine {engine.name!r} broke off the request: {err}")
            log.info("sage_nb gateway: %s; trying another replica", self.lost[-1])
            return False
        if stream:
            self._start_reply(head["code"] or response.code, head["headers"])
            for piece in held:
                self.write(piece)
        else:
            self._start_reply(response.code, response.headers)
            self.write(response.body)
        self.finish()
        return True

    async def _watch(self, engine, fetch):
        """Await the upstream answer; :class:`Watchdog` cancels it if the engine stops being ready
        (failed, stopped, unhealthy) meanwhile, and the caller gets a 504 — never a hang."""
        watchdog: Watchdog = self.settings["sage_nb_watchdog"]
        watchdog.track(engine.id, fetch, self)
        try:
            return await fetch
        except asyncio.CancelledError:
            if not self.engine_lost:
                raise
            if self.upstream_started:
                self.finish()
                raise ClientGone() from None
            raise ApiError(504, f"engine {engine.name!r} stopped being ready while answering; "
                                "see %llm engines / its logs") from None
        finally:
            watchdog.untrack(engine.id, fetch)

    def _start_reply(self, code: int, headers) -> None:
        if self.upstream_started:
            return
        self.upstream_started = True
        self.set_status(code)
        for name in PASS_HEADERS:
            if name in headers:
                self.set_header(name, headers[name])


def _never_connected(error) -> bool:
    """True when the engine refused or never took the connection (safe to try another replica)."""
    if isinstance(error, ConnectionRefusedError):
        return True
    if getattr(error, "errno", None) in (7,):  # curl: CURLE_COULDNT_CONNECT
        return True
    text = str(error)
    return "onnection refused" in text or "Could not connect" in text or "Failed to connect" in text


async def _gone(client: httpclient.AsyncHTTPClient, engine) -> bool:
    """True when the engine's ``/health`` cannot be reached at all: it died or was stopped. A port
    still listening is not enough (a dying process's listener takes connections for a moment);
    one that answers, even with an error, or is merely slow, is not gone."""
    request = httpclient.HTTPRequest(f"http://{engine.host}:{engine.port}/health", connect_timeout=1.0,
                                     request_timeout=1.0)
    try:  # raise_error=False still raises for 599s: refused, reset, timed out
        await client.fetch(request, raise_error=False)
    except HTTPTimeoutError:
        return False
    except (OSError, iostream.StreamClosedError, httpclient.HTTPClientError):
        return True
    return False


GATEWAY_HANDLERS = [
    (r"/sage_nb/v1/models/?", ModelsHandler),
    *[(rf"/sage_nb/{route}/?", ProxyHandler, {"route": route}) for route in ROUTES],
]
