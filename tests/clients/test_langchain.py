"""LangChain through sage_nb's helpers (``client.langchain_embeddings()``/``langchain_chat()``, a LoRA
adapter's name too), in side venvs with langchain-openai 1.x and 0.3 (the line jupyter-ai 2.x uses), against
real engines: the helper's vectors are the engine's own for the raw text, where the default OpenAIEmbeddings sends
token ids and gets another vector without any error."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from . import sidevenv

pytestmark = pytest.mark.vllm

SCRIPT = str(sidevenv.REQUIREMENTS / "langchain_check.py")


def cosine(a, b) -> float:
    a, b = np.asarray(a), np.asarray(b)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize("venv", ["langchain", "jupyter-ai"], indirect=True)
def test_langchain_helpers_embed_the_text_and_chat(venv, gateway):
    t0 = time.monotonic()
    env = venv.env(SAGE_NB_SERVER_URL=gateway.url, SAGE_NB_TOKEN=gateway.token)
    done = venv.run([SCRIPT], env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    helper, default = cosine(out["helper_query"], out["direct"]), cosine(out["default_query"], out["direct"])
    print(f"{venv.name}: {out['versions']}, {time.monotonic() - t0:.1f} s; cosine with the engine's vector: "
          f"helper {helper:.6f}, default {default:.3f}")
    assert out["mode"] == "server"

    # the helper sends the text itself and gets the engine's own vector for it
    assert out["helper_sent"] == [["how do plants make food?"], ["how do plants make food?", "gpus"]]
    assert len(out["direct"]) == 384
    assert helper > 0.9999
    assert cosine(out["helper_docs"][0], out["direct"]) > 0.9999
    assert cosine(out["helper_docs"][1], out["direct"]) < 0.99

    # the default OpenAIEmbeddings sends tiktoken ids, which MiniLM embeds as other tokens, silently
    assert out["default_sent"] and all(isinstance(t, int) for t in out["default_sent"][0][0])
    assert len(out["default_query"]) == 384 and default < 0.9

    assert out["chat_model"] == "tiny"
    assert out["invoke"].strip()
    assert len([c for c in out["chunks"] if c]) >= 2 and "".join(out["chunks"]).strip()
    # a LoRA adapter on the engine, by its name: it changes the greedy answer to the word it was trained on
    assert out["adapter_model"] == "jupyter"
    assert out["adapter_answer"] == "jupyter" != out["base_answer"]
    assert "".join(out["adapter_chunks"]) == "jupyter"
    assert out["unknown_model"].startswith("NotFound: model 'no-such-model' is not served by any ready LLM engine")
