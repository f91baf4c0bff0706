"""Errors of the control plane, each mapped to the HTTP status a caller should see."""

from __future__ import annotations


class ControlPlaneError(Exception):
    """Base class; ``status`` is the HTTP status the REST layer answers with."""

    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_model(self) -> dict:
        return {"message": self.message}


class BadRequest(ControlPlaneError, ValueError):
    """The caller's input is invalid (400)."""

    status = 400


class NotFound(ControlPlaneError, LookupError):
    """No engine matches the id or name (404)."""

    status = 404


class Forbidden(ControlPlaneError):
    """The caller may not do that to what another user owns (403)."""

    status = 403


class Conflict(ControlPlaneError):
    """The request collides with the current state: port taken, nothing fits (409)."""

    status = 409


class NoRoom(Conflict):
    """No GPU has the memory an engine needs now (409, with the numbers)."""


class IllegalTransition(ControlPlaneError):
    """A state change the engine state machine does not allow."""

    status = 409


class EngineFailed(ControlPlaneError):
    """An engine failed to become ready; the message carries its log tail."""

    status = 500


class NoBackend(ControlPlaneError):
    """No routable engine of the wanted kind (503)."""

    status = 503


class StateError(ControlPlaneError):
    """The state dir or registry cannot be used (unwritable, full, unreadable)."""

    status = 503


class WakeTimeout(ControlPlaneError):
    """An idle engine did not become ready within the wake timeout (504)."""

    status = 504
