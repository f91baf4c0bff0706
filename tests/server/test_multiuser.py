"""Two real Unix users on one box, each running their own ``jupyter server`` with sage_nb under their
own uid, share one machine-wide GPU ledger (made with ``python -m sage_nb.admin init-shared``) and the
same fake GPU inventory:

- 20 concurrent starts split between them never over-book a GPU, and each user's ``gpus`` shows the
  other's bookings attributed to that user (stand-in engines, as in the load test);
- a real vLLM engine of one user is the other's as "alice's", its memory blocks the other's start
  with the numbers, and the other can neither stop, read, wake nor call it, nor read its key;
- after SIGKILL of the owner's server and engine, the other's next start reaps the stale booking.

CI runs as root, which can make users; the users run a copy of this Python that they can reach
(see tests/multiuser.py), as a real multi-user install keeps its environment world-readable.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from sage_nb.controlplane import ControlPlane
from sage_nb.controlplane.engines.process import group_members
from sage_nb.controlplane.store.ledger import SharedLedger

from ..conftest import GIB, make_model_dir, wait_for
from ..multiuser import make_group, make_user, remove_user, users_python
from ..multiuser import user_server as users_server
from ..serverproc import wait_ready

# two 24 GiB GPUs; a 4 GiB model at max_model_len 1024 books 5761 MiB: four fit on each, eight in all
BOX = [{"name": "NVIDIA L4", "total_mib": 24576, "used_mib": 0, "uuid": "GPU-box-0"},
       {"name": "NVIDIA L4", "total_mib": 24576, "used_mib": 0, "uuid": "GPU-box-1"}]


@pytest.fixture(scope="module")
def box():
    """A world-reachable folder with the users' Python, a group, two users in it, and the ledger."""
    root = Path(tempfile.mkdtemp(prefix="sage-multiuser-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    group = make_group()
    users = []
    try:
        env = users_python(root / "env")
        users = [make_user(group, root / "home") for _ in range(2)]
        ledger = root / "ledger"
        done = subprocess.run([sys.executable, "-m", "sage_nb.admin", "init-shared", str(ledger), "--group", group],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        yield {"root": root, "env": env, "users": users, "ledger": ledger, "group": group}
    finally:
        for user in users:
            remove_user(user)
        subprocess.run(["groupdel", group], check=False)
        subprocess.run(["rm", "-rf", str(root)], check=False)


@contextmanager
def user_server(box, user, gpus, name: str, port_range, stub: bool):
    """``user``'s own jupyter server (under their uid) on the shared ledger and the fake ``gpus``."""
    with users_server(box["env"], user, name, port_range, {"shared_ledger": str(box["ledger"])}, gpus,
                      stub) as server:
        yield server


def parts(server) -> list[dict]:
    code, report = server.get("sage_nb/api/gpus")
    assert code == 200, report
    return report["devices"]


def engines(server) -> list[dict]:
    return server.get("sage_nb/api/engines")[1]


def test_concurrent_starts_of_two_users_never_over_book_and_each_sees_the_other(box):
    alice, bob = box["users"]
    model = make_model_dir(box["root"] / "model-4g", 4 * GIB)
    subprocess.run(["chmod", "-R", "a+rX", str(model)], check=True)
    with user_server(box, alice, BOX, "stub", (18600, 18639), stub=True) as a, \
            user_server(box, bob, BOX, "stub", (18640, 18679), stub=True) as b:
        results: list[tuple[str, int, dict]] = []
        barrier = threading.Barrier(20)

        def start(server, who, i):
            barrier.wait()
            code, body = server.request("POST", "sage_nb/api/engines",
                                        {"model": str(model), "name": f"e{i}", "max_model_len": 1024})
            results.append((who, code, body))

        threads = [threading.Thread(target=start, args=((a, "alice", i) if i % 2 else (b, "bob", i)))
                   for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        started = [(who, body) for who, code, body in results if code == 202]
        refused = [body["message"] for _, code, body in results if code == 409]
        assert len(started) == 8 and len(refused) == 12, results
        assert all("no GPU has room" in m for m in refused)

        # each user books in the one ledger: per GPU, every user's bookings together fit the GPU
        for device in parts(a):
            p = device["parts"]
            assert sum(e["booked_mib"] for e in p["mine"] + p["others"]) <= device["total_mib"]
        # a user who got nothing in the burst starts one the other frees, so both directions are seen
        for server, other, who in ((a, b, "alice"), (b, a, "bob")):
            if not any(w == who for w, _ in started):
                victim = next(body for w, body in started if w != who)
                assert other.request("DELETE", f"sage_nb/api/engines/{victim['id']}")[0] == 200
                assert other.request("POST", "sage_nb/api/engines/prune", {})[0] == 200  # its record too
                code, body = server.request("POST", "sage_nb/api/engines",
                                            {"model": str(model), "name": "late", "max_model_len": 1024})
                assert code == 202, body
                started = [s for s in started if s[1]["id"] != victim["id"]] + [(who, body)]

        for server, who, user, other_user in ((a, "alice", alice, bob), (b, "bob", bob, alice)):
            mine = {body["name"] for w, body in started if w == who}
            theirs = {body["name"] for w, body in started if w != who}
            devices = parts(server)
            assert {e["name"] for d in devices for e in d["parts"]["mine"]} == mine
            assert {(e["user"], e["name"]) for d in devices for e in d["parts"]["others"]} == \
                {(other_user.name, n) for n in theirs}
            # the stand-ins run under their owner's uid: each user's engines are theirs
            for e in engines(server):
                e = wait_ready(server, e["id"], timeout=60)
                assert psutil.Process(e["pid"]).uids().real == user.uid

        # a user's gateway serves their own engines only: another's served name is a 404 naming theirs
        own = next(body for w, body in started if w == "bob")
        alices = next(body for w, body in started if w == "alice")
        code, body = b.request("POST", "sage_nb/v1/chat/completions",
                               {"model": alices["served_model_name"], "messages": [{"role": "user", "content": "x"}]})
        assert code == 404 and own["served_model_name"] in body["error"]["message"], body
        assert a.request("POST", "sage_nb/v1/chat/completions",
                         {"model": alices["served_model_name"], "messages": [{"role": "user", "content": "x"}],
                          "max_tokens": 2})[0] == 200

        for server in (a, b):
            for e in engines(server):
                assert server.request("DELETE", f"sage_nb/api/engines/{e['id']}")[0] == 200
        assert all(not d["parts"]["mine"] and not d["parts"]["others"] for d in parts(a))


def tiny_booking(tiny_llama, tmp_path) -> int:
    """What the tiny Llama books on a GPU (as the servers will compute it)."""
    cp = ControlPlane(state_dir=tmp_path / "plan", fake_gpus=[{**BOX[0], "total_mib": 81920}], monitor=False)
    try:
        return cp.plan(str(tiny_llama), max_model_len=512)["booked_mib"]
    finally:
        cp.close()


@pytest.mark.vllm
def test_a_real_engine_is_its_owners_and_its_stale_booking_is_reaped_by_another(box, tiny_llama, tmp_path):
    alice, bob = box["users"]
    model = box["root"] / "tiny-llama"
    if not model.exists():
        subprocess.run(["cp", "-r", str(tiny_llama), str(model)], check=True)
        subprocess.run(["chmod", "-R", "a+rX", str(model)], check=True)
    need = tiny_booking(model, tmp_path)
    one_gpu = [{**BOX[0], "uuid": "GPU-one", "total_mib": need * 3 // 2}]  # room for one such engine
    start = {"model": str(model), "name": "tiny", "max_model_len": 512}
    with user_server(box, alice, one_gpu, "real", (18680, 18689), stub=False) as a, \
            user_server(box, bob, one_gpu, "real", (18690, 18699), stub=False) as b:
        code, mine = a.request("POST", "sage_nb/api/engines", start)
        assert code == 202, mine
        mine = wait_ready(a, mine["id"])
        assert psutil.Process(mine["pid"]).uids().real == alice.uid
        assert a.request("POST", "sage_nb/v1/chat/completions",
                         {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})[0] == 200

        # the ledger every user of the group reads holds who, what and how much: never her engine's
        # key or its log path
        key = Path(f"/proc/{mine['pid']}/environ").read_bytes().split(b"VLLM_API_KEY=")[1].split(b"\0")[0]
        rows = SharedLedger(box["ledger"]).bookings()
        assert [(r["owner"], r["owner_uid"], r["engine_name"], r["mib"], r["pid"]) for r in rows] == \
            [(alice.name, alice.uid, "tiny", need, mine["pid"])]
        assert len(key) >= 16 and key.decode() not in json.dumps(rows) and mine["log_path"] not in json.dumps(rows)
        assert bob.run("head", "-c", "15", str(box["ledger"] / "ledger.sqlite3")).stdout == "SQLite format 3"

        # bob sees it as alice's, with its MiB; his own start does not fit beside it
        (device,) = parts(b)
        assert device["parts"]["mine"] == []
        assert [(e["user"], e["name"], e["booked_mib"]) for e in device["parts"]["others"]] == \
            [(alice.name, "tiny", need)]
        code, body = b.request("POST", "sage_nb/api/engines", start)
        assert code == 409 and "no GPU has room" in body["message"] and f"{need} MiB" in body["message"], body

        # ... and cannot touch it: no route of his server reaches another user's engine
        eid = mine["id"]
        for method, path in (("GET", f"engines/{eid}"), ("DELETE", f"engines/{eid}"), ("GET", f"engines/{eid}/logs"),
                             ("POST", f"engines/{eid}/sleep"), ("POST", f"engines/{eid}/wake")):
            code, body = b.request(method, f"sage_nb/api/{path}", {} if method == "POST" else None)
            assert code == 404, (method, path, code, body)
        code, body = b.request("POST", "sage_nb/v1/chat/completions",
                               {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]})
        assert code == 503 and "No LLM backend" in body["error"]["message"], body
        # the engine itself asks for its key, which bob cannot read: not in the registry (0600 in a 0700
        # folder), not in the log, not in the engine's environment
        direct = bob.run("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST",
                         f"http://127.0.0.1:{mine['port']}/v1/chat/completions")
        assert direct.stdout == "401", direct
        registry = a.state_dir / "registry.sqlite3"
        assert oct(registry.stat().st_mode & 0o777) == "0o600" and registry.stat().st_uid == alice.uid
        for path in (registry, Path(mine["log_path"]), Path(f"/proc/{mine['pid']}/environ")):
            denied = bob.run("cat", str(path))
            assert denied.returncode != 0 and "Permission denied" in denied.stderr, (path, denied)
        assert alice.run("head", "-c", "1", str(registry)).returncode == 0

        # alice's server and engine die without a word; bob's next start reaps her booking and fits
        tree = group_members(mine["pid"])
        a.kill()
        os.killpg(mine["pid"], signal.SIGKILL)
        wait_for(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in tree), 10)
        code, body = b.request("POST", "sage_nb/api/engines", start)
        assert code == 202, body
        (device,) = parts(b)
        assert device["parts"]["others"] == [] and [e["name"] for e in device["parts"]["mine"]] == ["tiny"]
        assert b.request("DELETE", f"sage_nb/api/engines/{body['id']}")[0] == 200
