"""The engines of a Ray cluster's nodes, as the :class:`.Supervisor` sees them.

With ``ray_address`` set, an engine whose record has a ``node`` runs there under its launcher actor
(:mod:`.raylaunch`), not as a child of this process. :class:`NodeProcesses` is that one mechanism:
launch, liveness, stop, log tail, the engines of nodes that left the cluster, and orphans. The
Supervisor stays the one owner of the lifecycle and calls into it for those engines only.
"""

from __future__ import annotations

import os

from ..engines import process
from ..state import EngineState
from ..store.registry import Engine
from . import agents, raylaunch

WATCHED = (EngineState.STARTING, EngineState.READY, EngineState.SLEEPING)  # whose process a pass checks
CALL_TIMEOUT = 5.0  # a launcher that does not answer this fast is neither declared dead nor alive


class NodeProcesses:
    """Engine processes on the nodes of the Ray cluster this control plane is connected to."""

    def __init__(self, timeout: float = CALL_TIMEOUT, launch_timeout: float = 60.0) -> None:
        self.timeout = timeout
        self.launch_timeout = launch_timeout
        self._answers: dict[tuple[str, int], tuple[bool, int | None]] = {}  # this pass's, by (id, pid)

    @staticmethod
    def own_env(env: dict[str, str]) -> dict[str, str]:
        """The engine's own variables: what differs from this process's environment (the node lays
        them over its own, so this machine's environment does not travel)."""
        return {k: v for k, v in env.items() if os.environ.get(k) != v}

    def launch(self, engine: Engine, cmd: list[str], env: dict[str, str]) -> dict:
        """Start the engine on its node: the launcher's ``{pid, create_time, host, node, ...}``;
        ``RuntimeError`` saying why it could not."""
        try:
            _handle, info = raylaunch.launch(engine.id, engine.node, len(engine.gpu_ids), cmd, self.own_env(env),
                                             engine.log_path, timeout=self.launch_timeout)
        except Exception as e:  # Ray's errors (a dead node, a timeout) and the launcher's own
            raise RuntimeError(f"on node {engine.node[:8]}: {type(e).__name__}: {e}") from None
        return info

    def survey(self, engines: list[Engine]) -> list[Engine]:
        """At the start of a monitor pass, of these engines (with a node): those whose node left the
        cluster (:meth:`lost`); the launchers of the others' processes are asked all at once (one
        wait, one timeout), and :meth:`exit_state` uses each answer once."""
        lost = self.lost(engines)
        watched = [e for e in engines if e not in lost and e.pid is not None and e.state in WATCHED]
        self._answers = self.exit_states(watched) if watched else {}
        return lost

    def exit_state(self, engine: Engine) -> tuple[bool, int | None]:
        """Whether the engine's process is gone, and its exit status when its launcher knows it. A
        launcher that is gone counts as a gone engine; one that does not answer in time, not."""
        answer = self._answers.pop((engine.id, engine.pid), None)
        return answer if answer is not None else self.exit_states([engine])[(engine.id, engine.pid)]

    def exit_states(self, engines: list[Engine]) -> dict[tuple[str, int], tuple[bool, int | None]]:
        """:meth:`exit_state` of each engine, keyed by ``(id, pid)``, their launchers asked in parallel."""
        ray = agents.ray_module()
        answers, asked = {}, {}
        for engine in engines:
            key = (engine.id, engine.pid)
            try:
                handle = raylaunch.attach(engine.id)
            except ValueError:
                answers[key] = True, None
                continue
            except Exception:  # the cluster does not answer: nothing to conclude this pass
                answers[key] = False, None
                continue
            asked[key] = [handle.alive.remote(), handle.exit_code.remote()]
        refs = [r for pair in asked.values() for r in pair]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=self.timeout) if refs else ([], [])
        done = set(done)
        for key, (alive, code) in asked.items():
            if alive not in done or code not in done:
                answers[key] = False, None  # no answer in time
                continue
            try:
                answers[key] = not ray.get(alive), ray.get(code)
            except ray.exceptions.RayError:  # the actor died (its node with it)
                answers[key] = True, None
        return answers

    def info(self, engine: Engine) -> dict | None:
        """The launcher's ``{pid, create_time, host, ...}`` once it started the engine (else None)."""
        ray = agents.ray_module()
        try:
            info = ray.get(raylaunch.attach(engine.id).info.remote(), timeout=self.timeout)
        except (ValueError, ray.exceptions.RayError):
            return None
        return info if info["pid"] is not None else None

    def stop(self, engine: Engine, grace: float) -> list[int]:
        """Stop the engine's whole process group on its node; the pids still alive (same contract as
        :func:`.engines.process.kill_tree`). When its launcher is gone, the engine may run on as an orphan: it
        is found and reaped on its node by the node's agent (on a node that left the cluster the
        launcher's raylet watchdog ended it)."""
        ray = agents.ray_module()
        try:
            raylaunch.attach(engine.id)
        except ValueError:
            return self._reap(engine, grace)
        try:
            left = raylaunch.stop(engine.id, grace)
        except ray.exceptions.RayActorError:  # the launcher died meanwhile
            return self._reap(engine, grace)
        if not left:  # its name free again: a relaunch (a wake) must not find the dying launcher
            raylaunch.wait_gone(engine.id, self.timeout)
        return left

    @staticmethod
    def _reap(engine: Engine, grace: float) -> list[int]:
        if engine.node not in {n["node"] for n in agents.alive_nodes()}:
            return []
        found = [o for o in raylaunch.find_orphans([{"node": engine.node}]) if o["engine_id"] == engine.id]
        return raylaunch.reap_orphans(found, grace) if found else []

    def log_tail(self, engine: Engine, lines: int) -> str:
        """The tail of the engine's log, read on its node (the local file when the launcher is gone)."""
        ray = agents.ray_module()
        try:
            return ray.get(raylaunch.attach(engine.id).log_tail.remote(lines), timeout=self.timeout)
        except (ValueError, ray.exceptions.RayError):
            return process.log_tail(engine.log_path, lines)

    @staticmethod
    def lost(engines: list[Engine]) -> list[Engine]:
        """Of these engines (with a node), those whose node is no longer alive in the cluster."""
        if not engines:
            return []
        try:
            alive = {n["node"] for n in agents.alive_nodes()}
        except Exception:  # the cluster does not answer: no node is known to have left
            return []
        return [e for e in engines if e.node not in alive]

    @staticmethod
    def orphans() -> list[dict]:
        """Engine processes on the nodes whose launcher is gone (see :func:`.raylaunch.find_orphans`)."""
        return raylaunch.find_orphans()

    @staticmethod
    def reap(orphans: list[dict]) -> list[dict]:
        """Kill these orphans' process groups on their nodes; the orphans, each with ``"left"``: the
        pids still alive after."""
        left = raylaunch.reap_orphans(orphans) if orphans else []
        return [{**o, "left": left} for o in orphans]
