"""Two registries (two users' servers, here of one uid) sharing one machine-wide ledger: concurrent
starts never over-book a GPU, each sees the other's bookings, and a killed engine's booking is
reaped by the next start. The same with real Unix users and servers: tests/server/test_multiuser.py."""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import psutil
import pytest

from sage_nb.controlplane import BadRequest, ControlPlane, NotFound
from sage_nb.controlplane.engines.process import group_members, is_alive
from sage_nb.controlplane.errors import NoRoom

from ..conftest import STUB_PATH, wait_for

# two 24 GiB GPUs; a 4 GiB model at max_model_len 1024 books 5761 MiB: four fit on each, eight in all
BOX = [{"name": "NVIDIA L4", "total_mib": 24576, "used_mib": 0, "uuid": "GPU-shared-0"},
       {"name": "NVIDIA L4", "total_mib": 24576, "used_mib": 0, "uuid": "GPU-shared-1"}]


def ledger_dir(tmp_path):
    path = tmp_path / "ledger"
    path.mkdir()
    os.chmod(path, 0o2770)
    return path


def control_plane(tmp_path, name: str, ledger, port_range) -> ControlPlane:
    return ControlPlane(state_dir=tmp_path / name, shared_ledger=str(ledger), fake_gpus=BOX, port_range=port_range,
                        engine_env={"PYTHONPATH": STUB_PATH}, adopt_unrecorded=False, health_interval=0.2)


def test_concurrent_starts_of_two_registries_never_over_book(tmp_path, model_dir):
    ledger = ledger_dir(tmp_path)
    a = control_plane(tmp_path, "alice", ledger, (18500, 18539))
    b = control_plane(tmp_path, "bob", ledger, (18540, 18579))
    model = str(model_dir(4))
    started, refused, errors = [], [], []

    def start(cp, i):
        try:
            started.append(cp.start_engine(model, name=f"e{i}", max_model_len=1024, wait=False))
        except NoRoom as e:
            refused.append(e.message)
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    try:
        threads = [threading.Thread(target=start, args=(a if i % 2 else b, i)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and len(started) == 8 and len(refused) == 12
        assert all("no GPU has room" in m for m in refused)
        for cp in (a, b):  # each sees all eight, the other's included
            gpus = cp.gpus()
            assert [g["booked_mib"] for g in gpus] == [4 * 5761, 4 * 5761]
            assert all(g["booked_mib"] <= g["total_mib"] for g in gpus)
        mine_a = {e["id"] for e in a.engines()}
        assert 0 < len(mine_a) < 8 and len(mine_a) + len(b.engines()) == 8  # split between the two

        # a's engines die without a word (its server SIGKILLed): b's next start reaps their bookings
        for e in a.engines():
            wait_for(lambda e=e: a.engine(e["id"])["pid"], timeout=10)
            for proc in group_members(a.engine(e["id"])["pid"]):
                proc.send_signal(signal.SIGKILL)
        a.close()
        wait_for(lambda: not any(is_alive(e.pid, e.create_time) for e in a.registry.engines()), timeout=10)
        e = b.start_engine(model, name="after", max_model_len=1024, wait=False)
        assert e["gpu_ids"] and [g["booked_mib"] for g in b.gpus()] != [4 * 5761, 4 * 5761]
        assert sum(g["booked_mib"] for g in b.gpus()) == (len(b.engines())) * 5761
    finally:
        for cp in (a, b):
            try:
                cp.stop_all()
            except NotFound:
                pass
            cp.close()


def test_gpus_attribute_memory_to_whoever_holds_it(tmp_path, model_dir):
    """This registry's engines by name, the other's by user and engine, another process by user and
    command (a fake inventory that lists it, as NVML lists processes), and what nothing accounts for."""
    other = subprocess.Popen(["sleep", "60"])
    box = [{**BOX[0], "used_mib": 20480 + 1024, "processes": [{"pid": other.pid, "used_mib": 20480}]}, BOX[1]]
    ledger = ledger_dir(tmp_path)
    a = ControlPlane(state_dir=tmp_path / "alice", shared_ledger=str(ledger), fake_gpus=box, port_range=(18580, 18589),
                     engine_env={"PYTHONPATH": STUB_PATH}, adopt_unrecorded=False)
    b = ControlPlane(state_dir=tmp_path / "bob", shared_ledger=str(ledger), fake_gpus=box, port_range=(18590, 18599),
                     engine_env={"PYTHONPATH": STUB_PATH}, adopt_unrecorded=False)
    try:
        mine = a.start_engine(str(model_dir(4)), name="alices", max_model_len=1024, gpu_ids=[1], wait=False)
        theirs = b.start_engine(str(model_dir(4)), name="bobs", max_model_len=1024, gpu_ids=[1], wait=False)
        gpu0, gpu1 = a.gpus()
        me = psutil.Process().username()
        assert gpu0["parts"]["processes"] == [{"pid": other.pid, "user": me, "command": "sleep", "used_mib": 20480}]
        assert gpu0["parts"]["unaccounted_mib"] == 1024 and gpu0["parts"]["mine"] == gpu0["parts"]["others"] == []
        assert [(x["name"], x["booked_mib"]) for x in gpu1["parts"]["mine"]] == [("alices", 5761)]
        assert [(x["user"], x["name"], x["engine_id"], x["booked_mib"]) for x in gpu1["parts"]["others"]] == [
            (me, "bobs", theirs["id"], 5761)]
        assert gpu1["parts"]["booked_unused_mib"] == 2 * 5761 and gpu1["parts"]["free_mib"] == 24576 - 2 * 5761
        assert [x["name"] for x in b.gpus()[1]["parts"]["others"]] == [mine["name"]]  # and the other way round
        with pytest.raises(BadRequest, match="processes must be a list"):
            ControlPlane(state_dir=tmp_path / "bad", fake_gpus=[{**BOX[0], "processes": [{"pid": "x"}]}])
    finally:
        other.kill()
        for cp in (a, b):
            cp.stop_all()
            cp.close()
