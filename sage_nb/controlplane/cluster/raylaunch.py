"""Engines started on the nodes of a Ray cluster, each by its own detached launcher actor.

The actor ``sage_nb-engine-<engine id>`` (namespace ``sage_nb``, no CPU, pinned to the chosen node,
holding as many of Ray's GPUs as the engine uses when the node gives Ray GPUs) starts the engine
command in its own process group and owns it: ``alive``, ``stop`` (TERM, grace, KILL of the whole group,
verified) and ``log_tail``. A restarted driver finds it again with :func:`attach`. Killing the actor
alone leaves the engine running (it is in its own session): :func:`find_orphans` reports such engines
and :func:`reap_orphans` kills them, through the node's agent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..engines import process
from .agents import (
    LAUNCHER_ENV,
    NAMESPACE,
    NODE_ENV,
    WAITER_MARK,
    agents_of,
    alive_nodes,
    own_environment,
    pinned,
    remote_class,
)
from .agents import ray_module as _ray

ENGINE_PREFIX = "sage_nb-engine-"
# Ray SIGKILLs an actor's direct children when the actor dies, which would kill the api_server and
# leave its EngineCore holding GPU memory. So the actor starts this waiter, which starts the engine in
# its own session, says its pid, and waits for it (its exit status becomes the waiter's): if the actor
# dies, only the waiter is killed and the whole engine runs on, an orphan that find_orphans reports.
# The waiter also starts a watchdog (its own session too) that kills the engine's group when the node's
# raylet is gone: the node left the cluster, and no one could reach (or reap) the engine any more.
WAITER = (f"{WAITER_MARK}\nimport os, subprocess, sys\n"
          "p = subprocess.Popen(sys.argv[3:], start_new_session=True, stdin=subprocess.DEVNULL,"
          " stdout=int(sys.argv[1]), stderr=subprocess.STDOUT)\n"
          "if sys.argv[2] != '0':\n"
          "    subprocess.Popen([sys.executable, '-c', sys.argv[0] and WATCHDOG, sys.argv[2], str(p.pid)],"
          " start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
          "os.write(1, b'%d\\n' % p.pid)\n"
          "os.close(1)\n"
          "code = p.wait()\n"
          "sys.exit(code if code >= 0 else 128 - code)\n")
WATCHDOG = ("# sage_nb engine watchdog\nimport os, signal, sys, time\n"
            "raylet, group = int(sys.argv[1]), int(sys.argv[2])\n"
            "def there(kill, target):\n"
            "    try:\n"
            "        kill(target, 0)\n"
            "        return True\n"
            "    except ProcessLookupError:\n"
            "        return False\n"
            "    except PermissionError:\n"
            "        return True\n"
            "def up(pid):\n"  # a zombie raylet (killed, not yet reaped) is gone too
            "    try:\n"
            "        with open('/proc/%d/stat' % pid) as f:\n"
            "            return f.read().rsplit(')', 1)[1].split()[0] not in 'ZX'\n"
            "    except OSError:\n"
            "        return False\n"
            "while there(os.killpg, group):\n"
            "    if not up(raylet):\n"
            "        for sig in (signal.SIGTERM, signal.SIGKILL):\n"
            "            try:\n"
            "                os.killpg(group, sig)\n"
            "            except ProcessLookupError:\n"
            "                break\n"
            "            time.sleep(3)\n"
            "        break\n"
            "    time.sleep(0.5)\n")
WAITER = WAITER.replace("sys.argv[0] and WATCHDOG", repr(WATCHDOG))


def with_host(cmd: list[str], host: str) -> list[str]:
    """``cmd`` with its ``--host`` (either form) set to ``host``, added when missing."""
    out, i, found = [], 0, False
    while i < len(cmd):
        arg = cmd[i]
        if arg == "--host" and i + 1 < len(cmd):
            out += ["--host", host]
            i, found = i + 2, True
            continue
        if arg.startswith("--host="):
            arg, found = f"--host={host}", True
        out.append(arg)
        i += 1
    return out if found else out + ["--host", host]


class EngineLauncher:
    """Starts and owns one engine's process group on its node (run as a Ray actor, see :func:`launcher`)."""

    def __init__(self, engine_id: str) -> None:
        ray = _ray()
        self.engine_id = engine_id
        self.node = ray.get_runtime_context().get_node_id()
        self.host = ray.util.get_node_ip_address()  # the node's cluster address
        self.popen: subprocess.Popen | None = None
        self.pid: int | None = None
        self.create_time: float | None = None
        self.log_path: str | None = None
        self._lock = threading.Lock()

    def launch(self, cmd: list[str], env: dict[str, str], log_path: str, cwd: str | None = None) -> dict:
        """Start ``cmd`` listening on this node's address, in a new session, its output appended to
        ``log_path`` on this node. ``env``: the engine's own variables, laid over this node's
        environment (``CUDA_VISIBLE_DEVICES`` only when ``env`` gives it)."""
        with self._lock:
            if self._alive():
                raise RuntimeError(f"engine {self.engine_id} already runs here (pid {self.pid})")
            full = {**own_environment(), **env, NODE_ENV: self.node, LAUNCHER_ENV: ENGINE_PREFIX + self.engine_id}
            path = Path(log_path)
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            argv = [str(fd), os.environ.get("RAY_RAYLET_PID", "0"), *with_host(list(cmd), self.host)]
            try:
                self.popen = subprocess.Popen([sys.executable, "-c", WAITER, *argv],
                                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=fd,
                                              pass_fds=(fd,), env=full, cwd=cwd, start_new_session=True)
            finally:
                os.close(fd)
            said = self.popen.stdout.readline().strip()  # '' when the command could not start
            self.popen.stdout.close()
            self.log_path = str(path)
            if not said:
                self.popen.wait()
                raise RuntimeError(f"engine {self.engine_id} did not start: {process.log_tail(path, 5).strip()}")
            self.pid = int(said)
            self.create_time = process.start_time(self.pid)
            return self.info()

    def info(self) -> dict:
        """``{pid, create_time, host, node, log_path, alive}`` (pid None before a launch)."""
        return {"engine_id": self.engine_id, "pid": self.pid, "create_time": self.create_time, "host": self.host,
                "node": self.node, "log_path": self.log_path, "alive": self._alive()}

    def alive(self) -> bool:
        return self._alive()

    def exit_code(self) -> int | None:
        """The engine's exit status once it ended, 128+N for signal N (None while it runs, if it was
        never started, or while its waiter has not noticed yet)."""
        return self.popen.poll() if self.popen is not None else None

    def _alive(self) -> bool:
        if self.popen is not None:
            self.popen.poll()  # reap our own child so it does not linger as a zombie
        return process.is_alive(self.pid, self.create_time)

    def stop(self, grace: float = 15.0) -> list[int]:
        """TERM the engine's process group, KILL what is left after ``grace``, and return the pids
        still alive (empty: the whole group is verified gone)."""
        with self._lock:
            return process.kill_tree(self.pid, self.create_time, grace, self.popen)

    def log_tail(self, lines: int = 40) -> str:
        return process.log_tail(self.log_path, lines)


def launcher(engine_id: str, node: str, gpus: int = 0):
    """The launcher actor of ``engine_id`` on ``node`` (created unless it exists). It holds ``gpus`` of
    Ray's GPUs when the node gives Ray that many (a fake inventory gives Ray none: then it holds none)."""
    given = next((n["gpus"] for n in alive_nodes() if n["node"] == node), None)
    if given is None:
        raise RuntimeError(f"Ray node {node} is not alive")
    return remote_class(EngineLauncher).options(
        name=ENGINE_PREFIX + engine_id, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, num_gpus=gpus if 0 < gpus <= given else 0, max_restarts=0, max_concurrency=4,
        scheduling_strategy=pinned(node)).remote(engine_id)


def attach(engine_id: str):
    """The launcher actor of ``engine_id`` (``ValueError`` when it is gone)."""
    return _ray().get_actor(ENGINE_PREFIX + engine_id, namespace=NAMESPACE)


def launch(engine_id: str, node: str, gpus: int, cmd: list[str], env: dict[str, str], log_path: str,
           cwd: str | None = None, timeout: float = 60.0) -> tuple[object, dict]:
    """Start an engine on ``node``: ``(its launcher actor, launch()'s dict)``."""
    handle = launcher(engine_id, node, gpus)
    return handle, _ray().get(handle.launch.remote(list(cmd), dict(env), str(log_path), cwd), timeout=timeout)


def stop(engine_id: str, grace: float = 15.0) -> list[int]:
    """Stop an engine's whole process group on its node, then end its launcher; the pids still
    alive (then the launcher is kept, to try again). A launcher already gone stops nothing: its
    process, if any, is an orphan (:func:`find_orphans`)."""
    ray = _ray()
    try:
        handle = attach(engine_id)
    except ValueError:
        return []
    left = ray.get(handle.stop.remote(grace), timeout=grace + 30)
    if not left:
        ray.kill(handle, no_restart=True)
    return left


def list_launchers() -> list[str]:
    """The engine ids of every live launcher actor (for rediscovery after a restart)."""
    names = _ray().util.list_named_actors(all_namespaces=True)
    return sorted(n["name"][len(ENGINE_PREFIX):] for n in names
                  if n.get("namespace") == NAMESPACE and n["name"].startswith(ENGINE_PREFIX))


def find_orphans(nodes: list[dict] | None = None, timeout: float = 10.0) -> list[dict]:
    """Engine processes (``api_server``, ``VLLM::``) that a launcher started and whose launcher is gone,
    on every (or the given) node: ``{pid, pgid, create_time, node, launcher, engine_id, cmdline}``."""
    ray = _ray()
    live = [ENGINE_PREFIX + e for e in list_launchers()]
    refs = [a.orphans.remote(live) for a in agents_of(nodes).values()]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout) if refs else ([], [])
    return [o for ref in ready for o in ray.get(ref)]


def reap_orphans(orphans: list[dict], grace: float = 5.0) -> list[int]:
    """Kill the process groups of these orphans on their nodes; the pids still alive."""
    ray, by_node = _ray(), {}
    for o in orphans:
        by_node.setdefault(o["node"], []).append(o)
    agents = agents_of([{"node": n} for n in by_node])
    return [p for n, items in by_node.items() for p in ray.get(agents[n].reap.remote(items, grace),
                                                                 timeout=grace + 30)]


def wait_gone(engine_id: str, timeout: float = 10.0) -> bool:
    """Wait until the launcher actor's name is free again (after ``ray.kill``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine_id not in list_launchers():
            return True
        time.sleep(0.1)
    return False
