"""REST of the box service's sharing: ``GET sage_nb/api/box/usage`` and ``GET sage_nb/api/box/limits``.

On the box service they answer from its :class:`~.share.ShareGate`; on a user's server linked to one
they are passed on under the user's credential; elsewhere they are a 404 that says there is no box
service. Who sees what: everyone sees each shared engine's share of work by user (who uses what);
the rows (requests, tokens, time queued) are the caller's own, or everyone's for an admin.
"""

from __future__ import annotations

from jupyter_server.auth.decorator import authorized
from tornado import web

from sage_nb.controlplane.sharing.usage import today

from ..handlers import ApiError, SageHandler

MAX_DAYS = 366


class ShareHandler(SageHandler):
    _track_activity = False

    async def answer(self, build) -> None:
        if self.box is not None:
            self.reply(build(self.settings["sage_nb_share"], self.current_user))
        elif self.link is not None:
            path = self.request.path[self.request.path.index("sage_nb/api/"):]
            await self.forward("GET", path + (f"?{self.request.query}" if self.request.query else ""))
        else:
            raise ApiError(404, "no box service is configured (the box_service setting), so there are no shared "
                                "engines to account for; see docs/shared-server.md")


class UsageHandler(ShareHandler):
    """``?days=N`` (default 1: today, UTC) and ``?user=NAME`` (an admin's view of one user)."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        raw = self.get_query_argument("days", "1")
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_DAYS:
            raise ApiError(400, f"days must be a whole number from 1 to {MAX_DAYS}, not {raw!r}")
        days, who = int(raw), self.get_query_argument("user", None)

        def build(gate, caller) -> dict:
            admin = self.box.may_administer(caller)
            if who is not None and who != caller.username and not admin:
                raise ApiError(403, f"{caller.username!r} may see their own usage only; only admins see "
                                    f"{who!r}'s (everyone sees each engine's share by user under 'shares')")
            user = who if who is not None else (None if admin else caller.username)
            return {"user": caller.username, "admin": admin, "days": days, "today": today(),
                    "rows": gate.usage.rows(user=user, days=days), "shares": gate.usage.shares(days=days),
                    "tokens_today": gate.usage.tokens_today(caller.username),
                    "limits": gate.limit(caller).to_model()}

        await self.answer(build)


class LimitsHandler(ShareHandler):
    """The caller's limits, the engines' admission state, and for an admin the whole file."""

    @web.authenticated
    @authorized
    async def get(self) -> None:
        def build(gate, caller) -> dict:
            reply = {"user": caller.username, "limits": gate.limit(caller).to_model(),
                     "in_flight_or_queued": gate.fair.load(caller.username),
                     "queue_timeout_s": gate.limits_file.limits.queue_timeout_s,
                     "engines": gate.fair.to_model(), "file": str(gate.limits_file.path),
                     "error": gate.limits_file.error, "loaded_at": gate.limits_file.loaded_at}
            if self.box.may_administer(caller):
                reply["all"] = gate.limits_file.limits.to_model()
            return reply

        await self.answer(build)


SHARE_HANDLERS = [
    (r"/sage_nb/api/box/usage/?", UsageHandler),
    (r"/sage_nb/api/box/limits/?", LimitsHandler),
]
