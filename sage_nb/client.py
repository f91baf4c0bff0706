"""``sage_nb.client``: the notebook's entry point to engines and ready OpenAI clients.

    from sage_nb import client
    oa = client.llm()                      # openai.OpenAI for an LLM backend
    oa.chat.completions.create(model=oa.model, messages=[...])
    client.embeddings().embeddings.create(model=..., input=[...])
    client.langchain_chat(); client.langchain_embeddings()   # LangChain (pip install langchain-openai)

The kernel talks to its Jupyter server's sage_nb extension when one is reachable and
otherwise runs the same control plane in-process (embedded mode).
"""

from __future__ import annotations

from sage_nb.kernel.client import Client, get_client, set_client

__all__ = ["Client", "adapters", "backends", "embeddings", "engines", "get_client", "gpu_metrics", "langchain_chat",
           "langchain_embeddings", "llm", "load_adapter", "metrics", "prune", "set_client", "start", "stop",
           "unload_adapter"]


def llm(model: str | None = None):
    """An ``openai.OpenAI`` for an LLM backend; its ``.model`` is the served name."""
    return get_client().llm(model)


def embeddings(model: str | None = None):
    """An ``openai.OpenAI`` for an embedding backend; its ``.model`` is the served name."""
    return get_client().embeddings(model)


def langchain_chat(model: str | None = None, **kwargs):
    """A LangChain ``ChatOpenAI`` for an LLM backend (needs ``pip install langchain-openai``)."""
    return get_client().langchain_chat(model, **kwargs)


def langchain_embeddings(model: str | None = None, **kwargs):
    """A LangChain ``OpenAIEmbeddings`` for an embedding backend that sends raw strings, not tiktoken ids."""
    return get_client().langchain_embeddings(model, **kwargs)


def backends() -> dict:
    """Ready engines by kind: ``{"llm_backends": [...], "embedding_backends": [...]}``."""
    return get_client().backends()


def engines() -> list[dict]:
    """Every engine record (JSON models)."""
    return get_client().engines()


def start(model: str, kind: str = "llm", **options) -> dict:
    """Start an engine and wait until it is ready (see ``Client.start``)."""
    return get_client().start(model, kind, **options)


def stop(id_or_name: str) -> dict:
    """Stop an engine; its port and GPU memory are free at once."""
    return get_client().stop(id_or_name)


def prune() -> list[str]:
    """Remove stopped and failed engine records."""
    return get_client().prune()


def metrics(id_or_name: str | None = None, window: float = 600.0, points: bool = False) -> dict:
    """What the engines are doing: every engine's latest figures, or one engine's series over the last
    ``window`` seconds (see ``Client.metrics``)."""
    return get_client().metrics(id_or_name, window, points)


def gpu_metrics(window: float = 600.0) -> dict:
    """Each GPU's memory over the last ``window`` seconds, by owner."""
    return get_client().gpu_metrics(window)


def load_adapter(name: str, path: str, engine: str | None = None) -> dict:
    """Load the LoRA adapter at ``path`` as ``name`` onto ``engine`` (default: the one engine started with
    ``lora=True``); then ``llm(name)`` uses it."""
    return get_client().load_adapter(name, path, engine)


def unload_adapter(name: str, engine: str | None = None) -> list[dict]:
    """Unload adapter ``name`` (from ``engine``, default every engine holding it)."""
    return get_client().unload_adapter(name, engine)


def adapters() -> list[dict]:
    """Every LoRA adapter on the engines, with its engine and base model (``parent``)."""
    return get_client().adapters()
