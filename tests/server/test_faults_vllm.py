"""Faults with real processes: the Jupyter server SIGKILLed while an engine starts, while one stops
and while a request streams; an engine's EngineCore killed; an engine that cannot start."""

from __future__ import annotations

import os
import signal
import threading
import time

import openai
import psutil
import pytest

from sage_nb.controlplane import ControlPlane
from sage_nb.controlplane.engines import probes
from sage_nb.controlplane.engines.process import group_members

from ..serverproc import TOKEN, Server, running_server, wait_ready

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    probe_args = ("--SageNBApp.work_probe_interval=1", "--SageNBApp.work_probe_timeout=5")  # hangs in seconds
    with running_server(tmp_path_factory.mktemp("faults"), (18650, 18699), extra_args=probe_args) as srv:
        yield srv


@pytest.fixture(autouse=True)
def no_engine_left(server):
    """Each test starts with no engine: one that failed midway does not leave its engine to the next."""
    yield
    for e in server.get("sage_nb/api/engines")[1]:
        if e["state"] in ("starting", "ready"):
            server.request("DELETE", f"sage_nb/api/engines/{e['id']}")
    server.request("POST", "sage_nb/api/engines/prune")


def enginecore(engine: dict) -> psutil.Process:
    core = [c for c in psutil.Process(engine["pid"]).children(recursive=True) if c.name() == "VLLM::EngineCore"]
    assert len(core) == 1
    return core[0]


def registry_view(server: Server) -> tuple[dict, list]:
    cp = ControlPlane(state_dir=server.state_dir, monitor=False)
    try:
        with cp.registry.snapshot() as txn:
            return txn.leases(), txn.bookings()
    finally:
        cp.close()


def restart(server: Server) -> None:
    server.kill()
    server.start()


def test_server_killed_while_an_engine_starts_then_while_it_streams_then_while_it_stops(server, tiny_llama):
    code, engine = server.request("POST", "sage_nb/api/engines", {"model": str(tiny_llama), "name": "tiny"})
    assert code == 202
    time.sleep(3)  # vLLM is loading
    restart(server)  # SIGKILL while starting
    listed = server.get("sage_nb/api/engines")[1]
    assert [(e["id"], e["state"]) for e in listed] == [(engine["id"], "starting")]  # re-attached, once
    engine = wait_ready(server, engine["id"])  # the restarted server's monitor finishes the start

    oa = openai.OpenAI(base_url=server.url + "sage_nb/v1", api_key=TOKEN, max_retries=0)
    core = enginecore(engine)
    for _ in range(4):
        stream = oa.chat.completions.create(model="tiny", max_tokens=1900, stream=True,
                                            extra_body={"ignore_eos": True},
                                            messages=[{"role": "user", "content": "go on"}])
        next(iter(stream))
        os.kill(core.pid, signal.SIGSTOP)  # the answer stops growing: the kill lands mid-stream
        try:
            restart(server)  # SIGKILL while a request streams
        finally:
            os.kill(core.pid, signal.SIGCONT)
        try:
            list(stream)
        except openai.APIConnectionError:
            break  # the client saw the cut
        # A starved api_server can get a whole answer from EngineCore at once, so this stream had
        # ended before the kill: stream again.
    else:
        pytest.fail("every stream had ended before the server was killed")
    listed = server.get("sage_nb/api/engines")[1]
    assert [(e["id"], e["state"]) for e in listed] == [(engine["id"], "ready")]
    assert oa.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "x"}])

    tree = [psutil.Process(engine["pid"]), *psutil.Process(engine["pid"]).children(recursive=True)]
    def stop_request():
        try:
            server.request("DELETE", f"sage_nb/api/engines/{engine['id']}")
        except OSError:
            pass  # the server is killed under it: that is the point

    stopper = threading.Thread(target=stop_request)
    stopper.start()
    deadline = time.monotonic() + 10
    while ControlPlane(state_dir=server.state_dir, monitor=False).engine(engine["id"])["state"] != "stopping":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    restart(server)  # SIGKILL while stopping
    stopper.join()
    deadline = time.monotonic() + 30
    while server.get(f"sage_nb/api/engines/{engine['id']}")[1]["state"] != "stopped":
        assert time.monotonic() < deadline, server.get(f"sage_nb/api/engines/{engine['id']}")[1]
        time.sleep(0.2)
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]  # no orphan
    assert registry_view(server) == ({}, [])  # no lease, no booking left
    assert server.request("POST", "sage_nb/api/engines/prune")[1]["removed"] == [engine["id"]]


def test_enginecore_hung_then_killed(server, tiny_llama):
    code, engine = server.request("POST", "sage_nb/api/engines", {"model": str(tiny_llama), "name": "core"})
    engine = wait_ready(server, engine["id"])
    core = enginecore(engine)

    # Hung: EngineCore stopped. The api_server still answers /health 200; only work probes see it.
    oa = openai.OpenAI(base_url=server.url + "sage_nb/v1", api_key=TOKEN, max_retries=0, timeout=120)
    os.kill(core.pid, signal.SIGSTOP)
    try:
        assert probes.healthy(engine["host"], engine["port"])
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as exc:
            oa.chat.completions.create(model="core", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
        assert exc.value.status_code == 504 and "'core' stopped being ready" in exc.value.message
        assert time.monotonic() - t0 < 30  # the work probe's 5 s timeout and a pass, not the 600 s one
        assert server.get("sage_nb/api/backends")[1]["llm_backends"] == []  # not routed to
        assert server.get(f"sage_nb/api/engines/{engine['id']}")[1]["state"] == "ready"  # not failed yet
    finally:
        os.kill(core.pid, signal.SIGCONT)
    deadline = time.monotonic() + 30  # answering again: the next work probe makes it routable again
    while not server.get("sage_nb/api/backends")[1]["llm_backends"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    reply = oa.chat.completions.create(model="core", max_tokens=2, messages=[{"role": "user", "content": "back?"}])
    assert reply.usage.completion_tokens > 0

    t0 = time.monotonic()
    os.kill(core.pid, signal.SIGKILL)
    while server.get(f"sage_nb/api/engines/{engine['id']}")[1]["state"] != "failed":
        assert time.monotonic() - t0 < 15
        time.sleep(0.1)
    assert time.monotonic() - t0 < 8
    backends = server.get("sage_nb/api/backends")[1]
    assert backends["llm_backends"] == []
    assert server.request("POST", "sage_nb/api/engines/prune")[1]["removed"] == [engine["id"]]
    assert not group_members(engine["pid"]) and registry_view(server) == ({}, [])


def test_engine_that_cannot_start_fails_with_its_log_tail(server, tiny_llama):
    code, engine = server.request("POST", "sage_nb/api/engines",
                                  {"model": str(tiny_llama), "name": "badflag", "extra_args": ["--no-such-flag"]})
    assert code == 202
    deadline = time.monotonic() + 120
    while (e := server.get(f"sage_nb/api/engines/{engine['id']}")[1])["state"] == "starting":
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert e["state"] == "failed" and "--no-such-flag" in e["error"] and "last lines of" in e["error"]
    assert registry_view(server) == ({}, [])
    logs = server.get(f"sage_nb/api/engines/{engine['id']}/logs?lines=5")[1]["log"]
    assert "no-such-flag" in logs
    server.request("POST", "sage_nb/api/engines/prune")
