"""Who started an engine, and engines tied to the kernel that started them (``scope="kernel"``).

Every engine records the kernel and notebook that started it (``kernel_id``, ``notebook``; the kernel
client fills them in, REST and Python callers may). ``scope="kernel"`` also ties the engine to that
kernel: when the kernel ends, the :class:`Supervisor`'s monitor stops the engine the ordinary way
(its tree killed, its port lease and GPU booking released, ``note`` saying why). A kernel-scoped
engine records what it takes to judge that later:

- the kernel's **process** (pid and start time), where the kernel runs on this machine: any control
  plane of the user (the server, an embedded kernel, a server started later) stops the engine in its
  next monitor pass once that process is gone;
- for a kernel of a Jupyter server, **which server** (its pid and start time) knows the kernel: that
  server also stops the engine once its kernel manager no longer lists the kernel id (shut down
  through ``/api/kernels``, culled, or a remote kernel whose process is not local).

A **kernel restart counts as the kernel's end**: the restarted kernel is a new process that holds
nothing the old one set up, and re-running the notebook starts its engine again; the engine is
stopped rather than left to be started a second time. It is stopped in every state, sleeping and
unloaded ones too (nothing would wake it for its kernel). A control plane that cannot judge — no
local kernel process recorded and not the server that knows the kernel — leaves the engine alone,
and engines of scope ``server`` are never touched. In embedded mode the kernel's own control plane
also stops its kernel-scoped engines when the kernel exits normally (``atexit``, unless it was
closed), so nothing waits for another control plane's pass; after a SIGKILL the next pass of any
control plane of the user does it (none running: the engine runs until one starts).
"""

from __future__ import annotations

import atexit
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import BadRequest, ControlPlaneError
from ..requests import LaunchRequest
from ..state import ENDED, STOPPABLE
from ..store.registry import Engine
from . import process

log = logging.getLogger(__name__)
SETTLE_S = 10.0  # how long a kernel its server still lists may be without a process (mid-restart)


@dataclass(frozen=True)
class KernelHost:
    """How a control plane knows kernels: a Jupyter server's kernel manager, or (embedded) the kernel
    process it runs in. ``knows(kernel_id)``: that kernel runs now; ``pid_of(kernel_id)``: its local
    process, ``None`` when it is not local; ``server``: a Jupyter server, which judges its own
    kernels by id."""

    knows: Callable[[str], bool]
    pid_of: Callable[[str], int | None]
    server: bool = False

    @classmethod
    def this_process(cls, kernel_id: str) -> KernelHost:
        """This process is kernel ``kernel_id`` (a kernel's embedded control plane)."""
        return cls(knows=lambda k: k == kernel_id, pid_of=lambda k: os.getpid() if k == kernel_id else None)


def started_from(engine: dict, kernel_id: str | None, notebook: str | None) -> bool:
    """Whether an engine's model was started by that kernel or from that notebook (``None``: unknown)."""
    return bool((kernel_id and engine.get("kernel_id") == kernel_id)
                or (notebook and engine.get("notebook") == notebook))


def process_identity(pid: int) -> str | None:
    """``"<pid>:<start time>"``: a process, told apart from a later one with the same pid."""
    started = process.start_time(pid)
    return None if started is None else f"{pid}:{started:.2f}"


class KernelScope:
    """Records who started an engine and stops kernel-scoped engines whose kernel is gone (one per
    :class:`Supervisor`; ``host`` is set by whoever knows kernels: the server extension, an embedded
    kernel's client)."""

    def __init__(self, supervisor) -> None:
        self.sup = supervisor
        self.host: KernelHost | None = None
        self._me: str | None = None  # this process, as a kernel-scoped engine records its server
        self._atexit = False
        self._unsure: dict[str, float] = {}  # engine id: since when its kernel is between two processes

    @property
    def me(self) -> str | None:
        if self._me is None:
            self._me = process_identity(os.getpid())
        return self._me

    def owner(self, req: LaunchRequest) -> dict:
        """The record fields of who starts an engine: :class:`BadRequest` for scope ``kernel`` and a
        kernel this control plane does not know."""
        fields = {"kernel_id": req.kernel_id, "notebook": req.notebook, "scope": req.scope,
                  "publisher": req.publisher}
        if req.scope != "kernel":
            return fields
        host = self.host
        if host is None or not host.knows(req.kernel_id):
            where = "this Jupyter server has" if host is not None and host.server else "this control plane knows"
            raise BadRequest(f"scope 'kernel': {where} no kernel {req.kernel_id!r}; start the engine from a "
                             "kernel of this server (%llm start ... --scope kernel), or use scope 'server'")
        pid = host.pid_of(req.kernel_id)
        started = process.start_time(pid)
        fields.update(kernel_pid=pid if started is not None else None, kernel_started=started,
                      kernel_server=self.me if host.server else None)
        if not host.server and not self._atexit:  # embedded: this kernel stops its own on a normal exit
            atexit.register(self.stop_own)
            self._atexit = True
        return fields

    def gone(self, engine: Engine) -> str | None:
        """Why a kernel-scoped engine must end now (its kernel is gone), or ``None``: not kernel-scoped,
        its kernel runs, or this control plane cannot judge it."""
        if engine.scope != "kernel" or engine.state not in STOPPABLE:  # stopping, stopped, failed: no
            return None
        host = self.host
        # this is the server whose kernel manager knows the kernel
        judge = (host is not None and host.server
                 and engine.kernel_server is not None and engine.kernel_server == self.me)
        if engine.kernel_pid and not process.is_alive(engine.kernel_pid, engine.kernel_started):
            now = host.pid_of(engine.kernel_id) if judge and host.knows(engine.kernel_id) else -1
            if now in (engine.kernel_pid, None):  # its server is between the old process and the next one
                first = self._unsure.setdefault(engine.id, time.monotonic())
                if time.monotonic() - first < SETTLE_S:  # (a restart or a shutdown): say which next pass
                    return None
            self._unsure.pop(engine.id, None)
            restarted = now not in (engine.kernel_pid, None, -1)
            return f"stopped: its kernel {engine.kernel_id} {'restarted' if restarted else 'shut down'}"
        if judge and not host.knows(engine.kernel_id):
            return f"stopped: its kernel {engine.kernel_id} shut down"
        return None

    def check(self, engines: list[Engine]) -> None:
        """One monitor pass: stop each kernel-scoped engine whose kernel is gone."""
        for engine in engines:
            why = self.gone(engine)
            if why is None:
                continue
            try:
                self.sup.stop(engine.id, note=why)
            except (ControlPlaneError, LookupError) as e:  # would not die (it is failed then), or pruned
                log.warning("sage_nb: could not stop kernel-scoped engine %s: %s", engine.name, e)

    def close(self) -> None:
        """A closed control plane stops nothing at exit (the next pass of another one still does)."""
        if self._atexit:
            atexit.unregister(self.stop_own)
            self._atexit = False

    def stop_own(self) -> None:
        """At the exit of an embedded kernel: stop the engines tied to this process."""
        me = os.getpid()
        try:
            for engine in self.sup.registry.engines():
                if engine.scope == "kernel" and engine.kernel_pid == me and engine.state not in ENDED:
                    self.sup.stop(engine.id, note=f"stopped: its kernel {engine.kernel_id} shut down")
        except Exception:  # at exit: never a traceback in the kernel's last words
            log.exception("sage_nb: stopping this kernel's engines failed")
