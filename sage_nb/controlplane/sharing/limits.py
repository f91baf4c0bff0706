"""Limits an admin sets for the users of the box service, in one TOML file (``limits.toml`` in the
service's state folder, re-read when it changes: no restart of the service or of any engine)::

    queue_timeout_s = 30          # a request waiting longer for a shared engine gets a 429
    window = 0                    # requests a shared engine gets at once while several users wait
                                  # (0: the engine's own --max-num-seqs)
    fair_share = true             # false: requests go to the engine in arrival order (limits and
                                  # usage still apply)
    [default]
    concurrent = 16               # requests in flight (and queued) per user, over all shared engines
    tokens_per_day = 2_000_000    # prompt + completion tokens per user per day (UTC)
    gpu_mib = 49152               # GPU memory a user's own private engines may book on the box
    [groups.students]
    concurrent = 4
    [users.alice]
    tokens_per_day = 10_000_000

A user's limit is their own entry, else the most generous entry among their groups, else the
default; a limit not set anywhere is no limit. Memory caps reach every user's own server through the
machine-wide ledger (:func:`..store.caps.publish_caps`), where each booking is checked
(:func:`..store.caps.check_cap`).
"""

from __future__ import annotations

import sqlite3
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadRequest
from ..store.caps import pick, publish_caps

FIELDS = ("concurrent", "tokens_per_day", "gpu_mib")
TOP = {"queue_timeout_s": 30.0, "window": 0, "fair_share": True}


class LimitsError(BadRequest):
    """The limits file cannot be used; the message says where and why."""


@dataclass(frozen=True)
class Limit:
    """One user's limits (``None``: none) and where each came from (``"user"``, ``"group students"``, ...)."""

    concurrent: int | None = None
    tokens_per_day: int | None = None
    gpu_mib: int | None = None
    source: dict[str, str] = field(default_factory=dict)

    def to_model(self) -> dict:
        return {"concurrent": self.concurrent, "tokens_per_day": self.tokens_per_day, "gpu_mib": self.gpu_mib,
                "source": dict(self.source)}


@dataclass(frozen=True)
class Limits:
    """The parsed file."""

    default: dict[str, int] = field(default_factory=dict)
    groups: dict[str, dict[str, int]] = field(default_factory=dict)
    users: dict[str, dict[str, int]] = field(default_factory=dict)
    queue_timeout_s: float = TOP["queue_timeout_s"]
    window: int = TOP["window"]
    fair_share: bool = True

    def for_user(self, user: str, groups: frozenset[str] | tuple[str, ...] = ()) -> Limit:
        """``user``'s limits: their own entry, else the most generous of their groups', else the default."""
        values: dict[str, int | None] = {}
        source: dict[str, str] = {}
        for name in FIELDS:
            found = pick(name, user, groups, users=self.users, groups_table=self.groups, default=self.default)
            if found is not None:
                values[name], source[name] = found
        return Limit(**values, source=source)

    def publish_caps(self, conn: sqlite3.Connection, exempt: str) -> None:
        """Write the memory caps into the machine-wide ledger (inside its transaction)."""
        publish_caps(conn, default=self.default, groups=self.groups, users=self.users, exempt=exempt)

    def to_model(self) -> dict:
        return {"default": self.default, "groups": self.groups, "users": self.users,
                "queue_timeout_s": self.queue_timeout_s, "window": self.window, "fair_share": self.fair_share}


def parse(text: str, where: str = "limits.toml") -> Limits:
    """:class:`Limits` from TOML text, or :class:`LimitsError` naming the bad entry."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise LimitsError(f"{where}: not valid TOML: {e}") from None
    unknown = set(data) - {"default", "groups", "users", *TOP}
    if unknown:
        raise LimitsError(f"{where}: unknown setting(s) {sorted(unknown)}; known: default, groups, users, "
                          f"{', '.join(TOP)}")
    timeout = data.get("queue_timeout_s", TOP["queue_timeout_s"])
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise LimitsError(f"{where}: queue_timeout_s must be a number of seconds > 0, not {timeout!r}")
    window = data.get("window", TOP["window"])
    if isinstance(window, bool) or not isinstance(window, int) or window < 0:
        raise LimitsError(f"{where}: window must be a whole number >= 0 (0: the engine's --max-num-seqs), "
                          f"not {window!r}")
    fair = data.get("fair_share", True)
    if not isinstance(fair, bool):
        raise LimitsError(f"{where}: fair_share must be true or false, not {fair!r}")
    return Limits(default=_entry(data.get("default", {}), f"{where} [default]"), fair_share=fair,
                  groups=_table(data.get("groups", {}), f"{where} [groups]"),
                  users=_table(data.get("users", {}), f"{where} [users]"),
                  queue_timeout_s=float(timeout), window=window)


def _table(table, where: str) -> dict[str, dict[str, int]]:
    if not isinstance(table, dict):
        raise LimitsError(f"{where} must be a table of names")
    return {str(name): _entry(entry, f"{where[:-1]}.{name}]") for name, entry in table.items()}


def _entry(entry, where: str) -> dict[str, int]:
    if not isinstance(entry, dict):
        raise LimitsError(f"{where} must be a table with {', '.join(FIELDS)}")
    out = {}
    for name, value in entry.items():
        if name not in FIELDS:
            raise LimitsError(f"{where}: unknown limit {name!r}; known: {', '.join(FIELDS)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "concurrent" else 0):
            least = 1 if name == "concurrent" else 0
            raise LimitsError(f"{where}: {name} must be a whole number >= {least}, not {value!r}")
        out[name] = value
    return out


class LimitsFile:
    """The file, re-read when its modification time changes (checked at most once a second). A file
    that stops parsing keeps the last good limits in force; :attr:`error` says why."""

    CHECK_EVERY = 1.0

    def __init__(self, path: Path) -> None:
        self.path = path
        self.error: str | None = None
        self.loaded_at: float | None = None
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self.limits = Limits()
        self.reload()
        if self.error:
            raise LimitsError(self.error)

    def current(self) -> Limits:
        now = time.monotonic()
        if now - self._checked >= self.CHECK_EVERY:
            self._checked = now
            self.reload()
        return self.limits

    def reload(self) -> bool:
        """Read the file if it changed; True when new limits took effect."""
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            limits = Limits() if stamp is None else parse(self.path.read_text(), str(self.path))
        except (LimitsError, OSError) as e:
            self.error = getattr(e, "message", None) or str(e)
            return False
        self.limits, self.error, self.loaded_at = limits, None, time.time()
        return True
