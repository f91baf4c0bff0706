"""Discovery after a restart: re-attach recorded engines, adopt unrecorded ones, fail the dead."""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from . import ports, probe, process
from .discovery import FoundServer, find_orphans, find_servers
from .errors import Conflict
from .health import _failure
from .registry import Engine
from .state import LIVE, EngineState

if TYPE_CHECKING:
    from .core import ControlPlane

S = EngineState


def rediscover(cp: ControlPlane) -> dict:
    """See :meth:`ControlPlane.discover`."""
    report: dict[str, list] = {"reattached": [], "adopted": [], "failed": [], "orphans": []}
    servers = find_servers()
    by_pid = {s.pid: s for s in servers}
    by_engine_id = {s.engine_id: s for s in servers if s.engine_id}
    claimed: set[int] = set()

    for engine in cp.registry.engines():
        found = by_engine_id.get(engine.id)
        if found is None and engine.pid in by_pid and engine.create_time is not None:
            candidate = by_pid[engine.pid]
            found = candidate if abs(candidate.create_time - engine.create_time) < 0.5 else None
        if found is not None:
            claimed.add(found.pid)
        if engine.state not in LIVE:
            continue
        if engine.pid is None and found is not None:  # launcher died before recording the pid
            engine = cp.registry.update(engine.id, pid=found.pid, create_time=found.create_time)
        if engine.state == S.STOPPING:  # its stopper died: finish the stop, whatever is left
            try:
                cp.stop_engine(engine.id)
            except Conflict:
                pass
            continue
        if process.is_alive(engine.pid, engine.create_time):
            report["reattached"].append(engine.id)
        elif (engine.pid is not None or time.time() - engine.created_at > 30) and cp.fail(
                engine.id, _failure(engine, "the engine process is gone (found at discovery)"),
                expect=LIVE):
            report["failed"].append(engine.id)

    mine = str(cp.settings.db_path.resolve())
    for server in servers:
        if server.pid in claimed or (server.registry and server.registry != mine):
            continue  # ours already, or launched by a sage_nb with another registry
        if not server.registry and not cp.settings.adopt_unrecorded:
            continue  # started by hand, and this control plane leaves those alone
        engine_id = adopt(cp, server)
        if engine_id:
            report["adopted"].append(engine_id)

    live_groups = {e.pid for e in cp.registry.engines() if e.pid}
    report["orphans"] = find_orphans(live_groups)
    cp.check_engines()
    return report


def adopt(cp: ControlPlane, server: FoundServer) -> str | None:
    """Record a vLLM server that sage_nb did not start; its kind comes from its flags and is
    confirmed by its route table. Returns the new id, or ``None`` if it was claimed meanwhile."""
    probed = probe.kind_from_openapi(server.host, server.port, cp.settings.probe_timeout)
    kind = probed or server.kind
    note = "adopted: a vLLM server started outside sage_nb"
    if probed and probed != server.kind:
        note += f"; its flags say {server.kind} but its routes say {probed}"
    ready = probe.ready(server.host, server.port, server.served_model_name, server.api_key,
                        cp.settings.probe_timeout)
    with cp.registry.transaction() as txn:
        for e in txn.engines():
            if e.pid == server.pid and e.state in LIVE:
                return None
        leases = txn.leases()
        holder = leases.get(server.port)
        if holder is not None:
            if txn.get(holder).state in LIVE:
                return None  # a live record owns that port; not ours to adopt
            txn.release_ports(holder)
        name = txn.unique_name(server.served_model_name.rstrip("/").split("/")[-1] or "engine")
        own = server.registry == str(cp.settings.db_path.resolve()) and server.engine_id
        if own:  # our own engine whose record was lost (a corrupt registry): keep its id
            note = "re-adopted: its record was lost with the registry"
        ids = {e.id for e in txn.engines()}
        engine = Engine(
            id=server.engine_id if own and server.engine_id not in ids else uuid.uuid4().hex[:12],
            name=name, model=server.model,
            served_model_name=server.served_model_name, kind=kind,
            state=(S.READY if ready else S.STARTING).value, pid=server.pid,
            create_time=server.create_time, port=server.port, host=server.host,
            api_key=server.api_key, gpu_ids=server.gpu_ids,
            device="cuda" if server.gpu_ids else "cpu",
            tensor_parallel_size=server.tensor_parallel_size, max_model_len=server.max_model_len,
            adopted=True, note=note, ready_at=time.time() if ready else None)
        txn.insert(engine)
        if server.port and not ports.bindable(server.port, server.host):
            txn.lease_port(server.port, engine.id)
    return engine.id
