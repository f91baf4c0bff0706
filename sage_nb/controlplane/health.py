"""Readiness and health: promote ``starting`` engines, fail dead or hung ones.

Any process of the user may run a monitor; every change is a compare-and-set in
the registry, so several monitors agree.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from typing import TYPE_CHECKING

from . import probe, process
from .state import EngineState
from .workprobe import WorkProbes

if TYPE_CHECKING:
    from .core import ControlPlane
    from .registry import Engine

S = EngineState
log = logging.getLogger(__name__)
LAUNCH_GRACE = 30.0  # a record without a pid this long after creation lost its launcher
PORT_TAKEN = re.compile(r"Address already in use|\[Errno 98\]")


def _failure(engine: Engine, reason: str) -> str:
    tail = process.log_tail(engine.log_path, 25).strip()
    return f"{reason}\n--- last lines of {engine.log_path} ---\n{tail}" if tail else reason


def check_starting(cp: ControlPlane, engine: Engine) -> None:
    now = time.time()
    if engine.pid is None:
        if now - engine.created_at > LAUNCH_GRACE:
            cp.fail(engine.id, "the engine was never launched (its launcher exited)")
        return
    popen = cp._popens.get(engine.id)
    code = popen.poll() if popen is not None else None
    if code is not None or not process.is_alive(engine.pid, engine.create_time):
        tail = process.log_tail(engine.log_path, 30)
        if PORT_TAKEN.search(tail) and cp.relaunch_on_new_port(engine.id, "address already in use"):
            return
        how = f"exited with code {code}" if code is not None else "exited"
        cp.fail(engine.id, _failure(engine, f"the engine process {how} before it was ready"))
        return
    if now - engine.created_at > cp.settings.startup_timeout:
        cp.fail(engine.id, _failure(engine, f"not ready within {cp.settings.startup_timeout:.0f} s"))
        return
    if probe.ready(engine.host, engine.port, engine.served_model_name, engine.api_key,
                   cp.settings.probe_timeout):
        with cp.registry.transaction() as txn:
            if txn.get(engine.id).state == S.STARTING:
                txn.update(engine.id, state=S.READY, ready_at=time.time(), health_failures=0)


def check_ready(cp: ControlPlane, engine: Engine, work: WorkProbes | None = None) -> None:
    """Process alive, ``/health`` answering and, with ``work``, real requests completing."""
    popen = cp._popens.get(engine.id)
    code = popen.poll() if popen is not None else None
    if code is not None or not process.is_alive(engine.pid, engine.create_time):
        cp.fail(engine.id, _failure(engine, "the engine process died"))
        return
    ok = probe.healthy(engine.host, engine.port, cp.settings.probe_timeout)
    stuck_now = stuck = False
    if ok and work is not None:
        stuck_now, stuck = work.check(engine)
    failures = engine.health_failures  # a stuck engine stays unrouted until a probe is answered
    if not ok or stuck_now:
        failures += 1
    elif not stuck:
        failures = 0
    if failures >= cp.settings.health_failures:
        what = "work probes (a 1-token request) got no answer" if stuck else "health probes failed"
        cp.fail(engine.id, _failure(engine, f"unhealthy: {failures} {what} in a row"))
    elif failures != engine.health_failures:
        with cp.registry.transaction() as txn:
            if txn.get(engine.id).state == S.READY:
                txn.update(engine.id, health_failures=failures)


def check_all(cp: ControlPlane, work: WorkProbes | None = None) -> None:
    """One pass over every starting and ready engine."""
    engines = cp.registry.engines()
    for engine in engines:
        try:
            if engine.state == S.STARTING:
                check_starting(cp, engine)
            elif engine.state == S.READY:
                check_ready(cp, engine, work)
        except LookupError:
            continue  # pruned meanwhile
    if work is not None:
        work.forget({e.id for e in engines if e.state == S.READY})


class HealthMonitor(threading.Thread):
    """Runs :func:`check_all` every ``health_interval`` seconds (faster while engines start)."""

    def __init__(self, cp: ControlPlane) -> None:
        super().__init__(name="sage_nb-health", daemon=True)
        self.cp = cp
        self.work = WorkProbes(cp.settings.work_probe_interval, cp.settings.work_probe_timeout)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            starting = False
            try:
                check_all(self.cp, self.work)
                starting = any(e.state == S.STARTING for e in self.cp.registry.engines())
            except Exception:  # never let the monitor die; the next pass retries
                log.exception("sage_nb health pass failed")
            interval = self.cp.settings.health_interval
            self._stop_event.wait(min(interval, 0.5) if starting else interval)

    def stop(self) -> None:
        self._stop_event.set()
