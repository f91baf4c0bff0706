"""Waking idle engines. A sleeping engine gets its full GPU booking back (if the GPUs still have
room) and is sent ``/wake_up``; an unloaded one is placed afresh by the one GPU-selection path and
launched again with the same id, name, served name and key (it may land on another GPU or port).

Whoever moves the record out of ``sleeping``/``unloaded`` (a compare-and-set in the registry) does
the wake; every other caller, in any process, waits for the same engine to become ready.
"""

from __future__ import annotations

import threading
import time

from ..errors import Conflict, EngineFailed, NoRoom, WakeTimeout
from ..gpus import placement
from ..requests import LaunchRequest
from ..state import EngineState
from ..store import ports
from ..store.registry import Engine

WAITING = (EngineState.WAKING, EngineState.STARTING)


def wake(cp, engine_id: str, wait: bool = True, timeout: float | None = None) -> dict:
    """See :meth:`ControlPlane.wake_engine`."""
    engine = cp.registry.find(engine_id)
    timeout = timeout or cp.settings.effective_wake_timeout
    deadline = time.monotonic() + cp.settings.stop_grace + 5
    while engine.state == EngineState.UNLOADED and engine.pid is not None and time.monotonic() < deadline:
        time.sleep(0.1)  # its processes are still being stopped: relaunch once they are gone
        engine = cp.registry.find(engine_id)
    if engine.state == EngineState.UNLOADED:
        req = relaunch_request(engine)
        spec = cp.spec_for(req)
        mine, made = cp.supervisor.idle.make_room(lambda: _relaunch(cp, engine_id, req, spec), engine_id)
        if mine is not None:
            mine = _made_room(cp, mine, made)
            cp.supervisor.launch(mine)
    elif engine.state == EngineState.SLEEPING:
        mine, made = cp.supervisor.idle.make_room(lambda: _rebook(cp, engine_id), engine_id)
        if mine is not None:
            mine = _made_room(cp, mine, made)
            if wait:
                cp.supervisor.idle.wake_up(mine)
            else:
                threading.Thread(target=_wake_quietly, args=(cp, mine), daemon=True,
                                 name=f"sage_nb-wake-{engine_id}").start()
    elif engine.state not in (EngineState.READY, *WAITING):
        raise Conflict(f"engine {engine.name!r} is {engine.state}: only a sleeping or unloaded engine "
                       "can be woken; start it again with %llm start")
    if not wait:
        return cp.engine(engine_id)
    model = cp.supervisor.wait_ready(engine_id, timeout)
    if model["state"] in WAITING:
        raise WakeTimeout(f"engine {model['name']!r} did not wake within {timeout:.0f} s (it is "
                          f"{model['state']}; see %llm logs {model['name']})")
    if model["state"] != EngineState.READY:
        raise EngineFailed(f"engine {model['name']!r} did not wake: it is {model['state']}")
    return model


def relaunch_request(engine: Engine) -> LaunchRequest:
    """The launch request an unloaded engine was started with."""
    if not engine.request:
        raise Conflict(f"engine {engine.name!r} has no recorded launch request; start it again")
    return LaunchRequest(**engine.request)


def _made_room(cp, engine: Engine, made: list[str]) -> Engine:
    if not made:
        return engine
    return cp.registry.update(engine.id, note=f"made room by putting {', '.join(made)} away")


def _wake_quietly(cp, engine: Engine) -> None:
    try:
        cp.supervisor.idle.wake_up(engine)
    except EngineFailed:
        pass  # recorded on the engine as failed


def _relaunch(cp, engine_id: str, req: LaunchRequest, spec) -> Engine | None:
    """``unloaded → starting``, placed and booked in one transaction; ``None`` if another caller
    got there first."""
    with cp.registry.transaction() as txn:
        engine = txn.get(engine_id)
        if engine.state != EngineState.UNLOADED:
            return None
        engine.gpu_ids, engine.node, engine.device, engine.booked_mib, engine.note = [], None, "cpu", 0, None
        engine.host_mib = 0
        engine.max_model_len, engine.gpu_memory_utilization = req.max_model_len, None
        try:
            views = cp._placed(txn, engine, req, spec)
        except NoRoom as e:
            raise NoRoom(f"engine {engine.name!r} cannot wake: {e.message}") from None
        engine.port = ports.lease(txn, engine_id, cp.settings.port_range, req.port)
        cp._book_gpus(txn, engine, views)
        txn.save(engine)
        return txn.update(engine_id, state=EngineState.STARTING, wake_started_at=time.time(), pid=None,
                          create_time=None, launch_attempts=0, health_failures=0, error=None)


def _rebook(cp, engine_id: str) -> Engine | None:
    """``sleeping → waking`` with the booking grown back to what the engine had; :class:`Conflict`
    with the numbers when its GPUs no longer have the room. ``None`` if another caller got there first."""
    with cp.registry.transaction() as txn:
        engine = txn.get(engine_id)
        if engine.state != EngineState.SLEEPING:
            return None
        if engine.gpu_ids:
            per_gpu = engine.booked_mib // len(engine.gpu_ids)
            held = {index: mib for eid, index, _uuid, mib in txn.bookings() if eid == engine_id}
            views = {v.device.index: v for v in cp._views(txn)}
            short = [(g, per_gpu - held.get(g, 0)) for g in engine.gpu_ids
                     if g not in views or views[g].available_mib < per_gpu - held.get(g, 0)]
            if short:
                need = ", ".join(f"{mib} MiB more on GPU{g}" for g, mib in short)
                free = placement.describe([views[g] for g in engine.gpu_ids if g in views])
                raise NoRoom(f"engine {engine.name!r} cannot wake: it needs {need}; available: {free}")
            txn.resize_bookings(engine_id, per_gpu)
        return txn.update(engine_id, state=EngineState.WAKING, wake_started_at=time.time())
