"""Sleep mode of the stub engine: vLLM's dev routes ``/sleep``, ``/wake_up`` and ``/is_sleeping``
(served with ``VLLM_SERVER_DEV_MODE=1``), behind the engine's key as sage_nb's ``KeyGuard`` puts
them. ``SleepMode`` is mixed into the stub's state, ``SleepRoutes`` into its connection protocol."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qs

from .stub_http import AWAKE, NOT_ALLOWED, NOT_FOUND, UNAUTHORIZED, WAKE_FAILED, bad_request, response

SLEEP, WAKE_UP, IS_SLEEPING = "/sleep", "/wake_up", "/is_sleeping"
DEV_ROUTES = frozenset({SLEEP, WAKE_UP, IS_SLEEPING})  # vLLM's, with VLLM_SERVER_DEV_MODE=1


class SleepMode:
    """Falling asleep and waking, each taking its configured time (``STUB_SLEEP_MS``, ``STUB_WAKE_MS``)."""

    async def sleep(self, level: int) -> bytes:
        await asyncio.sleep(self.sleep_delay)
        self.sleeping = True
        return response(200, {"status": "sleeping", "level": level})

    async def wake_up(self) -> bytes:
        await asyncio.sleep(self.wake_delay)
        if self.wake_fails:
            return WAKE_FAILED
        self.sleeping = False
        self.wakes += 1
        return AWAKE


class SleepRoutes:
    """The dev routes of one connection (its ``stub``, ``send``, ``busy``, ``task`` and ``_later``)."""

    def dev(self, method: str, path: str, query: str, headers: dict, keep: bool) -> None:
        """Sleep mode's routes (the body, if any, is ignored)."""
        stub = self.stub
        if stub.auth and headers.get("authorization") != stub.auth:  # what sage_nb's KeyGuard adds to vLLM
            return self.send(UNAUTHORIZED, keep)
        if not stub.dev_mode:
            return self.send(NOT_FOUND, keep)
        if path == IS_SLEEPING:
            if method != "GET":
                return self.send(NOT_ALLOWED, keep)
            return self.send(response(200, {"is_sleeping": stub.sleeping, "wakes": stub.wakes}), keep)
        if method != "POST":
            return self.send(NOT_ALLOWED, keep)
        if path == WAKE_UP:
            op = stub.wake_up()
        else:
            levels = parse_qs(query).get("level") or ["1"]
            level = int(levels[-1]) if levels[-1].isascii() and levels[-1].isdigit() else -1
            if not 0 <= level <= 2:
                return self.send(bad_request(f"bad request: level must be 0, 1 or 2, not {levels[-1]!r}"), keep)
            if not stub.sleep_mode:
                return self.send(bad_request("sleep mode is not enabled (start with --enable-sleep-mode)"), keep)
            op = stub.sleep(level)
        if stub.hang:  # a stuck EngineCore answers neither
            op.close()
            self.busy = True
            return
        task = asyncio.get_running_loop().create_task(op)
        stub.ops.add(task)  # it runs to its end even if this connection is lost
        task.add_done_callback(stub.ops.discard)
        self.busy = True
        self.task = asyncio.get_running_loop().create_task(self._later(task, keep))
