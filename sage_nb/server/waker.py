"""Wake on request: a gateway request for a model whose engines are all idle waits for one to wake.

Concurrent requests for the same engine share one wake (one future per engine on the server's loop;
across processes the registry's compare-and-set makes sure only one caller wakes it). The wake runs
in a worker thread with a bounded wait; its failure becomes a 503 or 504 that names the engine.
"""

from __future__ import annotations

import asyncio
import logging
import time

from sage_nb.controlplane import ControlPlane, ControlPlaneError
from sage_nb.controlplane.errors import WakeTimeout

from .handlers import ApiError

log = logging.getLogger("sage_nb.gateway")


class Waker:
    """One wake per engine at a time, shared by every request that waits for it."""

    def __init__(self, control_plane: ControlPlane) -> None:
        self.cp = control_plane
        self.pending: dict[str, asyncio.Future] = {}
        self.wakes = 0  # wakes started by this server (for tests and benchmarks)

    async def wake(self, engine) -> None:
        """Wait until ``engine`` is ready, starting its wake unless one is under way; :class:`ApiError`
        503 (it cannot wake: refused, failed) or 504 (not within the wake timeout) otherwise."""
        future = self.pending.get(engine.id)
        if future is None:
            future = asyncio.ensure_future(self._wake(engine))
            self.pending[engine.id] = future
            future.add_done_callback(lambda _f: self.pending.pop(engine.id, None))
        await asyncio.shield(future)  # a request that goes away does not cancel the others' wake

    async def _wake(self, engine) -> None:
        self.wakes += 1
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        timeout = self.cp.settings.effective_wake_timeout
        try:
            await loop.run_in_executor(None, self.cp.wake_engine, engine.id, True, timeout)
        except WakeTimeout as e:
            raise ApiError(504, e.message) from None
        except ControlPlaneError as e:
            raise ApiError(503, f"engine {engine.name!r} ({engine.state}) could not be woken: {e.message}") from None
        log.info("sage_nb gateway: woke engine %s (%s) in %.1f s", engine.name, engine.state,
                 time.perf_counter() - t0)
