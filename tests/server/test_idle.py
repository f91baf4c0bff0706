"""Idle engines through the server: REST sleep/wake/PATCH keep_alive, the gateway waking a sleeping
or unloaded engine on request (one shared wake, refused or failed wakes as 503s naming the engine),
Jupyter's activity tracking, and rediscovery of a sleeping engine. Engines are the stub, which
emulates vLLM's sleep mode; the control-plane-level versions are in tests/controlplane/test_idle.py."""

import asyncio
import json
import time
from datetime import datetime

import pytest

from sage_nb.controlplane import ControlPlane
from sage_nb.controlplane.engines import probes
from sage_nb.controlplane.routing.router import RECHECK_S
from sage_nb.controlplane.store.ports import bindable

from ..conftest import STUB_PATH, leases
from .test_rest import call, error, wait_state

pytestmark = pytest.mark.usefixtures("cleanup_engines")

BOX = [{"name": "NVIDIA A100-SXM4-80GB", "total_mib": 81920, "used_mib": 0, "uuid": "GPU-a"}]
SMALL = [{"name": "NVIDIA A10", "total_mib": 10240, "used_mib": 0, "uuid": "GPU-s"}]  # one 5761 MiB engine
PORTS = [18940, 18999]
RESIDUAL = 1536
WAKE_MS = 300
CHAT = ("v1", "chat", "completions")

on_box = pytest.mark.parametrize("fake_gpus", [json.dumps(BOX)], ids=["box"])
on_small = pytest.mark.parametrize("fake_gpus", [json.dumps(SMALL)], ids=["small"])


@pytest.fixture
def stub_env():
    """Extra environment of this test's stub engines."""
    return {}


@pytest.fixture
def jp_server_config(state_dir, fake_gpus, stub_env):
    return {
        "ServerApp": {"jpserver_extensions": {"sage_nb": True, "jupyter_server_terminals": False},
                      "allow_unauthenticated_access": False},
        "SageNBApp": {"state_dir": str(state_dir), "health_interval": 0.2, "port_range": PORTS,
                      "fake_gpus": fake_gpus, "sleep_mode": "on", "adopt_unrecorded": False,
                      "engine_env": {"PYTHONPATH": STUB_PATH, "STUB_WAKE_MS": str(WAKE_MS), **stub_env}},
    }


async def start(jp_fetch, model, **body):
    _, e = await call(jp_fetch, "api", "engines", method="POST", body={"model": str(model), **body})
    return await wait_state(jp_fetch, e["id"])


async def sleep(jp_fetch, engine_id, mode="sleep"):
    return await call(jp_fetch, "api", "engines", engine_id, "sleep", method="POST", body={"mode": mode})


async def booked(jp_fetch) -> int:
    _, report = await call(jp_fetch, "api", "gpus")
    assert report["source"] == "fake"
    return report["devices"][0]["booked_mib"]


def chat_body(model, **kw):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


def stub_state(state_dir, engine: dict) -> dict:
    """What the stub itself says about its sleep (``/is_sleeping``, behind the engine's key)."""
    cp = ControlPlane(state_dir=state_dir, monitor=False, use_nvml=False)
    try:
        key = cp.api_key(engine["id"])
    finally:
        cp.close()
    reply = probes.get(engine["host"], engine["port"], "/is_sleeping", key)
    assert reply.status == 200, reply
    return reply.json()


# ---------------------------------------------------------------------- the gateway wakes sleepers
@on_box
async def test_concurrent_requests_to_a_sleeping_engine_share_one_wake(jp_fetch, jp_serverapp, model_dir,
                                                                       state_dir):
    e = await start(jp_fetch, model_dir(4), name="sleeper")
    assert e["device"] == "cuda" and e["sleep_mode"] and e["gpu_ids"] == [0]
    full = e["booked_mib"]
    assert full > RESIDUAL and await booked(jp_fetch) == full
    code, asleep = await sleep(jp_fetch, e["id"])
    assert code == 200 and asleep["state"] == "sleeping" and asleep["sleep_level"] == 1
    assert asleep["pid"] == e["pid"] and asleep["port"] == e["port"]  # the process stays
    assert await booked(jp_fetch) == RESIDUAL
    assert stub_state(state_dir, e) == {"is_sleeping": True, "wakes": 0}
    _, backends = await call(jp_fetch, "api", "backends")
    assert backends["llm_backends"] == []  # not routable while asleep

    t0 = time.monotonic()
    replies = await asyncio.gather(*[call(jp_fetch, *CHAT, method="POST", body=chat_body("sleeper"))
                                     for _ in range(20)])
    took = time.monotonic() - t0
    assert [code for code, _ in replies] == [200] * 20
    assert {r["served_by"] for _, r in replies} == {e["port"]} and {r["model"] for _, r in replies} == {"sleeper"}
    assert took >= WAKE_MS / 1000  # held until the wake was done
    assert jp_serverapp.web_app.settings["sage_nb_waker"].wakes == 1
    assert stub_state(state_dir, e) == {"is_sleeping": False, "wakes": 1}  # one /wake_up for all 20
    _, awake = await call(jp_fetch, "api", "engines", e["id"])
    assert awake["state"] == "ready" and awake["pid"] == e["pid"] and awake["sleep_level"] is None
    assert awake["wake_started_at"] is None and awake["dormant_since"] is None
    assert await booked(jp_fetch) == full
    assert not jp_serverapp.web_app.settings["sage_nb_waker"].pending
    assert not any(jp_serverapp.web_app.settings["sage_nb_router"].inflight.values())


@on_box
async def test_a_stream_to_a_sleeping_engine_streams_every_chunk_after_the_wake(jp_fetch, model_dir, state_dir):
    e = await start(jp_fetch, model_dir(4), name="streamer")
    assert (await sleep(jp_fetch, e["id"]))[1]["state"] == "sleeping"
    chunks = []
    resp = await jp_fetch("sage_nb", *CHAT, method="POST", body=json.dumps(chat_body("streamer", stream=True)),
                          streaming_callback=chunks.append)
    assert resp.code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    data = [line[len("data: "):] for line in b"".join(chunks).decode().splitlines() if line.startswith("data:")]
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert [ev["choices"][0]["delta"]["content"] for ev in events] == ["part0", "part1", "part2"]
    assert {ev["served_by"] for ev in events} == {e["port"]}
    assert (await call(jp_fetch, "api", "engines", e["id"]))[1]["state"] == "ready"
    assert stub_state(state_dir, e)["wakes"] == 1


@on_small
async def test_a_wake_that_no_longer_fits_is_a_503_with_the_numbers(jp_fetch, model_dir):
    a = await start(jp_fetch, model_dir(4), name="big", max_model_len=1024)
    assert a["booked_mib"] == 5761
    assert (await sleep(jp_fetch, a["id"]))[1]["state"] == "sleeping"
    b = await start(jp_fetch, model_dir(4), name="newcomer", max_model_len=1024)  # takes the room given back
    assert b["gpu_ids"] == [0] and await booked(jp_fetch) == RESIDUAL + 5761
    code, message = await error(jp_fetch, *CHAT, method="POST", body=chat_body("big"))
    assert code == 503, message
    assert "engine 'big'" in message and "cannot wake" in message and "MiB" in message
    assert f"{5761 - RESIDUAL} MiB more on GPU0" in message, message
    _, still = await call(jp_fetch, "api", "engines", a["id"])
    assert still["state"] == "sleeping" and still["wake_started_at"] is None
    assert await booked(jp_fetch) == RESIDUAL + 5761  # nothing half-booked
    # the other model is still served; once it is gone the sleeper wakes on request
    code, reply = await call(jp_fetch, *CHAT, method="POST", body=chat_body("newcomer"))
    assert code == 200 and reply["served_by"] == b["port"]
    await call(jp_fetch, "api", "engines", b["id"], method="DELETE")
    code, reply = await call(jp_fetch, *CHAT, method="POST", body=chat_body("big"))
    assert code == 200 and reply["served_by"] == a["port"]
    assert await booked(jp_fetch) == 5761


@on_box
@pytest.mark.parametrize("stub_env", [{"STUB_WAKE_FAIL": "1"}], ids=["wake_fails"])
async def test_a_wake_that_fails_fails_the_engine(jp_fetch, model_dir, state_dir):
    # through the gateway: the request gets a 503 naming the engine, the engine is failed
    e = await start(jp_fetch, model_dir(4), name="grumpy")
    assert (await sleep(jp_fetch, e["id"]))[1]["state"] == "sleeping"
    code, message = await error(jp_fetch, *CHAT, method="POST", body=chat_body("grumpy"))
    assert code == 503 and "engine 'grumpy'" in message and "did not wake" in message, message
    _, failed = await call(jp_fetch, "api", "engines", e["id"])
    assert failed["state"] == "failed" and "wake_up failed" in failed["error"], failed
    assert failed["gpu_ids"] == [0] and await booked(jp_fetch) == 0  # what it held is released
    # through REST: 202 at once, then failed
    e2 = await start(jp_fetch, model_dir(4), name="grumpier")
    assert (await sleep(jp_fetch, e2["id"]))[1]["state"] == "sleeping"
    code, waking = await call(jp_fetch, "api", "engines", e2["id"], "wake", method="POST")
    assert code == 202 and waking["state"] in ("waking", "failed")
    failed = await wait_state(jp_fetch, e2["id"], "failed", timeout=10)
    assert "wake_up failed" in failed["error"] and "500" in failed["error"], failed
    assert await booked(jp_fetch) == 0
    code, message = await error(jp_fetch, *CHAT, method="POST", body=chat_body("grumpier"))
    assert code == 503, message
    # neither is woken again: a failed engine is not wakeable
    code, message = await error(jp_fetch, "api", "engines", e2["id"], "wake", method="POST")
    assert code == 409 and "failed" in message


# ---------------------------------------------------------------------- unloaded engines
async def test_an_unloaded_engine_is_listed_and_a_request_relaunches_it(jp_fetch, jp_serverapp, model_dir):
    e = await start(jp_fetch, model_dir(1), name="napper")
    assert e["device"] == "cpu" and not e["sleep_mode"]
    code, unloaded = await sleep(jp_fetch, e["id"], "unload")
    assert code == 200 and unloaded["state"] == "unloaded"
    assert unloaded["pid"] is None and unloaded["port"] is None and unloaded["base_url"] is None
    assert bindable(e["port"])  # its port is freed
    code, models = await call(jp_fetch, "v1", "models")
    assert code == 200 and [(m["id"], m["engines"]) for m in models["data"]] == [
        ("napper", [{"id": e["id"], "name": "napper", "state": "unloaded"}])]
    _, listed = await call(jp_fetch, "api", "engines")
    assert [(x["id"], x["state"]) for x in listed] == [(e["id"], "unloaded")]
    code, reply = await call(jp_fetch, *CHAT, method="POST", body=chat_body("napper"))
    assert code == 200 and reply["model"] == "napper"
    _, again = await call(jp_fetch, "api", "engines", e["id"])
    assert again["state"] == "ready" and again["id"] == e["id"] and again["name"] == "napper"
    assert again["served_model_name"] == e["served_model_name"] and again["pid"] != e["pid"]
    assert reply["served_by"] == again["port"]
    assert jp_serverapp.web_app.settings["sage_nb_waker"].wakes == 1
    # an unloaded engine is woken by REST too (202, then ready)
    assert (await sleep(jp_fetch, e["id"], "unload"))[1]["state"] == "unloaded"
    code, woke = await call(jp_fetch, "api", "engines", e["id"], "wake", method="POST")
    assert code == 202 and woke["state"] in ("starting", "ready")
    assert (await wait_state(jp_fetch, e["id"]))["id"] == e["id"]


# ---------------------------------------------------------------------- keep-alive over REST
async def test_keep_alive_expiry_unloads_over_rest(jp_fetch, model_dir):
    e = await start(jp_fetch, model_dir(1), name="short", keep_alive="1s")
    assert e["keep_alive"] == 1.0 and e["idle_at"] == pytest.approx(e["ready_at"] + 1.0, abs=0.01)
    await wait_state(jp_fetch, e["id"], "unloaded", timeout=8)
    for _ in range(50):  # done once its processes are gone
        _, unloaded = await call(jp_fetch, "api", "engines", e["id"])
        if unloaded["dormant_since"]:
            break
        await asyncio.sleep(0.1)
    assert unloaded["pid"] is None and unloaded["port"] is None and bindable(e["port"])


async def test_patch_keep_alive_and_bad_values_are_400(jp_fetch, model_dir):
    model = model_dir(1)
    e = await start(jp_fetch, model, name="keeper")
    assert e["keep_alive"] is None and e["idle_at"] is None
    code, patched = await call(jp_fetch, "api", "engines", e["id"], method="PATCH", body={"keep_alive": "30m"})
    assert code == 200 and patched["keep_alive"] == 1800 and patched["state"] == "ready"
    assert patched["idle_at"] is not None and patched["idle_at"] - time.time() == pytest.approx(1800, abs=30)
    code, by_name = await call(jp_fetch, "api", "engines", "keeper", method="PATCH", body={"keep_alive": 90})
    assert code == 200 and by_name["keep_alive"] == 90
    for bad, shown in (("abc", "'abc'"), (-5, "-5"), (1e99, "1e+99"), (True, "True"), ("10 parsecs", "parsecs")):
        code, message = await error(jp_fetch, "api", "engines", e["id"], method="PATCH", body={"keep_alive": bad})
        assert code == 400 and "keep_alive" in message and shown in message, message
    assert (await call(jp_fetch, "api", "engines", e["id"]))[1]["keep_alive"] == 90  # nothing changed
    for body, text in (({"keep_alive": "1m", "color": "red"}, "unknown field(s): color"),
                       ({}, "nothing to change"), ("{oops", "JSON"), ([1], "JSON object")):
        code, message = await error(jp_fetch, "api", "engines", e["id"], method="PATCH", body=body)
        assert code == 400 and text in message, message
    code, message = await error(jp_fetch, "api", "engines", "nope", method="PATCH", body={"keep_alive": 5})
    assert code == 404
    code, forever = await call(jp_fetch, "api", "engines", e["id"], method="PATCH", body={"keep_alive": None})
    assert code == 200 and forever["keep_alive"] is None and forever["idle_at"] is None
    code, message = await error(jp_fetch, "api", "engines", method="POST",
                                body={"model": str(model), "keep_alive": "abc"})
    assert code == 400 and "keep_alive" in message and "'abc'" in message
    assert [x["id"] for x in (await call(jp_fetch, "api", "engines"))[1]] == [e["id"]]  # nothing created


async def test_sleep_requests_that_cannot_be_done_are_refused(jp_fetch, model_dir):
    e = await start(jp_fetch, model_dir(1), name="cpu")
    code, message = await error(jp_fetch, "api", "engines", e["id"], "sleep", method="POST", body={"mode": "sleep"})
    assert code == 400 and "cannot sleep" in message and "'cpu'" in message
    code, message = await error(jp_fetch, "api", "engines", e["id"], "sleep", method="POST", body={"mode": "nap"})
    assert code == 400 and "'nap'" in message
    code, message = await error(jp_fetch, "api", "engines", e["id"], "sleep", method="POST", body={"how": "x"})
    assert code == 400 and "unknown field(s): how" in message
    code, ready = await call(jp_fetch, "api", "engines", e["id"], "wake", method="POST")
    assert code == 202 and ready["state"] == "ready" and ready["pid"] == e["pid"]  # awake already: nothing to do
    code, auto = await call(jp_fetch, "api", "engines", e["id"], "sleep", method="POST")  # no body: auto
    assert code == 200 and auto["state"] == "unloaded"
    code, message = await error(jp_fetch, "api", "engines", e["id"], "sleep", method="POST")
    assert code == 409 and "only a ready engine" in message
    code, message = await error(jp_fetch, "api", "engines", "nope", "sleep", method="POST")
    assert code == 404


# ---------------------------------------------------------------------- Jupyter's activity
async def test_gateway_requests_are_activity_and_polls_are_not(jp_fetch, jp_serverapp, model_dir):
    settings = jp_serverapp.web_app.settings
    e = await start(jp_fetch, model_dir(1), name="chat")

    async def shown():  # what Jupyter's idle culling and shutdown_no_activity_timeout read
        resp = await jp_fetch("api", "status")
        return datetime.fromisoformat(json.loads(resp.body)["last_activity"])

    await call(jp_fetch, *CHAT, method="POST", body=chat_body("chat"))
    await asyncio.sleep(0.02)
    before, shown_before = settings["api_last_activity"], await shown()
    assert shown_before >= before
    for path in (("api", "engines"), ("api", "engines", e["id"]), ("api", "gpus"), ("api", "backends"),
                 ("v1", "models"), ("api", "settings")):
        await asyncio.sleep(0.01)
        code, _ = await call(jp_fetch, *path)
        assert code == 200
        assert settings["api_last_activity"] == before, path  # polls keep nothing alive
    assert await shown() == shown_before
    await call(jp_fetch, *CHAT, method="POST", body=chat_body("chat"))
    after_chat = settings["api_last_activity"]
    assert after_chat > before and await shown() > shown_before
    await asyncio.sleep(0.01)
    resp = await jp_fetch("sage_nb", *CHAT, method="POST", body=json.dumps(chat_body("chat", stream=True)))
    assert resp.code == 200 and b"[DONE]" in resp.body
    after_stream = settings["api_last_activity"]
    assert after_stream > after_chat
    await asyncio.sleep(0.01)
    code, _ = await call(jp_fetch, "v1", "embeddings", method="POST", body={"input": "x"}, raise_error=False)
    assert code == 503 and settings["api_last_activity"] > after_stream  # a refused request is use too


# ---------------------------------------------------------------------- rediscovery
@on_box
async def test_a_sleeping_engine_is_rediscovered_asleep_and_a_flip_behind_our_back_is_followed(
        jp_fetch, model_dir, state_dir):
    e = await start(jp_fetch, model_dir(4), name="dormouse")
    full = e["booked_mib"]
    assert (await sleep(jp_fetch, e["id"]))[1]["state"] == "sleeping"
    cp = ControlPlane(state_dir=state_dir, monitor=False, use_nvml=False, fake_gpus=BOX, sleep_mode="on",
                      adopt_unrecorded=False, port_range=tuple(PORTS),
                      engine_env={"PYTHONPATH": STUB_PATH, "STUB_WAKE_MS": str(WAKE_MS)})
    try:
        report = cp.discover()
        assert report["reattached"] == [e["id"]] and report["failed"] == [] and report["adopted"] == []
        found = cp.engine(e["id"])
        assert found["state"] == "sleeping" and found["sleep_level"] == 1 and found["pid"] == e["pid"]
        assert leases(cp)[1] == [(e["id"], 0, "GPU-a", RESIDUAL)]
        key = cp.api_key(e["id"])
        # woken behind sage_nb's back: the next discovery finds it awake, with its full booking
        assert probes.call(e["host"], e["port"], "POST", "/wake_up", key, 5).status == 200
        cp.discover()
        found = cp.engine(e["id"])
        assert found["state"] == "ready" and found["sleep_level"] is None and found["dormant_since"] is None
        assert leases(cp)[1] == [(e["id"], 0, "GPU-a", full)]
        assert await booked(jp_fetch) == full  # the server sees the same registry
        code, reply = await call(jp_fetch, *CHAT, method="POST", body=chat_body("dormouse"))
        assert code == 200 and reply["served_by"] == e["port"]
        # and put to sleep behind its back: found asleep, the booking shrunk to the residual
        assert probes.call(e["host"], e["port"], "POST", "/sleep?level=1", key, 5).status == 200
        cp.discover()
        assert cp.engine(e["id"])["state"] == "sleeping"
        assert leases(cp)[1] == [(e["id"], 0, "GPU-a", RESIDUAL)]
    finally:
        cp.close()
    await asyncio.sleep(RECHECK_S * 2)  # another process's change reaches the gateway's router within RECHECK_S
    code, reply = await call(jp_fetch, *CHAT, method="POST", body=chat_body("dormouse"))
    assert code == 200 and reply["served_by"] == e["port"]
    assert stub_state(state_dir, e) == {"is_sleeping": False, "wakes": 2}


@pytest.mark.parametrize("stub_env", [{"STUB_STREAM_PARTS": "50", "STUB_STREAM_GAP_MS": "50"}], ids=["long"])
async def test_a_request_in_flight_keeps_the_engine_awake_for_every_process(jp_fetch, model_dir, state_dir):
    e = await start(jp_fetch, model_dir(1), name="talker", keep_alive="1s")
    chunks = []
    stream = asyncio.ensure_future(jp_fetch("sage_nb", *CHAT, method="POST", streaming_callback=chunks.append,
                                            body=json.dumps(chat_body("talker", stream=True))))
    await asyncio.sleep(1.5)  # the 2.5 s stream is still under way, past the keep-alive
    assert (await call(jp_fetch, "api", "engines", e["id"]))[1]["state"] == "ready"  # the server's own monitor waits
    # another process on the same registry (a second server, an embedded kernel) runs its idle check
    other = ControlPlane(state_dir=state_dir, monitor=False, use_nvml=False, adopt_unrecorded=False,
                         port_range=tuple(PORTS), engine_env={"PYTHONPATH": STUB_PATH})
    try:
        await asyncio.get_running_loop().run_in_executor(None, other.supervisor.check)
        await asyncio.sleep(0.5)
        state = other.engine(e["id"])["state"]
    finally:
        other.close()
    await stream
    assert b"data: [DONE]" in b"".join(chunks)  # not cut off mid-stream
    assert state == "ready"  # the server wrote "in use now" to the registry on each monitor pass


@on_box
@pytest.mark.parametrize("stub_env", [{"STUB_REPLY_MS": "2000"}], ids=["slow"])
async def test_a_request_whose_engine_falls_asleep_before_answering_waits_for_its_wake(jp_fetch, model_dir, state_dir):
    e = await start(jp_fetch, model_dir(1), name="drowsy")
    pending = asyncio.ensure_future(call(jp_fetch, *CHAT, method="POST", body=chat_body("drowsy")))
    await asyncio.sleep(0.3)  # the engine has the request, its answer 1.7 s away
    code, slept = await sleep(jp_fetch, e["id"])
    assert code == 200 and slept["state"] == "sleeping"
    code, reply = await pending  # the watchdog gave it up unanswered; it waited for the wake and went again
    assert code == 200 and reply["served_by"] == e["port"]
    assert stub_state(state_dir, e) == {"is_sleeping": False, "wakes": 1}
