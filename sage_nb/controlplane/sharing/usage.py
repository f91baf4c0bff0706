"""Usage of the shared engines by user, engine and day (UTC): requests, prompt and completion tokens
(the engine's own ``usage`` of each reply) and seconds queued, in the box service's SQLite file.

Each completed request is one committed upsert, so a killed service loses no finished request's row.
Today's token totals per user are also kept in memory: they feed the ``tokens_per_day`` limits
without a query per request.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
from collections import defaultdict
from pathlib import Path

from ..store.ledger import create_mode

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL,
    user TEXT NOT NULL,
    engine TEXT NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    queued_s REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (day, user, engine)
);
"""
COLUMNS = ("day", "user", "engine", "requests", "prompt_tokens", "completion_tokens", "queued_s")


def today() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")


def seconds_to_midnight() -> float:
    """Seconds until the day (UTC) turns and the daily token counts start again."""
    now = dt.datetime.now(dt.UTC)
    midnight = (now + dt.timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


class UsageBook:
    """The usage file (``usage.sqlite3``, 0600, WAL) of the box service."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        create_mode(self.path, 0o600)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL: a committed row survives a killed process
        self._conn.execute(SCHEMA)
        self._lock = threading.Lock()
        self._day = today()
        self._tokens: dict[str, int] = defaultdict(int)
        for user, tokens in self._conn.execute(
                "SELECT user, SUM(prompt_tokens + completion_tokens) FROM usage WHERE day = ? GROUP BY user",
                (self._day,)):
            self._tokens[user] = tokens

    def add(self, user: str, engine: str, prompt_tokens: int, completion_tokens: int, queued_s: float) -> None:
        """Record one completed request (committed before it returns)."""
        day = today()
        with self._lock:
            if day != self._day:
                self._day, self._tokens = day, defaultdict(int)
            self._tokens[user] += prompt_tokens + completion_tokens
            self._conn.execute(
                "INSERT INTO usage (day, user, engine, requests, prompt_tokens, completion_tokens, queued_s) "
                "VALUES (?, ?, ?, 1, ?, ?, ?) ON CONFLICT (day, user, engine) DO UPDATE SET "
                "requests = requests + 1, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
                "completion_tokens = completion_tokens + excluded.completion_tokens, "
                "queued_s = queued_s + excluded.queued_s",
                (day, user, engine, prompt_tokens, completion_tokens, queued_s))

    def tokens_today(self, user: str) -> int:
        """``user``'s prompt + completion tokens today (UTC), over all shared engines."""
        with self._lock:
            if today() != self._day:
                self._day, self._tokens = today(), defaultdict(int)
            return self._tokens.get(user, 0)

    def rows(self, user: str | None = None, days: int = 1) -> list[dict]:
        """Rows of the last ``days`` days (today is 1), of one user or everyone's, newest day first."""
        since = (dt.datetime.now(dt.UTC) - dt.timedelta(days=max(1, days) - 1)).strftime("%Y-%m-%d")
        query = f"SELECT {', '.join(COLUMNS)} FROM usage WHERE day >= ?"
        args: tuple = (since,)
        if user is not None:
            query += " AND user = ?"
            args += (user,)
        with self._lock:
            found = self._conn.execute(query + " ORDER BY day DESC, engine, user", args).fetchall()
        return [dict(zip(COLUMNS, row, strict=True)) for row in found]

    def shares(self, days: int = 1) -> dict[str, dict[str, float]]:
        """Each engine's share of work by user over the last ``days`` days: fractions of its tokens."""
        totals: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for row in self.rows(days=days):
            totals[row["engine"]][row["user"]] += row["prompt_tokens"] + row["completion_tokens"]
        out = {}
        for engine, by_user in totals.items():
            whole = sum(by_user.values())
            out[engine] = {u: (n / whole if whole else 0.0) for u, n in sorted(by_user.items())}
        return out

    def close(self) -> None:
        with self._lock:
            self._conn.close()
