"""Thin handlers over the control plane's adapter keeper (``controlplane/adapters``).

``GET sage_nb/api/adapters``: every adapter with its engine. ``POST`` with ``{"name", "path", "engine"?}``:
load one (201). ``DELETE sage_nb/api/adapters/NAME[?engine=E]``: unload it (from every engine holding
it unless ``engine`` says which).
"""

from __future__ import annotations

from jupyter_server.auth.decorator import authorized
from tornado import web

from ..handlers import ApiError, SageHandler

ADAPTER_NAME = r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63})"
FIELDS = {"name", "path", "engine"}


class AdaptersHandler(SageHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply(await self.call(self.cp.adapters))

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.json_body()
        unknown = sorted(set(body) - FIELDS)
        if unknown:
            raise ApiError(400, f"unknown field(s): {', '.join(unknown)}; send name, path and (optional) engine")
        for key in ("name", "path"):
            if not isinstance(body.get(key), str):
                raise ApiError(400, f"'{key}' is required (a string)")
        engine = body.get("engine")
        if engine is not None and not isinstance(engine, str):
            raise ApiError(400, "'engine' must be an engine's name or id")
        self.may("load adapters onto")  # on the box service: publishers only, for now (files are the caller's)
        owner = self.current_user.username if self.box is not None else None
        self.reply(await self.call(self.cp.load_adapter, body["name"], body["path"], engine, owner), 201)


class AdapterHandler(SageHandler):
    @web.authenticated
    @authorized
    async def delete(self, name: str) -> None:
        engine = self.get_query_argument("engine", None)
        self.may("unload adapters from")
        self.reply({"removed": await self.call(self.cp.unload_adapter, name, engine)})


ADAPTER_HANDLERS = [
    (r"/sage_nb/api/adapters/?", AdaptersHandler),
    (rf"/sage_nb/api/adapters/{ADAPTER_NAME}/?", AdapterHandler),
]
