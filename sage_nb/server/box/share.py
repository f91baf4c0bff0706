"""The box service's share of each shared engine among its users: limits checked before a request is
routed, fair admission to the engine it is routed to, usage counted from the engine's own ``usage``.

One :class:`ShareGate` per service, used by the gateway (:mod:`..gateway`) and the usage and limits
routes. Requests to a user's own private engines never pass here: only the box service has one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from tornado.ioloop import PeriodicCallback

from sage_nb.controlplane.sharing.fairshare import DEFAULT_MAX_NUM_SEQS, FairShare, QueueTimeout, Ticket
from sage_nb.controlplane.sharing.limits import Limit, LimitsFile
from sage_nb.controlplane.sharing.usage import UsageBook, seconds_to_midnight
from sage_nb.controlplane.store.ledger import SharedLedger

from ..handlers import ApiError
from .identity import Caller

log = logging.getLogger("sage_nb.share")
PROBE_INTERVAL = 1.0  # seconds between metrics probes of an engine with requests waiting for it
LIMITS_FILE = "limits.toml"


def capacity(extra_args: list[str]) -> int:
    """The engine's ``--max-num-seqs`` (vLLM's default where its launch does not say)."""
    for i, arg in enumerate(extra_args):
        value = arg.split("=", 1)[1] if arg.startswith("--max-num-seqs=") else (
            extra_args[i + 1] if arg == "--max-num-seqs" and i + 1 < len(extra_args) else None)
        if value is not None:
            try:
                return max(1, int(value))
            except ValueError:
                break
    return DEFAULT_MAX_NUM_SEQS


class ShareGate:
    """Limits, fair admission and usage of the box service."""

    def __init__(self, state_dir: Path, limits_path: str | None = None, ledger: SharedLedger | None = None) -> None:
        self.limits_file = LimitsFile(Path(limits_path) if limits_path else state_dir / LIMITS_FILE)
        self.fair = FairShare()
        self.usage = UsageBook(state_dir / "usage.sqlite3")
        self.ledger = ledger
        self.me = pwd.getpwuid(os.getuid()).pw_name
        self.engines: dict[str, tuple[str, int, str]] = {}  # engine id -> (host, port, key), for metrics probes
        self.timer: PeriodicCallback | None = None
        self.watch: PeriodicCallback | None = None
        self._publish()

    def start(self) -> None:
        """On the running loop: re-read the limits file each second, so a new memory cap reaches the
        ledger (and users' own servers) even while no request comes to the service."""
        self.watch = PeriodicCallback(lambda: self.refresh(force=True), LimitsFile.CHECK_EVERY * 1000)
        self.watch.start()

    def refresh(self, force: bool = False) -> None:
        """Take a changed limits file into effect (``force``: read it now, not at most once a second; the
        watch's ticks are a second apart too, so a throttled read would skip every other one)."""
        before = self.limits_file.limits
        if force:
            self.limits_file.reload()
        if self.limits_file.current() is not before:
            self._publish()
            log.info("sage_nb share: limits reloaded from %s", self.limits_file.path)

    def _publish(self) -> None:
        limits = self.limits_file.limits
        self.fair.admin_window = limits.window
        self.fair.enabled = limits.fair_share
        if self.ledger is None:
            return
        try:
            with self.ledger.transaction() as conn:
                limits.publish_caps(conn, exempt=self.me)
        except Exception as e:  # the caps stay as they were; the limits route shows why
            self.limits_file.error = f"memory caps not published to the ledger: {getattr(e, 'message', e)}"
            log.warning("sage_nb share: %s", self.limits_file.error)

    def limit(self, caller: Caller) -> Limit:
        """The caller's limits now (the file re-read when it changed)."""
        self.refresh()
        return self.limits_file.limits.for_user(caller.username, caller.groups)

    def check(self, caller: Caller) -> None:
        """A 429 with ``Retry-After`` and words when the caller is over a request or token limit."""
        limit = self.limit(caller)
        if limit.concurrent is not None:
            load = self.fair.load(caller.username)
            if load >= limit.concurrent:
                raise ApiError(429, f"{caller.username} has {load} request(s) in flight or queued on the shared "
                                    f"engines, the most allowed at once ({limit.concurrent}, "
                                    f"{limit.source['concurrent']} limit); send the next when one is answered",
                               headers={"Retry-After": "1"}, error_type="requests", code="rate_limit_exceeded")
        if limit.tokens_per_day is not None:
            used = self.usage.tokens_today(caller.username)
            if used >= limit.tokens_per_day:
                wait = int(seconds_to_midnight()) + 1
                raise ApiError(429, f"{caller.username} used {used:,} tokens today, the daily limit "
                                    f"({limit.tokens_per_day:,}, {limit.source['tokens_per_day']} limit); it resets "
                                    f"at 00:00 UTC, in {wait // 3600} h {wait % 3600 // 60} min",
                               headers={"Retry-After": str(wait)}, error_type="tokens", code="rate_limit_exceeded")

    async def admit(self, caller: Caller, engine) -> Ticket:
        """Wait for the caller's turn at ``engine`` (a 429 after the queue limit)."""
        self.engines[engine.id] = (engine.host, engine.port, engine.api_key)
        timeout = self.limits_file.limits.queue_timeout_s
        try:
            ticket = await self.fair.admit(caller.username, engine.id, capacity(engine.extra_args), timeout)
        except QueueTimeout as e:
            raise ApiError(429, e.message, headers={"Retry-After": str(int(e.retry_after))},
                           error_type="requests", code="rate_limit_exceeded") from None
        if ticket.future is not None and self.timer is None:  # it had to wait: watch the engine's own queue
            self._start_probes()
        return ticket

    def done(self, ticket: Ticket, engine_name: str, usage: dict | None) -> None:
        """The request is over: its slot goes to the next user, and, when the engine answered it, its row."""
        self.fair.release(ticket)
        if usage is not None:
            self.usage.add(ticket.user, engine_name, int(usage.get("prompt_tokens") or 0),
                           int(usage.get("completion_tokens") or 0), ticket.queued_s)

    def users_of(self, engine_id: str, engine_name: str) -> dict[str, dict]:
        """Each user's part of one shared engine: requests, tokens and time queued today (UTC), and
        requests in the engine or waiting for it now."""
        users: dict[str, dict] = {}
        for row in self.usage.rows(days=1):
            if row["engine"] == engine_name:
                users[row["user"]] = {k: row[k] for k in ("requests", "prompt_tokens", "completion_tokens",
                                                          "queued_s")}
        share = self.fair.engines.get(engine_id)
        for user in set(users) | (set(share.in_flight) | set(share.queues) if share else set()):
            entry = users.setdefault(user, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                            "queued_s": 0.0})
            entry["in_flight"] = share.in_flight.get(user, 0) if share else 0
            entry["queued"] = len(share.queues.get(user, ())) if share else 0
        return users

    # ---------------------------------------------------------------- the engines' own metrics
    def _start_probes(self) -> None:
        self.timer = PeriodicCallback(lambda: asyncio.ensure_future(self._probe()), PROBE_INTERVAL * 1000)
        self.timer.start()

    async def _probe(self) -> None:
        """Ask each engine with requests waiting for it how many it runs and how many wait inside it."""
        busy = [s.engine_id for s in self.fair.engines.values() if s.queued() or s.narrowed is not None]
        if not busy:
            return
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROBE_INTERVAL)) as session:
            for engine_id in busy:
                where = self.engines.get(engine_id)
                if where is None:
                    continue
                host, port, key = where
                try:
                    async with session.get(f"http://{host}:{port}/metrics",
                                           headers={"Authorization": f"Bearer {key}"}) as reply:
                        if reply.status != 200:
                            continue
                        text = await reply.text()
                except (aiohttp.ClientError, OSError, TimeoutError):
                    continue
                running, waiting = queue_gauges(text)
                if running is not None and waiting is not None:
                    self.fair.observe(engine_id, running, waiting)

    def close(self) -> None:
        for timer in (self.timer, self.watch):
            if timer is not None:
                timer.stop()
        self.timer = self.watch = None
        self.usage.close()


def queue_gauges(text: str) -> tuple[int | None, int | None]:
    """``vllm:num_requests_running`` and ``vllm:num_requests_waiting`` from a ``/metrics`` page."""
    found: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            found[family.name] = int(sum(s.value for s in family.samples))
    return found.get("vllm:num_requests_running"), found.get("vllm:num_requests_waiting")
