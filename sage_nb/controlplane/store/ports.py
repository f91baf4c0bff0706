"""Port leases: a port is handed to one engine at a time, checked by binding it."""

from __future__ import annotations

import socket

import psutil

from ..errors import Conflict
from .registry import Txn


def bindable(port: int, host: str = "127.0.0.1") -> bool:
    """True if ``host:port`` can be bound now (with SO_REUSEADDR, as uvicorn binds)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def listener(port: int) -> str:
    """Who listens on ``port``: ``"pid 123 (python ...)"``, or a plain note if unknown."""
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                try:
                    cmd = " ".join(psutil.Process(conn.pid).cmdline())[:80]
                except psutil.Error:
                    cmd = "?"
                return f"pid {conn.pid} ({cmd})"
    except (psutil.Error, OSError):
        pass
    return "another process"


def lease(txn: Txn, engine_id: str, port_range: tuple[int, int], requested: int | None = None,
          host: str = "127.0.0.1") -> int:
    """Lease ``requested`` (409 naming the holder if taken) or the first free port of the range."""
    leases = txn.leases()
    if requested is not None:
        holder_id = leases.get(requested)
        if holder_id is not None:
            try:
                holder = txn.get(holder_id)
                who = f"engine {holder.name!r} ({holder.id}, {holder.state})"
            except LookupError:
                who = f"engine {holder_id}"
            raise Conflict(f"port {requested} is already leased to {who}")
        if not bindable(requested, host):
            raise Conflict(f"port {requested} is in use by {listener(requested)}")
        txn.lease_port(requested, engine_id)
        return requested
    lo, hi = port_range
    for port in range(lo, hi + 1):
        if port not in leases and bindable(port, host):
            txn.lease_port(port, engine_id)
            return port
    raise Conflict(f"no free port left in {lo}-{hi}: {len(leases)} leased, the rest in use")
