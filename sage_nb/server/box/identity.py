"""Who is calling the box service: every request carries its caller's own credential, a JupyterHub
token (checked through the hub's API with jupyterhub's ``HubAuth``, cached ``hub_cache_age`` seconds;
the token must hold the service's access scope, not just be valid) or a key an admin issued
(``python -m sage_nb.admin add-key``). A request without one, or with a wrong, revoked or
under-scoped one, is refused with words that say what to do (:class:`Denied`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from jupyter_server.auth.identity import IdentityProvider, User
from traitlets import Int, Unicode

from sage_nb.controlplane.store.caps import unix_groups
from sage_nb.controlplane.store.keys import KEY_PREFIX, KeyStore, KeyStoreError

NO_CREDENTIAL = ("no credential: send your JupyterHub token (the JUPYTERHUB_API_TOKEN of your server) or the key "
                 "an admin issued you, as 'Authorization: Bearer <it>' (an OpenAI client's api_key)")


@dataclass
class Caller(User):
    """An authenticated user of the box service."""

    via: str = "key"  # "hub" or "key"
    admin: bool = False
    groups: tuple[str, ...] = field(default_factory=tuple)


class Denied(Exception):
    """Why a request's credential was refused: 401 (none, wrong, revoked) or 403 (lacks the scope)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class BoxIdentityProvider(IdentityProvider):
    """``c.ServerApp.identity_provider_class`` of the box service."""

    hub_cache_age = Int(60, help="Seconds the service caches the hub's answer for a token: a token the hub "
                                 "revoked keeps working that long at most.").tag(config=True)
    keys_dir = Unicode("", help="Where the service's key store (keys.json) lives; empty: no issued keys "
                                "are accepted.").tag(config=True)
    service_name = Unicode(os.environ.get("JUPYTERHUB_SERVICE_NAME", ""),
                           help="The service's name at the hub (its access scope is "
                                "access:services!service=<name>).").tag(config=True)

    @property
    def login_available(self) -> bool:
        return False

    def _hub(self):
        if not hasattr(self, "_hub_auth"):
            self._hub_auth = None
            if os.environ.get("JUPYTERHUB_API_URL") and os.environ.get("JUPYTERHUB_API_TOKEN"):
                from jupyterhub.services.auth import HubAuth

                self._hub_auth = HubAuth(cache_max_age=self.hub_cache_age)
        return self._hub_auth

    def _keys(self) -> KeyStore | None:
        if not self.keys_dir:
            return None
        if not hasattr(self, "_key_store"):
            self._key_store = KeyStore(Path(self.keys_dir))
        return self._key_store

    def access_scopes(self) -> set[str]:
        name = self.service_name
        return {"access:services", f"access:services!service={name}"} if name else {"access:services"}

    async def get_user(self, handler) -> Caller | None:
        if getattr(handler, "_jupyter_current_user", None):
            return handler._jupyter_current_user
        try:
            caller = await self.resolve(self.get_token(handler))
        except Denied as e:
            handler._sage_nb_denied = e
            return None
        handler._token_authenticated = True  # no cookies, no XSRF: every request carries its credential
        return caller

    def get_token(self, handler) -> str | None:
        header = handler.request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() in ("token", "bearer") and token.strip() else None

    async def resolve(self, token: str | None) -> Caller:
        """The caller a credential belongs to, or :class:`Denied`."""
        if not token:
            raise Denied(401, NO_CREDENTIAL)
        if token.startswith(KEY_PREFIX):
            keys = self._keys()
            if keys is None:
                raise Denied(401, "this box service accepts JupyterHub tokens only, not issued keys")
            try:
                name, why = keys.user_for(token)
            except KeyStoreError as e:
                raise Denied(503, e.message) from None
            if name is None:
                raise Denied(401, why)
            return Caller(username=name, via="key", groups=tuple(sorted(unix_groups(name))))
        hub = self._hub()
        if hub is None:
            raise Denied(401, "unknown key: send the key an admin issued you (python -m sage_nb.admin add-key)")
        model = await hub.user_for_token(token, sync=False)
        if not model or model.get("kind", "user") != "user":
            raise Denied(401, "the hub does not know this token (expired or revoked?): send your server's "
                              "JUPYTERHUB_API_TOKEN, or make one at the hub's Token page")
        scopes = set(model.get("scopes") or ())
        if not scopes & self.access_scopes():
            needed = sorted(self.access_scopes())[-1]
            raise Denied(403, f"your token may not use this service: it lacks the scope {needed!r}. The admin "
                              f"grants it to users (c.JupyterHub.load_roles) and to their servers' tokens "
                              f"(c.Spawner.server_token_scopes), as docs/shared-server.md says")
        name = model["name"]
        groups = set(model.get("groups") or ()) | unix_groups(name)
        return Caller(username=name, via="hub", admin=bool(model.get("admin")), groups=tuple(sorted(groups)))
