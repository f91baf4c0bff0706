"""``sage_nb.client``: the notebook's entry point to engines and ready OpenAI clients.

    from sage_nb import client
    oa = client.llm()                      # openai.OpenAI for an LLM backend
    oa.chat.completions.create(model=oa.model, messages=[...])
    client.embeddings().embeddings.create(model=..., input=[...])

The kernel talks to its Jupyter server's sage_nb extension when one is reachable and
otherwise runs the same control plane in-process (embedded mode).
"""

from __future__ import annotations

import threading

from sage_nb.kernel.client import Client

_lock = threading.Lock()
_default: Client | None = None


def get_client(refresh: bool = False) -> Client:
    """The kernel's shared :class:`Client` (created on first use)."""
    global _default
    with _lock:
        if _default is None or refresh:
            _default = Client()
        return _default


def set_client(client: Client | None) -> None:
    """Replace the shared client (``None``: find the server again on next use)."""
    global _default
    with _lock:
        _default = client


def llm(model: str | None = None):
    """An ``openai.OpenAI`` for an LLM backend; its ``.model`` is the served name."""
    return get_client().llm(model)


def embeddings(model: str | None = None):
    """An ``openai.OpenAI`` for an embedding backend; its ``.model`` is the served name."""
    return get_client().embeddings(model)


def backends() -> dict:
    return get_client().backends()


def engines() -> list[dict]:
    return get_client().engines()


def start(model: str, kind: str = "llm", **options) -> dict:
    return get_client().start(model, kind, **options)


def stop(id_or_name: str) -> dict:
    return get_client().stop(id_or_name)


def prune() -> list[str]:
    return get_client().prune()
