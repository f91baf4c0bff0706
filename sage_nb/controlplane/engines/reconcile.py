"""Reconciliation after a restart: which running vLLM server belongs to which record, which servers
are nobody's, and the record of a server that is adopted. Decisions only; the
:class:`~.supervisor.Supervisor` acts on them."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from ..state import LIVE, EngineState
from ..store import ports
from ..store.registry import Engine, Txn
from ..validation import clean_name
from . import probes
from .scan import FoundServer

SAME_START = 0.5  # seconds: a pid whose start time differs more is another process


@dataclass
class Match:
    """Records paired with the servers that run them, and the servers nobody owns."""

    running: dict[str, FoundServer] = field(default_factory=dict)  # engine id -> its server
    unowned: list[FoundServer] = field(default_factory=list)


def match(engines: list[Engine], servers: list[FoundServer], registry_path: str,
          adopt_unrecorded: bool) -> Match:
    """Pair records with servers: by the engine id the server carries in its environment, else by
    pid and start time. A server no record claims is *unowned* (adoptable) unless another sage_nb
    registry launched it, or it was started by hand and ``adopt_unrecorded`` is off."""
    by_pid = {s.pid: s for s in servers}
    by_engine_id = {s.engine_id: s for s in servers if s.engine_id}
    result, claimed = Match(), set()
    for engine in engines:
        found = by_engine_id.get(engine.id)
        if found is None and engine.pid in by_pid and engine.create_time is not None:
            candidate = by_pid[engine.pid]
            found = candidate if abs(candidate.create_time - engine.create_time) < SAME_START else None
        if found is not None:
            claimed.add(found.pid)
            result.running[engine.id] = found
    for server in servers:
        if server.pid in claimed or (server.registry and server.registry != registry_path):
            continue  # ours already, or launched by a sage_nb with another registry
        if not server.registry and not adopt_unrecorded:
            continue  # started by hand, and this control plane leaves those alone
        result.unowned.append(server)
    return result


def adopted_record(txn: Txn, server: FoundServer, kind: str, ready: bool, note: str,
                   registry_path: str) -> Engine | None:
    """Insert the record of an adopted server (inside the caller's transaction) and lease its port;
    ``None`` when a live record already owns its pid or port. Its name follows the rule of
    launched engines (``org/model:latest`` → ``model-latest``)."""
    for e in txn.engines():
        if e.pid == server.pid and e.state in LIVE:
            return None
    holder = txn.leases().get(server.port)
    if holder is not None:
        if txn.get(holder).state in LIVE:
            return None  # a live record owns that port; not ours to adopt
        txn.release_ports(holder)
    own = server.registry == registry_path and server.engine_id
    if own:  # our own engine whose record was lost (a corrupt registry): keep its id
        note = "re-adopted: its record was lost with the registry"
    ids = {e.id for e in txn.engines()}
    engine = Engine(
        id=server.engine_id if own and server.engine_id not in ids else uuid.uuid4().hex[:12],
        name=txn.unique_name(clean_name(server.served_model_name)), model=server.model,
        served_model_name=server.served_model_name, kind=kind,
        state=EngineState.READY if ready else EngineState.STARTING, pid=server.pid,
        create_time=server.create_time, port=server.port, host=server.host,
        api_key=server.api_key, gpu_ids=server.gpu_ids,
        device="cuda" if server.gpu_ids else "cpu",
        tensor_parallel_size=server.tensor_parallel_size, max_model_len=server.max_model_len,
        adopted=True, note=note, ready_at=time.time() if ready else None)
    txn.insert(engine)
    if server.port and not ports.bindable(server.port, server.host):
        txn.lease_port(server.port, engine.id)
    return engine


def adopt(registry, inventory, settings, server: FoundServer) -> str | None:
    """Record a vLLM server that sage_nb did not start; its kind comes from its flags and is
    confirmed by its route table. Returns the new id, or ``None`` if it was claimed meanwhile."""
    timeout = settings.probe_timeout
    probed = probes.kind_from_openapi(server.host, server.port, timeout)
    note = "adopted: a vLLM server started outside sage_nb"
    if probed and probed != server.kind:
        note += f"; its flags say {server.kind} but its routes say {probed}"
    ready = probes.ready(server.host, server.port, server.served_model_name, server.api_key, timeout)
    # its devices as the inventory numbers them, however its CUDA_VISIBLE_DEVICES names them
    server.gpu_ids = [d.index for d in inventory.resolve(server.cuda_visible, server.cuda_order)]
    with registry.transaction() as txn:
        engine = adopted_record(txn, server, probed or server.kind, ready, note, str(settings.db_path.resolve()))
    return engine.id if engine else None
