"""The GPUs of every node of a Ray cluster (the ``ray_address`` setting), read on each node.

Ray's scheduler counts whole GPUs, not free memory, so every node runs a small sage_nb agent: a
detached Ray actor named ``sage_nb-agent-<node id>`` in the namespace ``sage_nb``, claiming no CPU,
pinned to its node. It reads that node's GPUs with the same :class:`.GpuInventory` as one box (NVML,
or the node's own fake inventory in ``$SAGE_NB_FAKE_GPUS``) and finds the node's orphaned engine
processes; it answers plain dicts. :class:`ClusterInventory` asks every alive node's agent in parallel
and offers the interface of :class:`.GpuInventory`, with each device's ``node`` (the Ray node id) and
indices numbered across the cluster (nodes sorted by id, then each node's own order).

``ray`` is imported only here and in :mod:`.raylaunch`, and only when a cluster is used.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading

import psutil

from ..engines import process, scan
from ..gpus.inventory import GpuDevice, GpuInventory
from ..settings import parse_fake_gpus

NAMESPACE = "sage_nb"
AGENT_PREFIX = "sage_nb-agent-"
FAKE_ENV = "SAGE_NB_FAKE_GPUS"        # a node's fake inventory (tests), read by its agent
NODE_ENV = "SAGE_NB_RAY_NODE"         # set on engines a launcher started: their node ...
LAUNCHER_ENV = "SAGE_NB_RAY_LAUNCHER"  # ... and the name of their launcher actor
WAITER_MARK = "# sage_nb engine waiter"  # the first line of the program that waits for an engine
SOURCES = ("nvml", "fake", "none")    # a cluster's source: the first any node has


def ray_module():
    """``ray``, imported on first use (the ``ray`` extra)."""
    import ray

    return ray


def connect(address: str):
    """Connect this process to the cluster at ``address`` (``auto`` or host:port), once."""
    ray = ray_module()
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, ignore_reinit_error=True, log_to_driver=False)
    return ray


def alive_nodes() -> list[dict]:
    """The alive nodes: ``{"node": id hex, "address": its IP, "hostname", "gpus": GPUs it gives Ray}``."""
    return sorted(({"node": n["NodeID"], "address": n["NodeManagerAddress"],
                    "hostname": n.get("NodeManagerHostname", ""),
                    "gpus": int(n.get("Resources", {}).get("GPU", 0))}
                   for n in ray_module().nodes() if n.get("Alive")), key=lambda n: n["node"])


def pinned(node: str):
    """Ray scheduling strategy that places an actor on ``node`` and nowhere else."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node, soft=False)


def own_environment() -> dict[str, str]:
    """This node's environment for the processes an actor starts, without what Ray sets for the
    actor itself (its ``RAY_*`` variables and its ``CUDA_VISIBLE_DEVICES``)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k != "CUDA_VISIBLE_DEVICES"}


class NodeAgent:
    """The sage_nb agent of one node (run as a Ray actor, see :func:`agent`)."""

    def __init__(self) -> None:
        env = own_environment()  # Ray hides the node's GPUs from a GPU-less actor; the agent reads them all
        self.inventory = GpuInventory(parse_fake_gpus(env.get(FAKE_ENV)), environ=env)

    def gpus(self) -> dict:
        """``{"source", "error", "warning", "devices": [GpuDevice fields]}`` of this node."""
        devices = [dataclasses.asdict(d) for d in self.inventory.devices()]
        return {"source": self.inventory.source, "error": self.inventory.error,
                "warning": self.inventory.warning, "devices": devices}

    def orphans(self, live_launchers: list[str]) -> list[dict]:
        """Engine processes a launcher started on this node whose launcher actor is gone."""
        me, node, live = os.getuid(), ray_module().get_runtime_context().get_node_id(), set(live_launchers)
        found = []
        for proc in psutil.process_iter(["pid", "uids", "cmdline", "create_time"]):
            info = proc.info
            try:
                cmdline = info["cmdline"] or []
                if not info["uids"] or info["uids"].real != me or not cmdline:
                    continue
                if scan.parse_cmdline(cmdline) is None and not cmdline[0].startswith(process.VLLM_TITLE_PREFIX):
                    continue
                if any(arg.startswith(WAITER_MARK) for arg in cmdline[:3]):
                    continue  # the engine's waiter: the engine is what counts
                env = proc.environ()
                pgid = os.getpgid(proc.pid)
            except (psutil.Error, OSError):
                continue
            if env.get(NODE_ENV) == node and env.get(LAUNCHER_ENV) and env[LAUNCHER_ENV] not in live:
                found.append({"pid": proc.pid, "pgid": pgid, "create_time": info["create_time"], "node": node,
                              "launcher": env[LAUNCHER_ENV], "engine_id": env.get(scan.ENGINE_ID_ENV),
                              "cmdline": " ".join(cmdline)[:300]})
        return found

    def reap(self, orphans: list[dict], grace: float = 5.0) -> list[int]:
        """Kill the process groups of these orphans (from :meth:`orphans`); the pids still alive."""
        left: list[int] = []
        leaders = {o["pgid"]: o["create_time"] for o in orphans if o["pid"] == o["pgid"]}
        for pgid in sorted({o["pgid"] for o in orphans}):  # a leader's start time guards against pid reuse
            left += process.kill_tree(pgid, leaders.get(pgid), grace)
        return left


@functools.cache
def remote_class(cls):
    return ray_module().remote(cls)


def agent(node: str):
    """The agent of ``node`` (created on first use; detached, so later drivers find it by name)."""
    return remote_class(NodeAgent).options(
        name=AGENT_PREFIX + node, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1, scheduling_strategy=pinned(node)).remote()


class ClusterInventory:
    """The GPUs of every alive node, as :class:`.GpuInventory` offers those of one machine."""

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout  # how long a node's agent may take to answer
        self.error: str | None = None
        self.warning: str | None = None
        self.nodes: dict[str, dict] = {}  # node id -> alive_nodes() entry + its agent's source and error
        self._agents: dict[str, object] = {}
        self._lock = threading.Lock()
        connect(address)

    @property
    def source(self) -> str:
        """``"nvml"`` when any node reads NVML, else ``"fake"`` when any has a fake inventory, else ``"none"``."""
        if not self.nodes:
            self.devices()
        sources = {n.get("source") for n in self.nodes.values()}
        return next((s for s in SOURCES if s in sources), "none")

    def devices(self) -> list[GpuDevice]:
        """Every placement unit of every alive node whose agent answered in time."""
        ray = ray_module()
        nodes = alive_nodes()
        with self._lock:
            for gone in set(self._agents) - {n["node"] for n in nodes}:
                del self._agents[gone]
            for n in nodes:
                if n["node"] not in self._agents:
                    self._agents[n["node"]] = agent(n["node"])
            handles = dict(self._agents)
        refs = {handles[n["node"]].gpus.remote(): n for n in nodes}
        ready, _late = ray.wait(list(refs), num_returns=len(refs), timeout=self.timeout) if refs else ([], [])
        answers, problems = {}, {}
        for ref in ready:
            node = refs[ref]
            try:
                answers[node["node"]] = {**node, **ray.get(ref)}
            except Exception as e:  # the node died while answering, or its agent failed
                problems[node["node"]] = f"node {node['node'][:8]} ({node['address']}): {e}"
        for n in nodes:
            if n["node"] not in answers and n["node"] not in problems:
                problems[n["node"]] = f"node {n['node'][:8]} ({n['address']}) did not answer in {self.timeout:g} s"
        problems = list(problems.values())
        self.nodes = answers
        units, index = [], 0
        for node_id in sorted(answers):
            for fields in answers[node_id].pop("devices"):
                units.append(GpuDevice(**{**fields, "index": index, "node": node_id}))
                index += 1
        warnings = [f"node {n[:8]}: {a['warning']}" for n, a in answers.items() if a.get("warning")]
        self.warning = "; ".join(problems + warnings) or None
        self.error = None if units else ("; ".join(problems + [f"node {n[:8]}: {a['error'] or 'no GPU'}"
                                                                for n, a in answers.items()]) or "no node")
        return units

    def all_devices(self) -> list[GpuDevice]:
        return self.devices()

    def hidden(self) -> bool:
        """A cluster's nodes hide no GPU from this server (the ``gpus`` setting is per machine)."""
        return False

    def resolve(self, cuda_visible: str | None, order: str | None = None) -> list[GpuDevice]:
        """Devices named by a process's CUDA_VISIBLE_DEVICES: by UUID only (indices are per node)."""
        names = [n.strip() for n in (cuda_visible or "").split(",") if n.strip()]
        by_uuid = {d.uuid: d for d in self.devices()}
        return [by_uuid[n] for n in names if n in by_uuid]


def agents_of(nodes: list[dict] | None = None) -> dict[str, object]:
    """``{node id: its agent}`` of the given (default: every alive) node."""
    return {n["node"]: agent(n["node"]) for n in (nodes if nodes is not None else alive_nodes())}
