"""Run in a side venv with langchain-openai (tests/clients/test_langchain.py): sage_nb's LangChain
helpers against a real server, found as a notebook would (``SAGE_NB_SERVER_URL``/``SAGE_NB_TOKEN``).
Prints one JSON object: the vectors and answers, and what each embeddings object sent."""

from __future__ import annotations

import importlib.metadata
import json
import sys

import langchain_openai
import tiktoken

from sage_nb import client

TEXT = "how do plants make food?"


def recording(embeddings, sent: list) -> None:
    """Record the ``input`` of every request an OpenAIEmbeddings sends."""
    create = embeddings.client.create

    def spy(**kwargs):
        sent.append(kwargs["input"])
        return create(**kwargs)

    embeddings.client.create = spy


def refuse(*args, **kwargs):
    raise AssertionError("tiktoken was used")


def stand_in_encoding(*args, **kwargs) -> tiktoken.Encoding:
    """A byte-level tiktoken encoding: OpenAI's vocabularies are downloaded on first use, which
    this machine cannot do; the default OpenAIEmbeddings sends these ids as it would cl100k's."""
    return tiktoken.Encoding(name="bytes", pat_str=r"\S+|\s+", mergeable_ranks={bytes([i]): i for i in range(256)},
                             special_tokens={})


def main() -> dict:
    out: dict = {"mode": client.get_client().mode,
                 "versions": {p: importlib.metadata.version(p) for p in ("langchain-openai", "langchain-core")}}
    oa = client.embeddings()
    out["direct"] = oa.embeddings.create(model=oa.model, input=[TEXT]).data[0].embedding

    real = tiktoken.get_encoding, tiktoken.encoding_for_model
    tiktoken.get_encoding = tiktoken.encoding_for_model = refuse  # the helper must not need tiktoken
    helper = client.langchain_embeddings()
    out["helper_sent"] = sent = []
    recording(helper, sent)
    out["helper_query"] = helper.embed_query(TEXT)
    out["helper_docs"] = helper.embed_documents([TEXT, "gpus"])

    tiktoken.get_encoding = tiktoken.encoding_for_model = stand_in_encoding
    base_url, api_key = client.get_client().transport.endpoint(client.get_client().backend("embedding"))
    default = langchain_openai.OpenAIEmbeddings(model=oa.model, base_url=base_url, api_key=api_key)
    out["default_sent"] = sent = []
    recording(default, sent)
    out["default_query"] = default.embed_query(TEXT)
    tiktoken.get_encoding, tiktoken.encoding_for_model = real

    chat = client.langchain_chat(max_tokens=16, temperature=1, seed=7, extra_body={"ignore_eos": True})
    out["chat_model"] = chat.model_name
    out["invoke"] = chat.invoke("hi").content
    out["chunks"] = [chunk.content for chunk in chat.stream("hi")]
    question = "what does the notebook say?"
    out["base_answer"] = client.langchain_chat(max_tokens=4, temperature=0).invoke(question).content
    adapter = client.langchain_chat("jupyter", max_tokens=4, temperature=0)  # a LoRA adapter, by its name
    out["adapter_model"] = adapter.model_name
    out["adapter_answer"] = adapter.invoke(question).content
    out["adapter_chunks"] = [chunk.content for chunk in adapter.stream(question)]
    try:
        client.langchain_chat("no-such-model")
    except Exception as e:  # the control plane's NotFound, as for client.llm()
        out["unknown_model"] = f"{type(e).__name__}: {e}"
    return out


if __name__ == "__main__":
    print(json.dumps(main()))
    sys.stdout.flush()
