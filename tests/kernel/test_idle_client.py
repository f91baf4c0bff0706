"""The kernel's client and idle engines, embedded (no server): its OpenAI objects wake an idle engine
on their next request, follow it to its new port, and count as use. In server mode the gateway does
this (tests/server/test_idle.py, tests/server/test_idle_vllm.py)."""

import socket

import openai
import pytest

from sage_nb.kernel.client import Client

from ..conftest import STUB_PATH, shutdown

SMALL = [{"name": "NVIDIA A10", "total_mib": 10240, "used_mib": 0, "uuid": "GPU-s"}]


@pytest.fixture
def client(state_dir):
    cl = Client(embedded=True, state_dir=state_dir, engine_env={"PYTHONPATH": STUB_PATH},
                port_range=(18700, 18749), adopt_unrecorded=False, health_interval=0.2)
    yield cl
    shutdown(cl)


def chat(oa) -> str:
    reply = oa.chat.completions.create(model=oa.model, messages=[{"role": "user", "content": "hi"}])
    return reply.choices[0].message.content


def test_an_openai_client_wakes_its_unloaded_engine_on_another_port(client, model_dir):
    e = client.start(str(model_dir(1)), name="chat")
    oa = client.llm()
    assert chat(oa) == "stub"
    client.sleep("chat", "unload")
    with socket.socket() as squatter:  # the old port is taken meanwhile: the relaunch moves
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", e["port"]))
        squatter.listen()
        assert chat(oa) == "stub"  # the same object, woken and followed
        woke = client.engine("chat")
    assert woke["state"] == "ready" and woke["port"] != e["port"] and woke["id"] == e["id"]
    assert client.control_plane.usage.last[e["id"]] >= woke["ready_at"]  # counted as use


def test_llm_and_embeddings_choose_an_idle_engine_when_none_is_ready(client, model_dir):
    client.start(str(model_dir(1)), name="chat")
    client.start(str(model_dir(1)), "embedding", name="emb")
    client.sleep("chat")  # auto on a CPU engine: unloaded
    client.sleep("emb")
    assert {e["state"] for e in client.engines()} == {"unloaded"}
    oa = client.llm()
    assert oa.model == "chat" and chat(oa) == "stub"
    emb = client.embeddings()
    vectors = emb.embeddings.create(model=emb.model, input=["a", "b"])
    assert len(vectors.data) == 2 and client.engine("emb")["state"] == "ready"


def test_a_wake_that_does_not_fit_is_a_clear_503(state_dir, model_dir):
    cl = Client(embedded=True, state_dir=state_dir, engine_env={"PYTHONPATH": STUB_PATH}, fake_gpus=SMALL,
                port_range=(18750, 18799), adopt_unrecorded=False, health_interval=0.2)
    try:
        cl.start(str(model_dir(4)), name="big", max_model_len=1024)
        oa = cl.llm("big")
        cl.sleep("big", "unload")
        cl.start(str(model_dir(4)), name="newcomer", max_model_len=1024)
        with pytest.raises(openai.APIStatusError) as info:
            chat(oa)
        assert info.value.status_code == 503 and "engine 'big' cannot wake" in str(info.value)
        assert cl.engine("big")["state"] == "unloaded"
    finally:
        shutdown(cl)
