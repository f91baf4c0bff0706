"""``sage_nb.rag``: retrieval-augmented answers over the notebook's embedding and LLM backends
(see :class:`sage_nb.kernel.rag.RAG`)."""

from sage_nb.kernel.rag import RAG, Answer, Chunk  # noqa: F401
