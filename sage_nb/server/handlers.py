"""Thin REST handlers over the control plane; every blocking call runs off the event loop."""

from __future__ import annotations

import asyncio
import functools
import json

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.extension.handler import ExtensionHandlerMixin
from tornado import web

from sage_nb.controlplane import ControlPlane, ControlPlaneError, LaunchRequest, is_routable, validation
from sage_nb.controlplane.adapters.uploads import mark_usable

from .box.link import BOX_HEADER, SERVICE_NAME, BoxUnavailable, message

AUTH_RESOURCE = "sage_nb"
NO_TOKEN = ("the Jupyter token is missing or wrong: send the server's token (Authorization: token <token>, "
            "or as the API key of an OpenAI client)")
# the "type" of OpenAI's error bodies, by status
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 409: "conflict_error", 502: "upstream_error", 503: "service_unavailable",
               429: "requests", 504: "timeout_error"}


class ApiError(web.HTTPError):
    """An HTTP error whose ``message`` goes to the client verbatim as ``{"message": ...}``; ``headers``
    (``Retry-After``) and OpenAI's error ``type`` and ``code`` where they say more than the status."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None,
                 error_type: str | None = None, code: str | int | None = None) -> None:
        super().__init__(status, message)
        self.message = message
        self.headers = headers or {}
        self.error_type, self.code = error_type, code


class SageHandler(ExtensionHandlerMixin, APIHandler):
    """Base: Jupyter auth, JSON errors, control-plane calls off the loop."""

    auth_resource = AUTH_RESOURCE

    @property
    def cp(self) -> ControlPlane:
        return self.settings["sage_nb_control_plane"]

    async def call(self, fn, *args, **kwargs):
        """Run a control-plane call in a worker thread; its errors become JSON replies."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, functools.partial(fn, *args, **kwargs))
        except ControlPlaneError as e:
            raise ApiError(e.status if e.status < 500 else 500, e.message) from None

    def set_default_headers(self) -> None:
        super().set_default_headers()
        if self.settings.get("sage_nb_box") is not None:  # a user's server tells a box service by it
            self.set_header(BOX_HEADER, SERVICE_NAME)

    @property
    def box(self):
        """The box service's policy when this server is the box service, else ``None``."""
        return self.settings.get("sage_nb_box")

    @property
    def link(self):
        """This user's server's link to the box service (``box_service`` setting), else ``None``."""
        return self.settings.get("sage_nb_link")

    def may(self, what: str) -> None:
        """On the box service: a 403 with words unless the caller may ``what`` shared engines."""
        if self.box is not None:
            try:
                self.box.require_publisher(self.current_user, what)
            except ControlPlaneError as e:
                raise ApiError(e.status, e.message) from None

    async def shared(self, engine_id: str) -> bool:
        """Pass this request on to the box service when ``engine_id`` is none of this user's engines but
        one of the box's shared engines; True when it was (and the reply is written)."""
        if self.link is None or not await self.is_shared(engine_id, raise_missing=True):
            return False
        path = self.request.path[self.request.path.index("sage_nb/api/"):]
        query = f"?{self.request.query}" if self.request.query else ""
        body = self.json_body() if self.request.method in ("POST", "PATCH") else None
        await self.forward(self.request.method, path + query, body)
        return True

    async def is_shared(self, engine_id: str, raise_missing: bool = False) -> bool:
        """Whether ``engine_id`` is none of this user's engines but one of the box's shared engines (with a
        link); ``raise_missing``: the 404 of an engine that is neither."""
        try:
            await self.call(self.cp.registry.find, engine_id)
            return False
        except ApiError as e:
            if e.status_code != 404:
                raise
            if await self.link.find(engine_id) is not None:
                return True
            if raise_missing:
                raise
            return False

    async def forward(self, method: str, path: str, body=None, timeout: float | None = None) -> None:
        """One REST call to the box service under this user's credential; its reply becomes ours."""
        try:
            status, reply = await self.link.request(method, path, body, timeout)
        except BoxUnavailable as e:
            raise ApiError(502, str(e)) from None
        self.link.forget()
        if status >= 400:
            raise ApiError(status, f"the box service: {message(reply)}")
        self.reply(reply, status)

    def write_error(self, status_code: int, **kwargs) -> None:
        """``{"message": ..., "error": {"message", "type", "code"}}``: sage_nb's own shape, and OpenAI's,
        whose clients show ``error.message`` (a refused token says how to send one)."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        denied = getattr(self, "_sage_nb_denied", None)  # the box service refused the caller's credential
        error_type = code = None
        if isinstance(exc, ApiError):
            message = exc.message
            for name, value in exc.headers.items():
                self.set_header(name, value)
            error_type, code = exc.error_type, exc.code
        elif status_code == 403 and denied is not None:
            status_code, message = denied.status, denied.message
            self.set_status(status_code)
        elif status_code == 403 and not self._authenticated():
            message = NO_TOKEN  # no valid token: Jupyter's XSRF check or @web.authenticated refused it
        else:
            message = getattr(exc, "log_message", None) or self._reason
        self.set_header("Content-Type", "application/json")
        error = {"message": message, "type": error_type or ERROR_TYPES.get(status_code, "server_error"),
                 "code": code or status_code}
        self.finish(json.dumps({"message": message, "error": error}))

    def _authenticated(self) -> bool:
        try:
            return bool(self.current_user)
        except Exception:  # an error page must never fail on auth
            return False

    def json_body(self) -> dict:
        try:
            body = json.loads(self.request.body or b"{}")
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def reply(self, model, status: int = 200) -> None:
        self.set_status(status)
        self.finish(json.dumps(model))


class ReadOnlyPolled(SageHandler):
    """Dashboards poll its GETs: they must not keep an idle server alive; its changes (start, stop,
    sleep...) are the user's activity."""

    @property
    def _track_activity(self) -> bool:
        return self.request.method != "GET"


class EnginesHandler(ReadOnlyPolled):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        engines = await self.call(self.cp.engines)
        if self.box is not None:  # every user sees every adapter; which ones they may use is marked
            engines = mark_usable(engines, self.current_user.username, self.current_user.groups)
        if self.link is not None:
            engines += await self.link.engines()
        self.reply(engines)

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.json_body()
        if "publisher" in body:
            raise ApiError(400, "publisher is set by the box service (the user who publishes), not by a caller")
        if self.box is not None:  # every engine of the box service is shared, published by its caller
            self.may("publish")
            body = {**body, "shared": True, "publisher": self.current_user.username}
        try:
            req = LaunchRequest.from_body(body)
        except ControlPlaneError as e:
            raise ApiError(e.status, e.message) from None
        except TypeError as e:  # wrong argument types that the dataclass itself rejects
            raise ApiError(400, str(e)) from None
        if req.shared and self.box is None:
            if self.link is None:
                raise ApiError(400, "shared engines are published by the box service, and this server has none "
                                    "(the box_service setting; see docs/shared-server.md)")
            await self.forward("POST", "sage_nb/api/engines", {k: v for k, v in body.items() if k != "shared"})
            return
        try:
            started = await self.call(self.cp.start, req, wait=False)
        except ApiError as e:
            self.settings["sage_nb_stats"].refused(e.status_code)
            raise
        self.reply(started, 202)


class EngineHandler(ReadOnlyPolled):
    @web.authenticated
    @authorized
    async def get(self, engine_id: str) -> None:
        if not await self.shared(engine_id):
            self.reply(await self.call(self.cp.engine, engine_id))

    @web.authenticated
    @authorized
    async def delete(self, engine_id: str) -> None:
        self.may("stop")
        if not await self.shared(engine_id):
            self.reply(await self.call(self.cp.stop_engine, engine_id))

    @web.authenticated
    @authorized
    async def patch(self, engine_id: str) -> None:
        """Change what may change on a running engine: ``{"keep_alive": "30m"}`` (-1 or null: forever)."""
        body = self.json_body()
        unknown = sorted(set(body) - {"keep_alive"})
        if unknown or not body:
            raise ApiError(400, f"unknown field(s): {', '.join(unknown)}" if unknown
                           else "nothing to change: send {\"keep_alive\": ...}")
        self.may("change the keep-alive of")
        if await self.shared(engine_id):
            return
        self.reply(await self.call(self.cp.set_keep_alive, engine_id, body["keep_alive"]))


class SleepHandler(SageHandler):
    """``POST .../sleep`` ``{"mode": "auto"|"sleep"|"unload"}``: give a ready engine's memory back now."""

    @web.authenticated
    @authorized
    async def post(self, engine_id: str) -> None:
        body = self.json_body()
        unknown = sorted(set(body) - {"mode"})
        if unknown:
            raise ApiError(400, f"unknown field(s): {', '.join(unknown)}")
        self.may("put to sleep")
        if await self.shared(engine_id):
            return
        self.reply(await self.call(self.cp.sleep_engine, engine_id, body.get("mode", "auto")))


class WakeHandler(SageHandler):
    """``POST .../wake``: wake a sleeping or unloaded engine; 202 at once, follow its state."""

    @web.authenticated
    @authorized
    async def post(self, engine_id: str) -> None:
        if not await self.shared(engine_id):
            self.reply(await self.call(self.cp.wake_engine, engine_id, wait=False), 202)


class LogsHandler(SageHandler):
    _track_activity = False

    @web.authenticated
    @authorized
    async def get(self, engine_id: str) -> None:
        raw = self.get_query_argument("lines", "100")
        try:
            lines = int(raw)
        except ValueError:
            raise ApiError(400, f"lines must be an integer, got {raw!r}") from None
        self.may("read the logs of")
        if await self.shared(engine_id):
            return
        text = await self.call(self.cp.logs, engine_id, lines)
        self.reply({"id": engine_id, "lines": lines, "log": text})


class PruneHandler(SageHandler):
    """``POST .../prune``: remove every stopped and failed record; with ``{"kernel_id": ..., "notebook":
    ...}`` (either or both), only those that kernel or that notebook started."""

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.json_body()
        unknown = sorted(set(body) - {"kernel_id", "notebook"})
        if unknown:
            raise ApiError(400, f"unknown field(s): {', '.join(unknown)}; prune takes kernel_id and notebook")
        self.may("prune")
        self.reply({"removed": await self.call(self.cp.prune, body.get("kernel_id"), body.get("notebook"))})


class BackendsHandler(SageHandler):
    _track_activity = False

    @web.authenticated
    @authorized
    async def get(self) -> None:
        backends = await self.call(self.cp.backends)
        inflight = self.settings["sage_nb_router"].inflight
        for backend in backends["llm_backends"] + backends["embedding_backends"]:
            backend["inflight"] = inflight.get(backend["id"], 0)  # requests the gateway has open now
        if self.link is not None:
            for engine in await self.link.engines():
                if is_routable(engine):
                    backends[f"{engine['kind']}_backends"].append(engine)
            backends["box"] = await self.link.status()
        self.reply(backends)


class GpusHandler(SageHandler):
    _track_activity = False

    @web.authenticated
    @authorized
    async def get(self) -> None:
        report = await self.call(self.cp.gpu_report)
        if self.link is not None:  # other users' bookings that are the box's shared engines
            shared = {e["id"]: e.get("publisher") for e in await self.link.engines()}
            for gpu in report.get("devices", []):
                for part in gpu.get("parts", {}).get("others", []):
                    if part["engine_id"] in shared:
                        part.update(shared=True, publisher=shared[part["engine_id"]])
        self.reply(report)


class SettingsHandler(SageHandler):
    """The control plane's effective settings (``%llm doctor`` checks the server's, not its own)."""

    _track_activity = False

    @web.authenticated
    @authorized
    def get(self) -> None:
        self.reply(self.cp.settings.to_model())


class BoxHandler(SageHandler):
    """``GET sage_nb/api/box``: on the box service, who the caller is there, whether they may publish and
    what each user has used; on a user's server, its link to the box service (or ``{"state": "off"}``)."""

    _track_activity = False

    @web.authenticated
    @authorized
    async def get(self) -> None:
        if self.box is not None:
            caller = self.current_user
            self.reply({"service": SERVICE_NAME, "user": caller.username, "via": caller.via,
                        "may_publish": self.box.may_publish(caller), "publishers": self.box.publishers,
                        "admin": self.box.may_administer(caller),
                        "usage": usage_summary(self.settings["sage_nb_share"].usage.rows(days=1))})
        elif self.link is not None:
            self.reply(await self.link.status())
        else:
            self.reply({"state": "off", "reason": "no box service is configured (the box_service setting)"})


def usage_summary(rows: list[dict]) -> dict:
    """Today's requests by user and engine: ``{user: {"requests": n, "models": {engine: n}}}``."""
    out: dict[str, dict] = {}
    for row in rows:
        entry = out.setdefault(row["user"], {"requests": 0, "models": {}})
        entry["requests"] += row["requests"]
        entry["models"][row["engine"]] = entry["models"].get(row["engine"], 0) + row["requests"]
    return out


class NoRouteHandler(SageHandler):
    """Any other path under ``sage_nb/``: a JSON 404, like every other sage_nb error."""

    @web.authenticated
    @authorized
    def get(self) -> None:
        raise ApiError(404, f"no sage_nb route {self.request.path!r}; the REST API is in docs/rest.md")

    post = put = patch = delete = get


ENGINE_ID = rf"(?P<engine_id>{validation.ENGINE_NAME})"
REST_HANDLERS = [
    (r"/sage_nb/api/engines/?", EnginesHandler),
    (r"/sage_nb/api/engines/prune/?", PruneHandler),
    (rf"/sage_nb/api/engines/{ENGINE_ID}/logs/?", LogsHandler),
    (rf"/sage_nb/api/engines/{ENGINE_ID}/sleep/?", SleepHandler),
    (rf"/sage_nb/api/engines/{ENGINE_ID}/wake/?", WakeHandler),
    (rf"/sage_nb/api/engines/{ENGINE_ID}/?", EngineHandler),
    (r"/sage_nb/api/backends/?", BackendsHandler),
    (r"/sage_nb/api/gpus/?", GpusHandler),
    (r"/sage_nb/api/settings/?", SettingsHandler),
    (r"/sage_nb/api/box/?", BoxHandler),
]
