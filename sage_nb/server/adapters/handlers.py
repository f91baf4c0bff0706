"""Thin handlers over the control plane's adapter keeper (``controlplane/adapters``).

``GET sage_nb/api/adapters``: every adapter with its engine. ``POST`` with ``{"name", "path", "engine"?,
"share"?}``: load one (201). ``DELETE sage_nb/api/adapters/NAME[?engine=E]``: unload it (from every engine
holding it unless ``engine`` says which).

On a user's server linked to the box service, an adapter for a shared engine is read from the user's
own files here and sent to the service (``files``: each file base64), which cannot read the user's home;
the service keeps it under the user's name, usable by them and whom ``share`` names. On the service,
a user unloads their own adapters; publishers any, and only they load from a path the service reads.
"""

from __future__ import annotations

from jupyter_server.auth.decorator import authorized
from tornado import web

from sage_nb.controlplane import ControlPlaneError
from sage_nb.controlplane.adapters.uploads import may_use, pack, share_list, unpack
from sage_nb.controlplane.state import ENDED

from ..box.link import BoxUnavailable
from ..handlers import ApiError, SageHandler

ADAPTER_NAME = r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]{0,63})"
FIELDS = {"name", "path", "engine", "share", "files"}
UPLOAD_TIMEOUT = 600.0  # seconds for the box service to store and load a large adapter


class AdaptersHandler(SageHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        adapters = await self.call(self.cp.adapters)
        if self.box is not None:
            caller = self.current_user
            adapters = [{**a, "usable": may_use(a, caller.username, caller.groups)} for a in adapters]
        elif self.link is not None:
            adapters += await self._shared()
        self.reply(adapters)

    async def _shared(self) -> list[dict]:
        """The box service's adapters, as this user may see them (none while it is unavailable)."""
        try:
            status, reply = await self.link.request("GET", "sage_nb/api/adapters")
        except BoxUnavailable:
            return []
        if status != 200 or not isinstance(reply, list):
            return []
        return [{**a, "shared": True} for a in reply if isinstance(a, dict)]

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = self.json_body()
        unknown = sorted(set(body) - FIELDS)
        if unknown:
            raise ApiError(400, f"unknown field(s): {', '.join(unknown)}; send name, path and (optional) engine "
                                "and share")
        name, engine = body.get("name"), body.get("engine")
        if not isinstance(name, str):
            raise ApiError(400, "'name' is required (a string)")
        if engine is not None and not isinstance(engine, str):
            raise ApiError(400, "'engine' must be an engine's name or id")
        try:
            share = share_list(body.get("share")) if "share" in body else None
        except ControlPlaneError as e:
            raise ApiError(e.status, e.message) from None
        if self.box is not None:
            return await self._load_on_box(body, name, engine, share)
        if "files" in body:
            raise ApiError(400, "'files' is what a user's server sends the box service; here send 'path'")
        if not isinstance(body.get("path"), str):
            raise ApiError(400, "'path' is required (a string)")
        if self.link is not None and await self._for_box(engine):
            files = await self.call(pack, body["path"])  # read here: the service cannot read this user's files
            upload = {"name": name, "files": files, **({"engine": engine} if engine else {}),
                      **({"share": share} if share is not None else {})}
            return await self.forward("POST", "sage_nb/api/adapters", upload, UPLOAD_TIMEOUT)
        if share:
            raise ApiError(400, "'share' is for adapters on the box service's shared engines: this server's own "
                                "engines serve only you")
        self.reply(await self.call(self.cp.load_adapter, name, body["path"], engine), 201)

    async def _for_box(self, engine: str | None) -> bool:
        """Whether the load is for a shared engine: ``engine`` is none of this user's but one of the box's;
        or no engine is named and this user has no engine of their own with ``--lora``."""
        if engine is not None:
            return await self.is_shared(engine)
        mine = await self.call(self.cp.engines)
        if any(e.get("lora") and e["state"] not in ENDED for e in mine):
            return False
        return any(e.get("lora") for e in await self.link.engines())

    async def _load_on_box(self, body: dict, name: str, engine: str | None, share: list[str] | None) -> None:
        caller = self.current_user
        files, path = body.get("files"), body.get("path")
        if (files is None) == (path is None):
            raise ApiError(400, "send either 'files' (the adapter's files by name, base64: what a user's server "
                                "sends) or 'path' (a folder the service reads: publishers only)")
        if path is not None:
            if not isinstance(path, str):
                raise ApiError(400, "'path' must be a string")
            self.may("load adapters from the service's own folders onto")
            model = await self.call(self.cp.load_adapter, name, path, engine, caller.username,
                                    share if share is not None else ["*"])
            return self.reply(model, 201)
        if not self.box.user_adapters and not self.box.may_publish(caller):
            raise ApiError(403, "this box service does not take users' own adapters (it was started with "
                                "--no-user-adapters): ask a publisher to load it")
        uploads = self.settings["sage_nb_uploads"]
        stored = await self.call(lambda: uploads.save(caller.username, name, unpack(files)))
        try:
            model = await self.call(self.cp.load_adapter, name, stored, engine, caller.username, share or [])
        except ApiError:
            await self.call(drop, uploads, self.cp, stored)  # refused: nothing is kept
            raise
        self.reply(model, 201)


def drop(uploads, cp, path: str) -> None:
    """Delete an uploaded adapter's files once no live engine's record names them."""
    if uploads.owns(path) and all(a["path"] != path for a in cp.adapters()):
        uploads.remove(path)


class AdapterHandler(SageHandler):
    @web.authenticated
    @authorized
    async def delete(self, name: str) -> None:
        engine = self.get_query_argument("engine", None)
        if self.box is not None:
            caller = self.current_user
            owner = None if self.box.may_publish(caller) else caller.username  # users: their own only
            removed = await self.call(self.cp.unload_adapter, name, engine, owner)
            for adapter in removed:
                await self.call(drop, self.settings["sage_nb_uploads"], self.cp, adapter["path"])
            return self.reply({"removed": removed})
        if self.link is not None and not any(a["name"] == name for a in await self.call(self.cp.adapters)):
            path = self.request.path[self.request.path.index("sage_nb/api/"):]
            query = f"?{self.request.query}" if self.request.query else ""
            return await self.forward("DELETE", path + query)
        self.reply({"removed": await self.call(self.cp.unload_adapter, name, engine)})


ADAPTER_HANDLERS = [
    (r"/sage_nb/api/adapters/?", AdaptersHandler),
    (rf"/sage_nb/api/adapters/{ADAPTER_NAME}/?", AdapterHandler),
]
