"""Engines on the nodes of a Ray cluster (issue 15), driven by a ControlPlane with ``ray_address``: the
Supervisor launches, watches, stops and rediscovers them through their launcher actors. Stub engines;
one loopback Cluster for the module (``tests/raycluster.py``); the node removal comes last."""

from __future__ import annotations

import json
import sys
import time

import httpx
import psutil
import pytest

from sage_nb.controlplane.errors import NoRoom
from tests import raycluster
from tests.conftest import GIB, STUB_PATH, make_model_dir, wait_for
from tests.raycluster import NODE1

ray_cluster = raycluster.ray_cluster  # the module's cluster


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def control_plane(address: str, state_dir, port_range=(18600, 18699)):
    from sage_nb.controlplane import ControlPlane

    return ControlPlane(state_dir=state_dir, ray_address=address, engine_env={"PYTHONPATH": STUB_PATH},
                        health_interval=0.2, stop_grace=3.0, port_range=port_range, adopt_unrecorded=False)


def chat(cp, engine: dict, model: str | None = None) -> httpx.Response:
    return httpx.post(f"http://{engine['host']}:{engine['port']}/v1/chat/completions", timeout=10,
                      headers={"Authorization": f"Bearer {cp.api_key(engine['id'])}"},
                      json={"model": model or engine["name"], "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 4})


def bookings(cp, engine_id: str) -> list:
    with cp.registry.snapshot() as txn:
        return [b for b in txn.bookings() if b[0] == engine_id] + [e for e, p in txn.leases().items()
                                                                  if p == engine_id]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("cluster_engines")


def test_idle_engines_on_nodes_are_unloaded_and_woken_again(ray_cluster, shared):
    """Idle engines on a node: unloaded after their keep-alive (process gone on the node, booking
    released, record kept), woken by the one placement path, and unloaded on demand; its LoRA adapter is
    loaded again on the node each time it comes back (the stub's LoRA routes: a request for an adapter
    the engine does not hold is a 404, as vLLM's)."""
    from sage_nb.controlplane.cluster import raylaunch
    from tests.adapterfiles import fake_adapter

    small = make_model_dir(shared / "idle-model", GIB)
    cp = control_plane(ray_cluster.address, shared / "idle-state", port_range=(18500, 18599))
    try:
        idle = cp.start_engine(str(small), name="idle", keep_alive=2, timeout=60, lora=True)
        assert idle["node"] in (ray_cluster.n1, ray_cluster.n2)
        cp.load_adapter("mine", str(fake_adapter(shared / "mine")), engine="idle")
        # the record goes unloaded first; its pid is cleared once the process is gone from the node
        unloaded = wait_for(lambda: (e := cp.engine(idle["id"]))["state"] == "unloaded" and e["pid"] is None and e,
                            timeout=15)
        assert gone(idle["pid"]) and bookings(cp, idle["id"]) == []
        assert unloaded["name"] == "idle" and idle["id"] not in raylaunch.list_launchers()
        cp.registry.update(idle["id"], keep_alive=None)  # awake from now on, for the checks below

        woken = cp.wake_engine(idle["id"], timeout=60)  # the gateway's path
        assert woken["state"] == "ready" and woken["node"] in (ray_cluster.n1, ray_cluster.n2)
        assert woken["pid"] != idle["pid"]
        assert psutil.Process(woken["pid"]).environ()["SAGE_NB_RAY_NODE"] == woken["node"]
        assert bookings(cp, idle["id"]) and chat(cp, woken).status_code == 200
        assert chat(cp, woken, "mine").status_code == 200 and chat(cp, woken, "other").status_code == 404

        put = cp.sleep_engine(idle["id"], mode="unload")
        assert put["state"] == "unloaded" and gone(woken["pid"]) and bookings(cp, idle["id"]) == []
        again = cp.wake_engine(idle["id"], timeout=60)
        assert again["state"] == "ready" and chat(cp, again).status_code == 200
        assert chat(cp, again, "mine").status_code == 200
    finally:
        cp.stop_all()
        cp.close()
    assert raylaunch.find_orphans() == []


def test_engines_are_placed_launched_stopped_and_rediscovered_on_their_nodes(ray_cluster, shared):
    state = shared / "state"
    small = make_model_dir(shared / "small", GIB)
    cp = control_plane(ray_cluster.address, state)
    try:
        one = cp.start_engine(str(small), name="one", timeout=60)
        # best fit: node 1's busy GPU has just the room a small model needs
        uuid = next(d.uuid for d in cp.inventory.devices() if d.index == one["gpu_ids"][0])
        assert (one["node"], uuid, one["host"]) == (ray_cluster.n1, "GPU-n1-busy", "127.0.0.1")
        env = psutil.Process(one["pid"]).environ()
        assert env["SAGE_NB_RAY_NODE"] == ray_cluster.n1 and env["CUDA_VISIBLE_DEVICES"] == "GPU-n1-busy"
        assert env["SAGE_NB_FAKE_GPUS"] == json.dumps(NODE1)  # it runs under node 1's raylet
        answer = chat(cp, one)
        assert answer.status_code == 200, answer.text
        assert isinstance(cp.logs(one["id"]), str)

        two = cp.start_engine(str(small), name="two", tensor_parallel_size=2, timeout=60)
        assert two["node"] == ray_cluster.n2 and len(two["gpu_ids"]) == 2
        with pytest.raises(NoRoom) as refused:
            cp.start_engine(str(make_model_dir(shared / "huge", 200 * GIB)), name="huge", timeout=60)
        message = refused.value.message  # the free memory of every node
        assert f"node {ray_cluster.n1}" in message and f"node {ray_cluster.n2}" in message, message
    finally:
        cp.close()

    # a new control plane on the same state (a restarted server) finds both again, same ids
    cp = control_plane(ray_cluster.address, state)
    try:
        # as if the server had died between the launch and its record: no pid, the host not yet the node's
        cp.registry.update(two["id"], pid=None, create_time=None, host="127.0.0.2")
        report = cp.discover()
        assert sorted(report["reattached"]) == sorted([one["id"], two["id"]]) and not report["failed"], report
        assert (cp.engine(two["id"])["pid"], cp.engine(two["id"])["host"]) == (two["pid"], "127.0.0.1")
        cp.check_engines()
        assert cp.engine(one["id"])["state"] == "ready" and cp.engine(two["id"])["state"] == "ready"

        stopped = cp.stop_engine(one["id"])
        assert stopped["state"] == "stopped" and gone(one["pid"]) and bookings(cp, one["id"]) == []

        # an engine whose launcher actor died: failed, and what runs on of it is reaped on its node
        # before its booking is released (by the monitor or by discovery, whichever comes first)
        import ray

        from sage_nb.controlplane.cluster import raylaunch

        three = cp.start_engine(str(small), name="three", timeout=60)
        ray.kill(raylaunch.attach(three["id"]), no_restart=True)
        assert raylaunch.wait_gone(three["id"])
        cp.discover()
        assert cp.engine(three["id"])["state"] == "failed"
        assert gone(three["pid"]) and bookings(cp, three["id"]) == []
        assert raylaunch.find_orphans() == []

        # an engine process no record knows whose launcher is gone: reported by discovery and reaped
        api = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "m", "--port", "18698"]
        handle, stray = raylaunch.launch("stray", ray_cluster.n1, 0, api, {"PYTHONPATH": STUB_PATH},
                                         str(shared / "stray.log"))
        ray.kill(handle, no_restart=True)
        assert raylaunch.wait_gone("stray")
        report = cp.discover()
        assert [(o["pid"], o["engine_id"]) for o in report["orphans"] if "node" in o] == [(stray["pid"], None)]
        wait_for(lambda: gone(stray["pid"]), timeout=10)

        # node 2 leaves the cluster: its engine fails within about 10 s, booking released, nothing left
        start = time.monotonic()
        ray_cluster.cluster.remove_node(ray_cluster.node2)
        failed = wait_for(lambda: cp.engine(two["id"])["state"] == "failed" and cp.engine(two["id"]), timeout=15)
        assert time.monotonic() - start < 12, time.monotonic() - start
        assert "left the Ray cluster" in failed["error"]
        assert bookings(cp, two["id"]) == []
        wait_for(lambda: gone(two["pid"]), timeout=10)
    finally:
        cp.stop_all()
        cp.close()
