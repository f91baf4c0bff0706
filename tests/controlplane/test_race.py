"""Two processes starting engines at the same moment never share a port nor over-book a GPU."""

import json
import subprocess
import sys
import time

from sage_nb.controlplane import ControlPlane

from ..conftest import STUB_PATH

WORKER = r"""
import json, sys, time
from sage_nb.controlplane import ControlPlane, Conflict
state, model, gpus, stub, go = sys.argv[1:6]
cp = ControlPlane(state_dir=state, fake_gpus=gpus, engine_env={"PYTHONPATH": stub},
                  port_range=(18500, 18599), monitor=False)
while time.time() < float(go):
    time.sleep(0.001)
out = []
for i in range(4):
    try:
        e = cp.start_engine(model, wait=False)
        out.append({"id": e["id"], "port": e["port"], "gpus": e["gpu_ids"], "mib": e["booked_mib"]})
    except Conflict as exc:
        out.append({"refused": exc.message})
print(json.dumps(out))
"""

GPUS = [{"name": "A", "total_mib": 24576, "used_mib": 0}, {"name": "B", "total_mib": 24576, "used_mib": 0}]


def test_two_processes_race_for_ports_and_gpus(state_dir, model_dir):
    model = str(model_dir(8, max_pos=2048))  # ~10 GiB each: two fit per 24 GiB GPU
    go = str(time.time() + 2.0)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(state_dir), model, json.dumps(GPUS),
                               STUB_PATH, go], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    cp = ControlPlane(state_dir=state_dir, monitor=False, fake_gpus=GPUS)
    try:
        outputs = [p.communicate(timeout=120)[0] for p in procs]
        assert all(p.returncode == 0 for p in procs), outputs
        results = [json.loads(out) for out in outputs]
        started = [r for rs in results for r in rs if "id" in r]
        refused = [r for rs in results for r in rs if "refused" in r]
        assert len(started) == 4 and len(refused) == 4, results
        assert all("no GPU has room" in r["refused"] for r in refused)
        ports = [r["port"] for r in started]
        assert len(set(ports)) == len(ports)
        per_gpu = {0: 0, 1: 0}
        for r in started:
            per_gpu[r["gpus"][0]] += r["mib"]
        assert all(total <= 24576 for total in per_gpu.values()), per_gpu
        assert sorted(g["booked_mib"] for g in cp.gpus()) == sorted(per_gpu.values())
        assert {e["pid"] for e in cp.engines()}.__len__() == 4
    finally:
        cp.stop_all()
