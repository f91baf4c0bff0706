"""The OpenAI-compatible gateway: ``sage_nb/v1/...`` routed by kind to a ready engine.

A streaming proxy over one aiohttp session (:mod:`.upstream`: keep-alive to the engines, a C HTTP
parser). The caller authenticates with the Jupyter token; the gateway adds the engine's private key.
Responses pass through chunk by chunk as they come, and a client that goes away closes the upstream
connection at once, which is how the engine learns to stop working on it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import aiohttp
from jupyter_server.auth.decorator import allow_unauthenticated, authorized
from tornado import web
from tornado.ioloop import PeriodicCallback

from sage_nb.controlplane import ControlPlaneError
from sage_nb.controlplane.routing.router import KIND_LABEL, Router, upstream_model
from sage_nb.controlplane.sharing.sse import UsageTap, reply_usage, stream_options

from .box.adapters import refuse_unusable, unusable
from .box.link import BoxUnavailable, shared_models
from .handlers import ApiError, SageHandler
from .upstream import Upstream, never_connected

log = logging.getLogger("sage_nb.gateway")
# route -> (the engine kind it needs, None: any; the engine's own path)
ROUTES = {"v1/chat/completions": ("llm", "/v1/chat/completions"), "v1/completions": ("llm", "/v1/completions"),
          "v1/embeddings": ("embedding", "/v1/embeddings"),
          "tokenize": (None, "/tokenize"), "detokenize": (None, "/detokenize")}  # vLLM serves these at its root
TOKENIZER_ROUTES = ("tokenize", "detokenize")
WATCH_INTERVAL = 1.0  # seconds between checks that the engine of an in-flight request is still ready
PASS_HEADERS = ("Content-Type", "Cache-Control", "X-Request-Id", "Retry-After")
MAX_WAKES = 2  # a request woke an engine that went idle again before it was routed: once more, then 503


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
                future.cancel()  # closes the upstream connection


class GatewayHandler(SageHandler):
    """OpenAI clients send the token on every call and never return cookies: minting a signed
    login cookie for each request (Jupyter's default after token auth) is pure cost here."""

    def set_secure_cookie(self, *args, **kwargs) -> None:
        return None


class ModelsHandler(GatewayHandler):
    _track_activity = False

    @web.authenticated
    @authorized
    async def get(self) -> None:
        router = self.settings["sage_nb_router"]
        models = router.models()
        if self.settings.get("sage_nb_box") is not None:  # another user's adapters, unless shared with the caller
            hidden = unusable(router, self.current_user)
            models = [m for m in models if m["id"] not in hidden]
        link = self.settings.get("sage_nb_link")
        if link is not None:  # the box's shared models, where the user has no engine of their own by that name
            models += shared_models(await link.engines(), {m["id"] for m in models})
        self.reply({"object": "list", "data": models})


class ProxyHandler(GatewayHandler):
    """POST ``chat/completions``, ``completions`` and ``embeddings`` to an engine of the right kind."""

    def initialize(self, route: str, **kwargs) -> None:
        super().initialize(**kwargs)
        self.route = route
        self.kind, self.upstream = ROUTES[route]
        self.client_gone = False
        self.engine_lost = False
        self.went_idle = False  # the engine went to sleep before it answered: the request waits for its wake
        self.upstream_started = False
        self.exchange: asyncio.Future | None = None
        self.lost: list[str] = []  # why each replica tried was given up
        self.tap: UsageTap | None = None  # on the box service: the usage of a streamed reply
        self.ticket = None  # on the box service: (the request's place at its engine, the engine's name)
        self.engine_name = "-"  # the engine it went to last (for the server's own metrics)

    def on_finish(self) -> None:
        self.settings["sage_nb_stats"].observe(self.engine_name, self.route, self.get_status(),
                                               self.request.request_time())

    def on_connection_close(self) -> None:
        self.client_gone = True
        if self.exchange is not None:
            self.exchange.cancel()  # closes the upstream connection now, not at the next chunk

    @web.authenticated
    @authorized
    async def post(self) -> None:
        await self.proxy()

    async def proxy(self) -> None:
        """Route the request's body to an engine and pass its answer back."""
        self.update_api_activity()  # now, not only when it ends: a stream or a wake may take minutes
        body = self.json_body()
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "'model' must be a string")
        router: Router = self.settings["sage_nb_router"]
        salted = self._on_the_box(body, model)
        if salted is not None:
            body = salted
        tried: set[str] = set()
        woken = 0
        while True:
            try:
                engine = router.pick(self.kind, model, frozenset(tried))
            except ControlPlaneError as e:
                if tried:  # every replica it went to is unreachable or gone
                    raise ApiError(502, f"{'; '.join(self.lost)}; no other replica is ready: "
                                        f"{e.message}") from None
                idle = router.wakeable(self.kind, model) if woken < MAX_WAKES else None
                if idle is None:
                    # none of the user's own: a shared engine of the box service
                    if await self._to_box(model, body.get("stream") is True):
                        return
                    raise ApiError(e.status, e.message) from None
                await self.settings["sage_nb_waker"].wake(idle)  # held until it is ready (or 503/504)
                woken += 1
                router.refresh()
                continue
            payload = self.request.body
            upstream = upstream_model(engine, model) if engine.adapters else engine.served_model_name
            if body.get("model") != upstream or salted is not None:
                payload = json.dumps({**body, "model": upstream}).encode()
            if salted is not None and "sage_nb_share" in self.settings and not await self._admit(engine):
                return  # the client went away while it waited for its turn
            router.acquire(engine)
            self.engine_name = engine.name
            t0 = time.perf_counter()
            try:
                done = await self._forward(engine, payload, body.get("stream") is True)
            finally:
                router.release(engine)
                self._account(None)  # not answered in full: the slot goes back, no usage row
            if log.isEnabledFor(logging.DEBUG):
                log.debug("sage_nb gateway: %s -> engine %s (%s) %.1f ms", self.route, engine.name,
                          engine.base_url, (time.perf_counter() - t0) * 1000)
            if done:
                return
            if self.went_idle:  # put to sleep while the request waited for its answer: wake it
                self.went_idle = self.engine_lost = False
                continue
            tried.add(engine.id)  # connection failed before the first byte: try another replica

    async def _admit(self, engine) -> bool:
        """On the box service: wait for the caller's turn at ``engine`` (fair share); False when the client
        went away meanwhile (its place in the queue is gone at once)."""
        waiting = asyncio.ensure_future(self.settings["sage_nb_share"].admit(self.current_user, engine))
        self.exchange = waiting  # a client that hangs up cancels the wait
        try:
            self.ticket = (await waiting, engine.name)
            return True
        except asyncio.CancelledError:
            if self.client_gone:
                return False
            raise
        finally:
            self.exchange = None

    def _account(self, usage: dict | None) -> None:
        """On the box service: the request's slot at its engine goes to the next user, and its usage row is
        written (committed before the answer's end reaches the client: a killed service loses no row)."""
        if self.ticket is not None:
            (ticket, engine_name), self.ticket = self.ticket, None
            self.settings["sage_nb_share"].done(ticket, engine_name, usage)

    def _on_the_box(self, body: dict, model: str | None) -> dict | None:
        """On the box service: check the caller's limits (a 429 over one), give the request the caller's
        own ``cache_salt`` (whatever the caller sent), so no user can time another's prompts through the
        prefix cache, and ask a stream for its usage, to count it. Returns the body to send (``None``: not
        the box service, or a tokenizer route, which is neither limited nor counted)."""
        box = self.settings.get("sage_nb_box")
        user = self.current_user
        if box is None or user is None or self.route in TOKENIZER_ROUTES:
            return None
        self.settings["sage_nb_share"].check(user)
        refuse_unusable(self.settings["sage_nb_router"], model, user)
        body = {**body, "cache_salt": box.cache_salt(user.username)}
        if body.get("stream") is True:
            body, asked = stream_options(body)
            self.tap = UsageTap(pass_usage=asked)
        return body

    async def _to_box(self, model: str | None, stream: bool) -> bool:
        """Pass the request to the box service when one of its shared engines serves it (under this
        user's own credential); False when none does."""
        link = self.settings.get("sage_nb_link")
        if link is None:
            return False
        if not await link.serves(self.kind, model):
            if model and self.kind and await link.serves(None, model):  # a shared model of the other kind
                other = "embedding" if self.kind == "llm" else "llm"
                raise ApiError(400, f"model {model!r} is a shared {KIND_LABEL[other]} model (kind {other!r}); "
                                    f"this route needs an {KIND_LABEL[self.kind]} model")
            return False
        try:
            credential = link.credential()
        except BoxUnavailable as e:
            raise ApiError(502, str(e)) from None
        if stream:
            self.request.connection.stream.set_nodelay(True)
        self.engine_name = "(box service)"
        url = link.url + "sage_nb/" + self.route
        exchange = asyncio.ensure_future(self._exchange(self.settings["sage_nb_upstream"], url, credential,
                                                        self.request.body, stream,
                                                        self.settings["sage_nb_request_timeout"]))
        self.exchange = exchange
        try:
            await exchange
        except asyncio.CancelledError:
            if not self.client_gone:
                raise
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            if not self.upstream_started and not self.client_gone:
                raise ApiError(502, f"the box service did not answer for its shared engine: "
                                    f"{e or type(e).__name__}") from None
        finally:
            self.exchange = None
        if not self.client_gone and not self._finished:
            self.finish()
        return True

    async def _forward(self, engine, payload: bytes, stream: bool) -> bool:
        """Proxy one attempt; False when the engine could not be reached at all."""
        if stream:  # each chunk goes out at once, not held back by Nagle's algorithm
            self.request.connection.stream.set_nodelay(True)
        upstream: Upstream = self.settings["sage_nb_upstream"]
        timeout = self.settings["sage_nb_request_timeout"]
        exchange = asyncio.ensure_future(self._exchange(upstream, f"http://{engine.host}:{engine.port}{self.upstream}",
                                                        engine.api_key, payload, stream, timeout))
        self.exchange = exchange
        watchdog: Watchdog = self.settings["sage_nb_watchdog"]
        watchdog.track(engine.id, exchange, self)
        try:
            await exchange
            return True
        except asyncio.CancelledError:
            # the watchdog (engine no longer ready) or the client's disconnect cancelled it; either
            # way the upstream connection is closed and the engine stops working on the request
            if self.engine_lost:
                if not self.upstream_started:
                    if self.settings["sage_nb_router"].is_idle(engine.id):
                        self.went_idle = True
                        return False
                    raise ApiError(504, f"engine {engine.name!r} stopped being ready while answering; "
                                        "see %llm engines / its logs") from None
            elif not self.client_gone:
                raise  # the server itself is going down
        except TimeoutError as e:
            if not never_connected(e):
                if not self.upstream_started:
                    raise ApiError(504, f"engine {engine.name!r} did not answer within {timeout:.0f} s") from None
            else:
                return self._lost(f"engine {engine.name!r} did not take the connection")
        except (aiohttp.ClientError, OSError) as e:  # refused, reset, closed, broke off mid-body
            if self.upstream_started or self.client_gone:
                pass  # the engine broke off mid-stream: end what was sent
            elif never_connected(e):
                return self._lost(f"engine {engine.name!r} refused the connection")
            elif await upstream.gone(engine.host, engine.port):
                # a request that reached a live engine is not resent (it may be at work on it); one
                # that met an engine that has since died is safe to resend
                return self._lost(f"engine {engine.name!r} went away with the request unanswered ({e})")
            else:
                raise ApiError(502, f"engine {engine.name!r} broke off the request: {e}") from None
        finally:
            watchdog.untrack(engine.id, exchange)
            self.exchange = None
        if not self.client_gone and not self._finished:
            self.finish()
        return True

    def _lost(self, why: str) -> bool:
        self.lost.append(why)
        log.info("sage_nb gateway: %s; trying another replica", why)
        return False

    async def _exchange(self, upstream: Upstream, url: str, key: str, payload: bytes, stream: bool,
                        timeout: float) -> None:
        """One request to an engine (or the box service), its answer passed on as it comes."""
        async with upstream.post(url, payload, key, timeout) as response:
            try:
                if not stream:
                    body = await response.read()
                    if self.ticket is not None and response.status == 200:
                        self._account(reply_usage(body))
                    self._start_reply(response.status, response.headers)
                    self.write(body)
                    return
                self._start_reply(response.status, response.headers)
                tap = self.tap
                async for chunk in response.content.iter_any():
                    if tap is not None:
                        chunk = tap.feed(chunk)
                        if tap.usage is not None and self.ticket is not None:
                            self._account(tap.usage)
                        if not chunk:
                            continue
                    self.write(chunk)
                    self.flush()
                if tap is not None and (rest := tap.flush()):
                    self.write(rest)
            except BaseException:
                response.close()  # never back into the pool half-read: the engine sees the close
                raise

    def _start_reply(self, code: int, headers) -> None:
        if self.upstream_started:
            return
        self.upstream_started = True
        self.set_status(code)
        for name in PASS_HEADERS:
            if name in headers:
                self.set_header(name, headers[name])


class TokenizeHandler(ProxyHandler):
    """``tokenize`` and ``detokenize``: with the token like every route, unless the server opens them
    (``SageNBApp.open_tokenizer``) as vLLM does its own — its ``--api-key`` guards ``/v1`` only, and
    ``vllm bench serve`` sends no key when it aligns its prompts through them."""

    def _open(self) -> bool:  # never on the box service: every request there is someone's
        return self.settings["sage_nb_open_tokenizer"] and self.settings.get("sage_nb_box") is None

    def check_xsrf_cookie(self) -> None:
        if not self._open():  # an open route changes nothing: no cross-site request to guard against
            super().check_xsrf_cookie()

    @allow_unauthenticated
    async def post(self) -> None:
        if self._open():
            await self.proxy()
        else:
            await super().post()


GATEWAY_HANDLERS = [
    (r"/sage_nb/v1/models/?", ModelsHandler),
    *[(rf"/sage_nb/{route}/?", TokenizeHandler if route in TOKENIZER_ROUTES else ProxyHandler, {"route": route})
      for route in ROUTES],
]
