"""Users' own LoRA adapters on the box service's shared engines: who may use which (the rule is
``controlplane.adapters.uploads.may_use``), applied where requests and lists pass.

An adapter a user sent is theirs and whom they share it with (``users``); a publisher's adapter loaded
from a path the service reads is everyone's unless its publisher says otherwise. Every user sees every
adapter in the engines' lists (who uses what), but only usable ones are models they can ask for.
"""

from __future__ import annotations

from sage_nb.controlplane.adapters.uploads import may_use

from ..handlers import ApiError


def _adapters(router):
    """Every adapter recorded on the service's ready or idle engines."""
    index = router.index()
    return (a for e in index.engines + index.idle for a in e.adapters)


def unusable(router, caller) -> set[str]:
    """The names of adapters on the service's engines that ``caller`` may not use."""
    return {a["name"] for a in _adapters(router) if not may_use(a, caller.username, caller.groups)}


def refuse_unusable(router, model: str | None, caller) -> None:
    """A 403 with words when ``model`` names an adapter of another user that is not shared with ``caller``."""
    if not model:
        return
    for a in _adapters(router):
        if a["name"] == model and not may_use(a, caller.username, caller.groups):
            raise ApiError(403, f"adapter {model!r} is {a['owner']}'s and not shared with {caller.username}: "
                                f"ask them to share it (%llm adapter load {model} PATH --share "
                                f"{caller.username})", error_type="permission_error", code="adapter_not_shared")
