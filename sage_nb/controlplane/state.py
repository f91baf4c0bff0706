"""The engine state machine and the one definition of a routable engine.

``starting → ready → stopping → stopped``, ``starting → stopping``, and any live state ``→ failed``.
Idle engines (issue: keep-alive) add ``ready → sleeping → waking → ready`` (vLLM's sleep mode: the
process stays, its GPU memory is given back) and ``ready → unloaded → starting → ready`` (the process
tree is gone, the record stays and the next request launches it again). Every state but the ended
ones can be stopped.
"""

from __future__ import annotations

from enum import StrEnum

from .errors import IllegalTransition


class EngineState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    SLEEPING = "sleeping"
    WAKING = "waking"
    UNLOADED = "unloaded"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


S = EngineState
TRANSITIONS: dict[EngineState, frozenset[EngineState]] = {
    S.STARTING: frozenset({S.READY, S.STOPPING, S.FAILED}),
    S.READY: frozenset({S.SLEEPING, S.UNLOADED, S.STOPPING, S.FAILED}),
    # back to ready without waking when the engine refused to sleep
    S.SLEEPING: frozenset({S.WAKING, S.READY, S.UNLOADED, S.STOPPING, S.FAILED}),
    S.WAKING: frozenset({S.READY, S.STOPPING, S.FAILED}),
    S.UNLOADED: frozenset({S.STARTING, S.STOPPING, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.STOPPED: frozenset(),
    S.FAILED: frozenset(),
}

# states in which a process of the engine may run
LIVE = frozenset({S.STARTING, S.READY, S.SLEEPING, S.WAKING, S.STOPPING})
ENDED = frozenset({S.STOPPED, S.FAILED})
STOPPABLE = frozenset({S.STARTING, S.READY, S.SLEEPING, S.WAKING, S.UNLOADED})
# idle: listed, not routable, woken by the next request for them
DORMANT = frozenset({S.SLEEPING, S.UNLOADED})


def check_transition(current: EngineState | str, new: EngineState | str) -> EngineState:
    """Return ``new`` as an :class:`EngineState`, or raise :class:`IllegalTransition`."""
    cur, nxt = EngineState(current), EngineState(new)
    if nxt not in TRANSITIONS[cur]:
        raise IllegalTransition(f"illegal engine state transition {cur} -> {nxt}")
    return nxt


def _get(engine, name: str):
    return engine.get(name) if isinstance(engine, dict) else getattr(engine, name)


def is_routable(engine) -> bool:
    """Ready, no failed health or work probe pending, and listening: the only engines a request
    may go to. Takes an engine record or its JSON model."""
    return _get(engine, "state") == S.READY and not _get(engine, "health_failures") and bool(_get(engine, "port"))


def is_wakeable(engine) -> bool:
    """Idle (sleeping or unloaded), or on its way back from it: a request for it waits for it."""
    state = _get(engine, "state")
    return state in DORMANT or (state in (S.WAKING, S.STARTING) and bool(_get(engine, "wake_started_at")))
