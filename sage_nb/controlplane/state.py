"""The engine state machine: ``starting → ready → stopping → stopped``, ``starting → stopping``,
``starting|ready|stopping → failed``; and the one definition of a routable engine."""

from __future__ import annotations

from enum import StrEnum

from .errors import IllegalTransition


class EngineState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


# A starting engine may be stopped before it is ready; a stop that cannot make the
# process tree go away ends in ``failed``.
TRANSITIONS: dict[EngineState, frozenset[EngineState]] = {
    EngineState.STARTING: frozenset({EngineState.READY, EngineState.STOPPING, EngineState.FAILED}),
    EngineState.READY: frozenset({EngineState.STOPPING, EngineState.FAILED}),
    EngineState.STOPPING: frozenset({EngineState.STOPPED, EngineState.FAILED}),
    EngineState.STOPPED: frozenset(),
    EngineState.FAILED: frozenset(),
}

LIVE = frozenset({EngineState.STARTING, EngineState.READY, EngineState.STOPPING})
ENDED = frozenset({EngineState.STOPPED, EngineState.FAILED})
STOPPABLE = frozenset({EngineState.STARTING, EngineState.READY})


def check_transition(current: EngineState | str, new: EngineState | str) -> EngineState:
    """Return ``new`` as an :class:`EngineState`, or raise :class:`IllegalTransition`."""
    cur, nxt = EngineState(current), EngineState(new)
    if nxt not in TRANSITIONS[cur]:
        raise IllegalTransition(f"illegal engine state transition {cur} -> {nxt}")
    return nxt


def is_routable(engine) -> bool:
    """Ready, no failed health or work probe pending, and listening: the only engines a request
    may go to. Takes an engine record or its JSON model."""
    if isinstance(engine, dict):
        state, failures, port = engine.get("state"), engine.get("health_failures"), engine.get("port")
    else:
        state, failures, port = engine.state, engine.health_failures, engine.port
    return state == EngineState.READY and not failures and bool(port)
