"""The LangChain helpers and the jupyter-ai lines without the clients installed (a stand-in
``langchain_openai`` records what it is given); tests/clients runs the real ones."""

from __future__ import annotations

import sys
import types

import pytest

from sage_nb.controlplane import BadRequest, NoBackend, NotFound
from sage_nb.kernel.client import Client
from sage_nb.kernel.connection import ServerInfo
from sage_nb.kernel.integrations import jupyter_ai_lines

LLM = {"id": "e1", "name": "chat", "model": "/m/chat", "served_model_name": "org/chat", "kind": "llm",
       "state": "ready", "health_failures": 0, "port": 9, "base_url": "http://127.0.0.1:9/v1"}
EMB = {**LLM, "id": "e2", "name": "emb", "model": "/m/emb", "served_model_name": "emb", "kind": "embedding",
       "base_url": "http://127.0.0.1:10/v1"}


class GatewayTransport:
    """Server mode with fixed backends: OpenAI calls go to the gateway with the Jupyter token."""

    mode, control_plane, why_embedded = "server", None, ""

    def __init__(self, backends: list[dict]) -> None:
        self.server = ServerInfo("http://127.0.0.1:8888/a%40b/", "tok", "test")
        self.list = backends

    def backends(self) -> dict:
        return {"llm_backends": [b for b in self.list if b["kind"] == "llm"],
                "embedding_backends": [b for b in self.list if b["kind"] == "embedding"]}

    def endpoint(self, backend: dict) -> tuple[str, str]:
        return self.server.api("sage_nb/v1"), self.server.token

    def engines(self) -> list[dict]:
        return self.list

    def http_client(self, backend: dict) -> None:
        return None  # the gateway wakes idle engines: the OpenAI client's own HTTP client


@pytest.fixture
def fake_langchain(monkeypatch):
    module = types.ModuleType("langchain_openai")

    class Recorded:
        def __init__(self, **kwargs) -> None:
            self.kwargs = kwargs

    module.ChatOpenAI = type("ChatOpenAI", (Recorded,), {})
    module.OpenAIEmbeddings = type("OpenAIEmbeddings", (Recorded,), {})
    monkeypatch.setitem(sys.modules, "langchain_openai", module)
    return module


def test_langchain_objects_are_bound_to_the_backend_of_their_kind(fake_langchain):
    client = Client(transport=GatewayTransport([LLM, EMB]))
    chat = client.langchain_chat(temperature=0)
    assert type(chat).__name__ == "ChatOpenAI"
    assert chat.kwargs == {"model": "org/chat", "base_url": "http://127.0.0.1:8888/a%40b/sage_nb/v1",
                           "api_key": "tok", "temperature": 0}
    emb = client.langchain_embeddings()
    assert emb.kwargs == {"model": "emb", "base_url": "http://127.0.0.1:8888/a%40b/sage_nb/v1", "api_key": "tok",
                          "check_embedding_ctx_length": False}  # raw strings, never tiktoken ids
    assert client.langchain_chat("chat").kwargs["model"] == "org/chat"  # engine name -> served name
    assert client.langchain_embeddings(chunk_size=16).kwargs["chunk_size"] == 16


def test_langchain_bad_input_is_a_clear_error(fake_langchain):
    client = Client(transport=GatewayTransport([LLM]))
    with pytest.raises(NotFound, match="'nope' is not served by any ready LLM engine"):
        client.langchain_chat("nope")
    with pytest.raises(BadRequest, match="'chat' is an LLM model"):
        Client(transport=GatewayTransport([LLM, EMB])).langchain_embeddings("chat")
    with pytest.raises(NoBackend, match="No embedding backend available"):
        client.langchain_embeddings()


def test_langchain_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "langchain_openai", None)  # import fails as when not installed
    client = Client(transport=GatewayTransport([]))  # said before any backend is looked for
    for make in (client.langchain_chat, client.langchain_embeddings):
        with pytest.raises(ImportError, match=r"pip install langchain-openai"):
            make()


def test_jupyter_ai_lines_never_show_the_token():
    lines = jupyter_ai_lines("http://h:1/a%40b/sage_nb/v1", [LLM, {**LLM, "served_model_name": "has space"}])
    assert lines[1:3] == ["  %env OPENAI_API_KEY=<your Jupyter token>", "  %load_ext jupyter_ai_magics"]
    assert lines[3:] == ['  %%ai openai-chat-custom:chat -m {"openai_api_base":"http://h:1/a%40b/sage_nb/v1"}',
                         '  %%ai openai-chat-custom:org/chat -m {"openai_api_base":"http://h:1/a%40b/sage_nb/v1"}']
    assert all(" " not in line.split(" -m ", 1)[-1] for line in lines[3:])  # jupyter-ai splits on spaces
    assert jupyter_ai_lines("http://h:1/sage_nb/v1", []) == []
