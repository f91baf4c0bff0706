"""Idle engines over the stub engine: keep-alive expiry, unload and relaunch, sleep and wake on a
fake inventory (bookings shrink and come back), refused wakes, shared wakes, bad keep-alive values.
The real-engine versions are in tests/server/test_idle_vllm.py."""

import threading
import time

import psutil
import pytest

from sage_nb.controlplane import BadRequest, Conflict, LaunchRequest
from sage_nb.controlplane.engines import probes
from sage_nb.controlplane.engines.process import group_members
from sage_nb.controlplane.store.ports import bindable

from ..conftest import STUB_PATH, leases, wait_for

BOX = [{"name": "NVIDIA A100-SXM4-80GB", "total_mib": 81920, "used_mib": 0, "uuid": "GPU-a"}]
SMALL = [{"name": "NVIDIA A10", "total_mib": 10240, "used_mib": 0, "uuid": "GPU-s"}]  # one 5761 MiB engine


def test_keep_alive_expiry_unloads_and_a_wake_relaunches_with_the_same_identity(stub_cp, model_dir):
    cp = stub_cp(keep_alive="1s")
    e = cp.start_engine(str(model_dir(1)), name="napper")
    assert e["keep_alive"] == 1.0 and e["idle_at"] == pytest.approx(e["ready_at"] + 1.0, abs=0.01)
    pids, port = group_members(e["pid"]), e["port"]
    # unloaded at once (no request goes to it), done when its processes are gone (dormant_since)
    unloaded = wait_for(lambda: (x := cp.engine("napper"))["dormant_since"] and x, timeout=10)
    assert unloaded["state"] == "unloaded"
    assert not any(p.is_running() for p in pids)
    assert bindable(port) and leases(cp) == ({}, [])
    assert unloaded["pid"] is None and unloaded["port"] is None and unloaded["dormant_since"]
    assert [x["name"] for x in cp.engines()] == ["napper"]  # still listed
    assert cp.backends()["llm_backends"] == []
    key = cp.api_key("napper")
    woke = cp.wake_engine("napper")
    assert woke["state"] == "ready" and woke["id"] == e["id"]
    assert woke["served_model_name"] == e["served_model_name"] and cp.api_key("napper") == key
    assert woke["pid"] != e["pid"] and woke["wake_started_at"] is None
    assert cp.backends()["llm_backends"][0]["id"] == e["id"]


def test_use_keeps_an_engine_awake(stub_cp, model_dir):
    cp = stub_cp()
    e = cp.start_engine(str(model_dir(1)), name="busy", keep_alive=1.5)
    for _ in range(8):  # 2.4 s of use, each within the keep-alive
        cp.note_use(e["id"])
        time.sleep(0.3)
    assert cp.engine("busy")["state"] == "ready"
    assert cp.engine("busy")["last_used_at"] > e["ready_at"]  # the monitor wrote the use back
    cp.usage.begin(e["id"])  # a request in flight longer than the keep-alive
    time.sleep(2.5)
    assert cp.engine("busy")["state"] == "ready"
    cp.usage.end(e["id"])
    wait_for(lambda: cp.engine("busy")["state"] == "unloaded", timeout=10)


def test_forever_is_the_default_and_can_be_changed_on_a_running_engine(stub_cp, model_dir):
    cp = stub_cp()
    e = cp.start_engine(str(model_dir(1)), name="keeper")
    assert e["keep_alive"] is None and e["idle_at"] is None
    assert cp.set_keep_alive("keeper", "30m")["keep_alive"] == 1800
    assert cp.set_keep_alive("keeper", -1)["keep_alive"] is None
    for bad in ("abc", -5, 1e99, True, "10 parsecs"):
        with pytest.raises(BadRequest, match="keep_alive"):
            cp.set_keep_alive("keeper", bad)
    assert cp.engine("keeper")["keep_alive"] is None  # nothing half-changed
    for bad in ("abc", -5, 1e99):
        with pytest.raises(BadRequest, match="keep_alive"):
            LaunchRequest(model=str(model_dir(1)), keep_alive=bad)
    assert LaunchRequest.from_body({"model": str(model_dir(1)), "keep_alive": None}).keep_alive_s(60) is None
    assert LaunchRequest(model=str(model_dir(1))).keep_alive_s(60) == 60
    assert LaunchRequest(model=str(model_dir(1)), keep_alive="1h30m").keep_alive_s(None) == 5400
    assert len(cp.engines()) == 1


def test_a_cpu_engine_cannot_sleep_but_unloads(stub_cp, model_dir):
    cp = stub_cp()
    cp.start_engine(str(model_dir(1)), name="cpu")
    with pytest.raises(BadRequest, match="not launched with vLLM's sleep mode"):
        cp.sleep_engine("cpu", "sleep")
    assert cp.engine("cpu")["state"] == "ready"
    assert cp.sleep_engine("cpu")["state"] == "unloaded"  # auto
    with pytest.raises(Conflict, match="only a ready engine"):
        cp.sleep_engine("cpu")
    assert cp.stop_engine("cpu")["state"] == "stopped"  # stop works from unloaded too
    assert cp.prune() and cp.engines() == []


def test_sleep_shrinks_the_booking_and_wake_grows_it_back(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=BOX, sleep_mode="on")
    e = cp.start_engine(str(model_dir(4)), name="sleeper")
    assert e["device"] == "cuda" and e["sleep_mode"]
    full = e["booked_mib"]
    asleep = cp.sleep_engine("sleeper")
    assert asleep["state"] == "sleeping" and asleep["sleep_level"] == 1
    assert leases(cp)[1] == [(e["id"], 0, "GPU-a", 1536)]
    assert asleep["pid"] == e["pid"] and group_members(e["pid"])  # the process stays
    assert cp.gpus()[0]["booked_mib"] == 1536
    woke = cp.wake_engine("sleeper")
    assert woke["state"] == "ready" and woke["pid"] == e["pid"] and woke["sleep_level"] is None
    assert leases(cp)[1] == [(e["id"], 0, "GPU-a", full)]


def test_a_wake_that_no_longer_fits_is_refused_with_the_numbers(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=SMALL, sleep_mode="on")
    cp.start_engine(str(model_dir(4)), name="big", max_model_len=1024)
    assert cp.sleep_engine("big", "sleep")["state"] == "sleeping"
    cp.start_engine(str(model_dir(4)), name="newcomer", max_model_len=1024)  # takes the room the sleeper gave back
    before = leases(cp)
    with pytest.raises(Conflict, match=r"engine 'big' cannot wake: it needs \d+ MiB more on GPU0; "
                                       r"available: GPU0 \d+ MiB"):
        cp.wake_engine("big")
    assert cp.engine("big")["state"] == "sleeping" and leases(cp) == before  # nothing changed
    cp.stop_engine("newcomer")
    assert cp.wake_engine("big")["state"] == "ready"


def test_an_unloaded_engine_that_no_longer_fits_is_refused(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=SMALL)
    cp.start_engine(str(model_dir(4)), name="big", max_model_len=1024)
    assert cp.sleep_engine("big", "unload")["state"] == "unloaded"
    cp.start_engine(str(model_dir(4)), name="newcomer", max_model_len=1024)
    with pytest.raises(Conflict, match="engine 'big' cannot wake: no GPU has room"):
        cp.wake_engine("big")
    assert cp.engine("big")["state"] == "unloaded" and len(leases(cp)[1]) == 1


def test_concurrent_wakes_share_one(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=BOX, sleep_mode="on", engine_env={"PYTHONPATH": STUB_PATH, "STUB_WAKE_MS": "300"})
    cp.start_engine(str(model_dir(4)), name="shared")
    cp.sleep_engine("shared")
    results, errors = [], []

    def wake():
        try:
            results.append(cp.wake_engine("shared")["state"])
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=wake) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and results == ["ready"] * 20
    engine = cp.registry.find("shared")
    assert probes.get(engine.host, engine.port, "/is_sleeping", engine.api_key).json() == {
        "is_sleeping": False, "wakes": 1}


def test_make_room_puts_the_least_recently_used_idle_engine_away(stub_cp, model_dir):
    box = [{"name": "NVIDIA A4000", "total_mib": 16384, "used_mib": 0, "uuid": "GPU-m"}]  # two 5761 MiB engines
    cp = stub_cp(fake_gpus=box, sleep_mode="on", make_room=True)
    first = cp.start_engine(str(model_dir(4)), name="first", max_model_len=1024, keep_alive="1h")
    cp.note_use(first["id"])
    second = cp.start_engine(str(model_dir(4)), name="second", max_model_len=1024, keep_alive="1h")
    assert cp.engine("first")["state"] == "ready"  # it fitted beside: nothing put away
    cp.note_use(second["id"])  # now "first" is the least recently used
    third = cp.start_engine(str(model_dir(4)), name="third", max_model_len=1024)
    assert cp.engine("first")["state"] == "sleeping" and cp.engine("second")["state"] == "ready"
    assert "made room by putting first (sleeping) away" in third["note"]
    # a wake that needs room puts the next least recently used away; one kept forever is never touched
    cp.set_keep_alive("third", -1)
    woke = cp.wake_engine("first")
    assert woke["state"] == "ready" and "second (sleeping)" in woke["note"]
    assert cp.engine("third")["state"] == "ready"


def test_without_make_room_or_idle_engines_a_start_is_refused(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=SMALL, sleep_mode="on")
    cp.start_engine(str(model_dir(4)), name="first", max_model_len=1024, keep_alive="1h")
    with pytest.raises(Conflict, match="no GPU has room"):
        cp.start_engine(str(model_dir(4)), name="second", max_model_len=1024)
    assert cp.engine("first")["state"] == "ready"
    cp = stub_cp(fake_gpus=SMALL, sleep_mode="on", make_room=True)  # a second control plane, same registry
    cp.set_keep_alive("first", None)  # kept forever: not to be put away
    with pytest.raises(Conflict, match="no GPU has room.*; no idle engine could make room"):
        cp.start_engine(str(model_dir(4)), name="second", max_model_len=1024)
    assert [e["name"] for e in cp.engines()] == ["first"] and cp.engine("first")["state"] == "ready"


def test_stop_and_prune_work_from_sleeping_and_unloaded_and_discovery_keeps_them(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=BOX, sleep_mode="on")
    asleep = cp.start_engine(str(model_dir(1)), name="asleep")
    cp.start_engine(str(model_dir(1)), name="away")
    cp.sleep_engine("asleep", "sleep")
    cp.sleep_engine("away", "unload")
    again = stub_cp(fake_gpus=BOX, sleep_mode="on")  # a restarted server on the same registry
    report = again.discover()
    assert asleep["id"] in report["reattached"] and report["failed"] == []
    assert again.engine("asleep")["state"] == "sleeping" and again.engine("away")["state"] == "unloaded"
    tree = group_members(asleep["pid"])
    assert again.stop_engine("asleep")["state"] == "stopped"
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]  # cp's own child: unreaped
    assert again.stop_engine("away")["state"] == "stopped"
    ids = sorted(e["id"] for e in again.engines())
    assert sorted(again.prune()) == ids and again.engines() == [] and leases(again) == ({}, [])


def test_an_engine_that_refuses_to_sleep_stays_ready_and_is_not_asked_every_pass(stub_cp, model_dir, monkeypatch):
    cp = stub_cp(fake_gpus=BOX, sleep_mode="on", monitor=False)
    e = cp.start_engine(str(model_dir(1)), name="insomniac", keep_alive=30)
    calls = []
    real = probes.call

    def refuse(host, port, method, path, *args, **kwargs):
        if path.startswith("/sleep"):
            calls.append(path)
            return probes.Reply(500, b'{"error": "CUDA error"}')
        return real(host, port, method, path, *args, **kwargs)

    monkeypatch.setattr(probes, "call", refuse)
    with pytest.raises(Conflict, match="did not go to sleep .*HTTP 500.*it stays ready"):
        cp.sleep_engine("insomniac", "sleep")
    after = cp.engine("insomniac")
    assert after["state"] == "ready" and after["note"].startswith("sleep refused")
    assert leases(cp)[1][0][3] == e["booked_mib"]  # the booking never shrank
    assert after["last_used_at"] > e["ready_at"] and after["idle_at"] > time.time() + 25  # a fresh keep-alive
