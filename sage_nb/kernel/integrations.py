"""Glue for the field's own clients: LangChain objects bound to a backend, and the lines that
point jupyter-ai at the gateway. ``langchain_openai`` is imported only when asked for (it is
not a dependency of sage_nb)."""

from __future__ import annotations

import json
from typing import Any

LANGCHAIN_MISSING = ("LangChain's OpenAI integration is not installed: run `pip install langchain-openai` "
                     "in this kernel's environment (`%pip install langchain-openai` in a notebook)")


def langchain_openai():
    """The ``langchain_openai`` module, or an ImportError that says how to install it."""
    try:
        import langchain_openai
    except ImportError as e:
        raise ImportError(LANGCHAIN_MISSING) from e
    return langchain_openai


def chat_model(base_url: str, api_key: str, model: str, **kwargs: Any):
    """A ``langchain_openai.ChatOpenAI`` for ``model`` at ``base_url`` (``kwargs`` pass through,
    ``http_client`` too)."""
    return langchain_openai().ChatOpenAI(model=model, base_url=base_url, api_key=api_key, **kwargs)


def embeddings_model(base_url: str, api_key: str, model: str, **kwargs: Any):
    """A ``langchain_openai.OpenAIEmbeddings`` for ``model`` at ``base_url`` that sends raw strings.

    By default OpenAIEmbeddings splits texts with tiktoken and sends OpenAI's token ids, which
    any other model embeds as the wrong tokens without an error; ``check_embedding_ctx_length=False``
    sends the text itself, for the engine's own tokenizer (tiktoken is then never used)."""
    kwargs.setdefault("check_embedding_ctx_length", False)
    return langchain_openai().OpenAIEmbeddings(model=model, base_url=base_url, api_key=api_key, **kwargs)


def jupyter_ai_lines(gateway_url: str, llm_backends: list[dict]) -> list[str]:
    """How to use each LLM backend from jupyter-ai's ``%%ai`` through the gateway at ``gateway_url``.

    jupyter-ai splits the magic's line on single spaces, so the JSON has none, and a served name
    with whitespace is replaced by the engine's name (the gateway accepts either). The key comes
    from ``OPENAI_API_KEY`` (the Jupyter token), which these lines never show."""
    names = sorted({b["name"] if any(c.isspace() for c in b["served_model_name"]) else b["served_model_name"]
                    for b in llm_backends})
    if not names:
        return []
    params = json.dumps({"openai_api_base": gateway_url}, separators=(",", ":"))
    return ["from jupyter-ai (pip install jupyter-ai-magics langchain-openai), with the Jupyter token as the key:",
            "  %env OPENAI_API_KEY=<your Jupyter token>",
            "  %load_ext jupyter_ai_magics",
            *(f"  %%ai openai-chat-custom:{name} -m {params}" for name in names)]
