"""A user's server's link to the box service: its shared engines listed beside the user's own, and
requests for them (REST and gateway) passed on under the user's own credential.

The credential is the user's: the key an admin issued (``box_key_file``, or ``/etc/sage_nb/keys/<user>``
when it exists), else the server's ``JUPYTERHUB_API_TOKEN`` (JupyterHub gives it the service's scope
through ``c.Spawner.server_token_scopes``). The list of shared engines is cached ``TTL`` seconds; a
service that is down or answers something else leaves private engines untouched and says why in
:meth:`BoxLink.status`.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import time
from pathlib import Path

import aiohttp

from sage_nb.controlplane.errors import BadRequest
from sage_nb.controlplane.state import is_routable, is_wakeable
from sage_nb.controlplane.store.keys import DEFAULT_KEY_DIR, read_key_file

TTL = 2.0  # seconds a list of shared engines is reused
RETRY = 0.25  # a lookup that the cached list misses fetches it again if it is older than this
TIMEOUT = 10.0
BOX_ROUTE = "sage_nb/api/box"
SERVICE_NAME = "sage_nb box service"
BOX_HEADER = "X-Sage-NB-Box"  # on every reply of the box service, errors too


class BoxUnavailable(Exception):
    """The box service cannot be used now; the message says why."""


class BoxLink:
    """The box service at ``url`` as this user's server sees it."""

    def __init__(self, url: str, key_file: Path | None = None) -> None:
        self.url = url
        self.key_file = key_file
        self._session: aiohttp.ClientSession | None = None
        self._engines: list[dict] = []
        self._fetched = 0.0
        self._problem = ""
        self._who: dict = {}
        self._from_box = False  # whether the last reply came from a box service
        self._key: tuple = (None, "")  # (the key file's stamp, its key)
        self._lock = asyncio.Lock()

    # ---------------------------------------------------------------- credential
    def credential(self) -> str:
        """The user's own credential for the service (:class:`BoxUnavailable` with the reason)."""
        key_file = self.key_file or DEFAULT_KEY_DIR / getpass.getuser()
        try:
            st = key_file.stat()
            stamp = (str(key_file), st.st_mtime_ns, st.st_ino, st.st_size)
        except OSError:
            stamp = None
        if stamp is not None and stamp == self._key[0]:  # read again only when the file changed
            return self._key[1]
        if self.key_file is not None or stamp is not None:
            try:
                key = read_key_file(key_file)
            except BadRequest as e:
                raise BoxUnavailable(e.message) from None
            self._key = (stamp, key)
            return key
        token = os.environ.get("JUPYTERHUB_API_TOKEN")
        if token:
            return token
        raise BoxUnavailable(f"no credential for the box service: no key file at {key_file} and no "
                             "JUPYTERHUB_API_TOKEN; an admin issues a key with python -m sage_nb.admin add-key USER")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential()}", "Content-Type": "application/json"}

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    # ---------------------------------------------------------------- REST
    async def request(self, method: str, path: str, body=None, timeout: float | None = None) -> tuple[int, object]:
        """One REST call to the service: (status, JSON reply); ``timeout``: seconds, other than ``TIMEOUT``
        (an adapter's upload). :class:`BoxUnavailable` when it cannot be reached or does not answer as a
        sage_nb box service."""
        headers = self.headers()
        data = None if body is None else json.dumps(body).encode()
        extra = {} if timeout is None else {"timeout": aiohttp.ClientTimeout(total=timeout)}
        try:
            async with self.session().request(method, self.url + path, data=data, headers=headers,
                                              **extra) as resp:
                self._from_box = resp.headers.get(BOX_HEADER) == SERVICE_NAME
                text = await resp.text()
                try:
                    reply = json.loads(text) if text else None
                except ValueError:
                    raise BoxUnavailable(f"{self.url} answers, but not as a {SERVICE_NAME} (HTTP {resp.status}, "
                                         f"{resp.content_type}); check box_service") from None
                return resp.status, reply
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise BoxUnavailable(f"cannot reach the box service at {self.url}: {e or type(e).__name__}") from None

    async def identify(self) -> dict:
        """Who the service takes this user for (and whether it is a box service at all)."""
        status, reply = await self.request("GET", BOX_ROUTE)
        if not self._from_box:
            raise BoxUnavailable(f"{self.url} answers, but not as a {SERVICE_NAME} (HTTP {status}); check "
                                 "box_service")
        if status in (401, 403):
            raise BoxUnavailable(f"the box service refused this user's credential ({status}): {message(reply)}")
        if status != 200 or not isinstance(reply, dict) or reply.get("service") != SERVICE_NAME:
            raise BoxUnavailable(f"{self.url} answers, but not as a {SERVICE_NAME} (HTTP {status}); check "
                                 "box_service")
        return reply

    async def engines(self, max_age: float = TTL) -> list[dict]:
        """The shared engines (marked ``shared``), fetched at most ``max_age`` s ago; ``[]`` while unavailable."""
        async with self._lock:
            if time.monotonic() - self._fetched < max_age:
                return self._engines
            try:
                if not self._who:
                    self._who = await self.identify()
                status, reply = await self.request("GET", "sage_nb/api/engines")
                if status != 200 or not isinstance(reply, list):
                    self._who = {}
                    raise BoxUnavailable(f"the box service answered {status}: {message(reply)}")
                self._engines = [shared_model(e) for e in reply if isinstance(e, dict)]
                self._problem = ""
            except BoxUnavailable as e:
                self._engines, self._problem = [], str(e)
            self._fetched = time.monotonic()
            return self._engines

    async def status(self) -> dict:
        """The link as JSON: url, ``available`` or ``unavailable`` with the reason, who the user is there."""
        engines = await self.engines()
        model = {"url": self.url, "state": "unavailable" if self._problem else "available",
                 "reason": self._problem or None, "engines": len(engines)}
        if not self._problem:
            model.update(user=self._who.get("user"), may_publish=self._who.get("may_publish", False))
        return model

    def forget(self) -> None:
        """Read the list again at the next call (after a change made through the link)."""
        self._fetched = 0.0

    async def _lookup(self, match) -> dict | None:
        """The first shared engine ``match`` accepts: from the cached list, else from one fetched now
        (one just published or woken is found at once; a miss asks the service at most every ``RETRY`` s)."""
        for max_age in (TTL, RETRY):
            for e in await self.engines(max_age):
                if match(e):
                    return e
        return None

    async def find(self, id_or_name: str) -> dict | None:
        """A shared engine by id or name (``None``: none)."""
        return await self._lookup(lambda e: id_or_name in (e["id"], e["name"]))

    async def serves(self, kind: str | None, model: str | None) -> bool:
        """Whether a shared engine (ready, or idle so a request wakes it) serves ``model`` of ``kind``."""
        def match(e: dict) -> bool:
            if not (is_routable(e) or is_wakeable(e)) or (kind is not None and e["kind"] != kind):
                return False
            return not model or model in (e["served_model_name"], e["model"], e["name"], e["id"]) or \
                any(a["name"] == model for a in e.get("adapters") or [])  # not the user's: the service says why

        return await self._lookup(match) is not None


def usable_adapters(engine: dict) -> set[str]:
    """The names of a shared engine's adapters this user may use (the service marks them ``usable``)."""
    return {a["name"] for a in engine.get("adapters") or [] if a.get("usable") and not a.get("error")}


def shared_model(engine: dict) -> dict:
    """A shared engine as a user's server shows it: marked shared, with its publisher; no base URL (it is
    reachable only through the service; its port stays as a sign that it listens)."""
    return {**engine, "shared": True, "publisher": engine.get("publisher"), "base_url": None, "pid": None,
            "log_path": None}


def shared_models(engines: list[dict], taken: set[str]) -> list[dict]:
    """``v1/models`` entries of the box's shared engines (ready or idle), marked shared, with their publisher."""
    out: dict[str, dict] = {}
    for e in engines:
        if e["served_model_name"] in taken or not (is_routable(e) or is_wakeable(e)):
            continue
        entry = out.setdefault(e["served_model_name"], {
            "id": e["served_model_name"], "object": "model", "owned_by": e.get("publisher") or "sage_nb",
            "kind": e["kind"], "root": e["model"], "created": int(e.get("ready_at") or e["created_at"]),
            "shared": True, "engines": []})
        entry["engines"].append({"id": e["id"], "name": e["name"], "state": e["state"]})
        usable = usable_adapters(e)
        for a in e.get("adapters") or []:  # the user's own adapters, and those shared with them
            if a["name"] in usable and a["name"] not in taken:
                adapter = out.setdefault(a["name"], {
                    "id": a["name"], "object": "model", "owned_by": a.get("owner") or "sage_nb", "kind": e["kind"],
                    "root": e["model"], "parent": e["served_model_name"], "adapter": True, "shared": True,
                    "created": int(a.get("loaded_at") or e["created_at"]), "engines": []})
                adapter["engines"].append({"id": e["id"], "name": e["name"], "state": e["state"]})
    return list(out.values())


def message(reply) -> str:
    if isinstance(reply, dict):
        return str(reply.get("message") or reply.get("error") or reply)
    return str(reply)
