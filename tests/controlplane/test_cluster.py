"""The Ray layer (issue 15): node agents and the cluster inventory, engine launcher actors, orphans.

One ``ray.cluster_utils.Cluster`` for the module: a head (no GPU) and two worker raylets with their
own fake inventories (node 1: GPU0 busy; node 2: two empty GPUs), all on loopback addresses."""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import psutil

from tests import raycluster
from tests.conftest import STUB_PATH, wait_for
from tests.raycluster import NODE2

ray_cluster = raycluster.ray_cluster  # the module's cluster


def test_without_ray_address_ray_is_never_imported(tmp_path):
    code = ("import sys\n"
            "import sage_nb.controlplane\n"
            "from sage_nb.controlplane import ControlPlane\n"
            f"ControlPlane(state_dir={str(tmp_path)!r}, monitor=False).close()\n"
            "import sage_nb.server, sage_nb.server.app\n"
            "sage_nb._jupyter_server_extension_points()\n"
            "assert 'ray' not in sys.modules, sorted(m for m in sys.modules if m.startswith('ray'))\n")
    env = {k: v for k, v in os.environ.items() if k != "SAGE_NB_RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stub_cmd(port: int) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "m", "--port", str(port),
            "--served-model-name", "m"]


def gone(pids) -> bool:
    return not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]


def test_cluster_inventory_lists_every_nodes_gpus(ray_cluster):
    from sage_nb.controlplane.cluster.agents import ClusterInventory

    inv = ClusterInventory(ray_cluster.address)
    devices = inv.devices()
    expected = sorted([(ray_cluster.n1, "GPU-n1-busy")] + [(ray_cluster.n2, f"GPU-n2-{i}") for i in range(2)])
    assert [(d.node, d.uuid) for d in devices] == expected
    assert [d.index for d in devices] == [0, 1, 2]
    busy = next(d for d in devices if d.node == ray_cluster.n1)
    assert (busy.used_mib, busy.gpu_index) == (59392, 0)
    assert inv.source == "fake" and inv.error is None
    assert all(inv.nodes[n]["address"] == "127.0.0.1" for n in (ray_cluster.n1, ray_cluster.n2))
    ours = {p.pid for p in psutil.Process().children(recursive=True)}  # the cluster's processes
    listening = {c.laddr.ip for c in psutil.net_connections("inet") if c.status == psutil.CONN_LISTEN and c.pid in ours}
    assert listening and all(_loopback(ip) for ip in listening), listening


def test_a_control_plane_with_a_ray_address_reads_the_cluster(ray_cluster, tmp_path):
    from sage_nb.controlplane import ControlPlane
    from sage_nb.controlplane.cluster.agents import ClusterInventory

    cp = ControlPlane(state_dir=tmp_path, ray_address=ray_cluster.address, monitor=False)
    try:
        assert isinstance(cp.inventory, ClusterInventory)
        report = cp.gpu_report()
        assert report["source"] == "fake" and [d["uuid"] for d in report["devices"]] == [
            d.uuid for d in cp.inventory.devices()]
        assert len(report["devices"]) == 3
    finally:
        cp.close()


def test_launcher_runs_engine_on_its_node_and_a_fresh_driver_stops_it(ray_cluster, tmp_path):
    from sage_nb.controlplane.cluster import raylaunch

    port = free_port()
    log = tmp_path / "e1.log"
    handle, info = raylaunch.launch("e1", ray_cluster.n2, 1, stub_cmd(port),
                                    {"PYTHONPATH": STUB_PATH, "SAGE_NB_ENGINE_ID": "e1"}, str(log))
    assert (info["node"], info["host"], info["alive"]) == (ray_cluster.n2, "127.0.0.1", True)
    proc = psutil.Process(info["pid"])
    assert os.getpgid(proc.pid) == proc.pid  # its own process group
    assert proc.environ()["SAGE_NB_FAKE_GPUS"] == json.dumps(NODE2)  # it runs under node 2's raylet
    assert "--host" in proc.cmdline() and proc.cmdline()[proc.cmdline().index("--host") + 1] == "127.0.0.1"
    wait_for(lambda: _health(info["host"], port), timeout=20)
    assert "e1" in raylaunch.list_launchers()

    # a fresh driver (as a restarted Jupyter server would be) finds it by name and stops the whole group
    code = ("import json, sys\n"
            "from sage_nb.controlplane.cluster import agents, raylaunch\n"
            f"agents.connect({ray_cluster.address!r})\n"
            "h = raylaunch.attach('e1')\n"
            "import ray\n"
            "print(json.dumps({'info': ray.get(h.info.remote()), 'left': raylaunch.stop('e1', grace=3)}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["info"]["pid"] == info["pid"] and out["left"] == []
    assert gone([info["pid"]])
    assert raylaunch.wait_gone("e1")


def test_stop_kills_the_whole_process_group(ray_cluster, tmp_path):
    import ray

    from sage_nb.controlplane.cluster import raylaunch

    sleeper = [sys.executable, "-c", "import subprocess, time; print('up', flush=True); "
               "subprocess.Popen(['sleep', '300']); time.sleep(300)", "--host", "0.0.0.0"]
    handle, info = raylaunch.launch("e2", ray_cluster.n1, 0, sleeper, {}, str(tmp_path / "e2.log"))
    assert info["node"] == ray_cluster.n1
    children = wait_for(lambda: psutil.Process(info["pid"]).children(recursive=True), timeout=10)
    assert ray.get(handle.alive.remote()) is True
    assert "up" in wait_for(lambda: ray.get(handle.log_tail.remote(5)), timeout=10)
    assert raylaunch.stop("e2", grace=2) == []
    assert gone([info["pid"]] + [c.pid for c in children])


def test_a_killed_launcher_leaves_an_orphan_that_is_found_and_reaped(ray_cluster, tmp_path):
    import ray

    from sage_nb.controlplane.cluster import raylaunch

    port = free_port()
    handle, info = raylaunch.launch("e3", ray_cluster.n1, 0, stub_cmd(port),
                                    {"PYTHONPATH": STUB_PATH, "SAGE_NB_ENGINE_ID": "e3"}, str(tmp_path / "e3.log"))
    wait_for(lambda: _health(info["host"], port), timeout=20)
    ray.kill(handle, no_restart=True)
    assert raylaunch.wait_gone("e3")
    time.sleep(0.5)
    assert not gone([info["pid"]])  # killing the actor alone leaves the engine running
    orphans = raylaunch.find_orphans()
    assert [(o["pid"], o["engine_id"], o["node"]) for o in orphans] == [(info["pid"], "e3", ray_cluster.n1)]
    assert raylaunch.reap_orphans(orphans, grace=2) == []
    assert gone([info["pid"]]) and raylaunch.find_orphans() == []


def test_a_removed_node_leaves_the_inventory(ray_cluster):
    from sage_nb.controlplane.cluster.agents import ClusterInventory

    inv = ClusterInventory(ray_cluster.address, timeout=2.0)
    assert len(inv.devices()) == 3
    start = time.monotonic()
    ray_cluster.cluster.remove_node(ray_cluster.node1)
    wait_for(lambda: [d.node for d in inv.devices()] == [ray_cluster.n2] * 2, timeout=10, interval=0.2)
    assert [d.index for d in inv.devices()] == [0, 1]
    assert time.monotonic() - start < 10


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)


def _health(host: str, port: int) -> bool:
    try:
        return httpx.get(f"http://{host}:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
