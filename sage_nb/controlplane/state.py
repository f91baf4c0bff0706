"""The engine state machine: ``starting → ready → stopping → stopped``, ``starting|ready → failed``."""

from __future__ import annotations

from enum import StrEnum

from .errors import IllegalTransition


class EngineState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


S = EngineState

# A starting engine may be stopped before it is ready; a stop that cannot make the
# process tree go away ends in ``failed``.
TRANSITIONS: dict[EngineState, frozenset[EngineState]] = {
    S.STARTING: frozenset({S.READY, S.STOPPING, S.FAILED}),
    S.READY: frozenset({S.STOPPING, S.FAILED}),
    S.STOPPING: frozenset({S.STOPPED, S.FAILED}),
    S.STOPPED: frozenset(),
    S.FAILED: frozenset(),
}

LIVE = frozenset({S.STARTING, S.READY, S.STOPPING})
ENDED = frozenset({S.STOPPED, S.FAILED})


def check_transition(current: EngineState | str, new: EngineState | str) -> EngineState:
    """Return ``new`` as an :class:`EngineState`, or raise :class:`IllegalTransition`."""
    cur, nxt = EngineState(current), EngineState(new)
    if nxt not in TRANSITIONS[cur]:
        raise IllegalTransition(f"illegal engine state transition {cur} -> {nxt}")
    return nxt
