"""Load and concurrency with real processes on loopback (bounded in count and time).

Lightweight stub engines stand in for vLLM: the point is the control plane and the gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest

from sage_nb.controlplane import ControlPlane

from ..conftest import STUB_PATH
from ..serverproc import TOKEN, Server, free_port, wait_ready

GPUS = [{"name": "A", "total_mib": 40960, "used_mib": 0}, {"name": "B", "total_mib": 40960, "used_mib": 8192}]
KERNEL = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
from sage_nb.controlplane import ControlPlaneError
from sage_nb.kernel.client import Client
state, model, gpus, stub, go, n = sys.argv[1:7]
client = Client(embedded=True, state_dir=state, fake_gpus=gpus, engine_env={"PYTHONPATH": stub},
                port_range=(18400, 18499), monitor=False)
def one(i):
    try:
        e = client.start(model, wait=False)
        return {"id": e["id"], "port": e["port"], "gpus": e["gpu_ids"], "mib": e["booked_mib"]}
    except ControlPlaneError as exc:
        return {"refused": exc.message, "status": exc.status}
while time.time() < float(go):
    time.sleep(0.001)
with ThreadPoolExecutor(8) as pool:
    print(json.dumps(list(pool.map(one, range(int(n))))))
"""


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path, tmp_path / "state", free_port(), port_range=(18400, 18499),
                 extra_args=[f"--SageNBApp.fake_gpus={json.dumps(GPUS)}",
                             f"--SageNBApp.engine_env={json.dumps({'PYTHONPATH': STUB_PATH})}"])
    srv.start()
    yield srv
    if srv.proc.poll() is None:
        srv.kill()
    cp = ControlPlane(state_dir=srv.state_dir, monitor=False)
    cp.stop_all()
    cp.close()
    cp.close()


def test_50_concurrent_starts_from_three_processes(server, model_dir):
    model = str(model_dir(4, max_pos=2048))  # ~5.5 GiB each: 13 fit on the two GPUs
    go = time.time() + 3
    kernels = [subprocess.Popen([sys.executable, "-c", KERNEL, str(server.state_dir), model, json.dumps(GPUS),
                                 STUB_PATH, str(go), "17"], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    from concurrent.futures import ThreadPoolExecutor

    def over_rest(i):
        code, body = server.request("POST", "sage_nb/api/engines", {"model": model})
        return {"id": body["id"], "port": body["port"], "gpus": body["gpu_ids"], "mib": body["booked_mib"]} \
            if code == 202 else {"refused": body["message"], "status": code}

    while time.time() < go:
        time.sleep(0.001)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(over_rest, range(16)))
    for k in kernels:
        out, _ = k.communicate(timeout=120)
        assert k.returncode == 0
        results += json.loads(out)
    assert len(results) == 50
    started = [r for r in results if "id" in r]
    refused = [r for r in results if "refused" in r]
    assert started and refused and len(started) + len(refused) == 50
    assert all(r["status"] == 409 and "no GPU has room" in r["refused"] for r in refused), refused[:3]
    ports = [r["port"] for r in started]
    assert len(ports) == len(set(ports))  # no port handed out twice
    for index, gpu in enumerate(GPUS):
        booked = sum(r["mib"] for r in started if r["gpus"] == [index])
        assert booked <= gpu["total_mib"] - gpu["used_mib"]  # no GPU over-booked
    listed = server.get("sage_nb/api/engines")[1]
    assert sorted(e["id"] for e in listed) == sorted(r["id"] for r in started)
    print(f"50 concurrent starts from 3 processes: {len(started)} started on {len(set(ports))} distinct "
          f"ports, {len(refused)} refused with 409")


async def _hammer(url: str, model: str, total: int, concurrency: int, on_half) -> Counter:
    """POST ``total`` chat requests with ``concurrency`` keep-alive connections; count the outcomes."""
    statuses: Counter = Counter()
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30, headers={"Authorization": f"token {TOKEN}"}) as http:
        async def worker():
            nonlocal sent
            while sent < total:
                sent += 1
                if sent == total // 2:
                    on_half()
                try:
                    r = await http.post(url, json={"model": model, "messages": []})
                    statuses[r.status_code] += 1
                except httpx.HTTPError as e:
                    statuses[type(e).__name__] += 1

        await asyncio.gather(*[worker() for _ in range(concurrency)])
    return statuses


def test_10000_requests_across_two_replicas_one_killed_midway(server, model_dir):
    model = str(model_dir(1))
    engines = []
    for _ in range(2):  # two replicas of one model: the gateway matches the model field to both
        code, e = server.request("POST", "sage_nb/api/engines", {"model": model})
        assert code == 202
        engines.append(wait_ready(server, e["id"]))
    t0 = time.monotonic()
    statuses = asyncio.run(_hammer(server.url + "sage_nb/v1/chat/completions", model, 10_000, 64,
                                   lambda: os.kill(engines[0]["pid"], signal.SIGKILL)))
    elapsed = time.monotonic() - t0
    assert sum(statuses.values()) == 10_000, statuses  # none lost silently
    assert set(statuses) <= {200, 502, 503, 504}, statuses  # success or a clear gateway error
    assert statuses[200] >= 9_000, statuses
    deadline = time.monotonic() + 10
    while True:
        backends = server.get("sage_nb/api/backends")[1]["llm_backends"]
        if [b["inflight"] for b in backends] == [0]:  # the dead replica is gone, the counters are 0
            break
        assert time.monotonic() < deadline, backends
        time.sleep(0.2)
    print(f"10,000 requests at c=64 in {elapsed:.1f} s: {dict(statuses)}")
