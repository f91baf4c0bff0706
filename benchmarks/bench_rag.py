"""#7a RAG search: top-5 over 100,000 × 384 normalized float32 vectors with ``sage_nb.rag.RAG``
(index state built directly; the query embedding comes from an in-process fake backend) against
plain numpy (matrix-vector product + argpartition) on the same matrix."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import numpy as np

from sage_nb.rag import RAG, Chunk

try:
    from threadpoolctl import threadpool_limits  # comes with vLLM's dependencies

    HAVE_THREADPOOLCTL = True
except ImportError:
    HAVE_THREADPOOLCTL = False

from .common import Figure, Settings, interleave, median, per_call

ROWS, DIM, K = 100_000, 384, 5


class FakeEmbeddings:
    """Stands in for the client's ``embeddings()`` OpenAI object: returns a fixed query vector."""

    def __init__(self, vector: np.ndarray) -> None:
        self.model = "bench-embedder"
        self._reply = SimpleNamespace(data=[SimpleNamespace(index=0, embedding=vector.tolist())])
        self.embeddings = self

    def create(self, model, input):  # noqa: A002 - the OpenAI signature
        return self._reply


def build(rng: np.random.Generator) -> tuple[RAG, np.ndarray, np.ndarray]:
    vectors = rng.standard_normal((ROWS, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    query = rng.standard_normal(DIM, dtype=np.float32)
    query /= np.linalg.norm(query)
    backend = FakeEmbeddings(query)
    rag = RAG(SimpleNamespace(embeddings=lambda model=None: backend))
    rag.chunks = [Chunk(f"chunk {i}", "bench", i) for i in range(ROWS)]
    rag.vectors, rag.embedded_with, rag.n_texts = vectors, backend.model, 1
    return rag, vectors, query


def numpy_top_k(vectors: np.ndarray, query: np.ndarray, k: int = K) -> np.ndarray:
    scores = vectors @ query
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def run(s: Settings) -> dict:
    rag, vectors, query = build(np.random.default_rng(7))
    hits = rag.search("a query", k=K)
    expected = numpy_top_k(vectors, query)
    if [c.start for c in hits] != expected.tolist():
        raise AssertionError(f"RAG.search and numpy disagree: {[c.start for c in hits]} vs {expected.tolist()}")
    n = s.pick(40, 10)
    figs, raw = [], {}
    # Multi-threaded BLAS on a busy 2-core box waits for scheduler ticks (matvec times jump between
    # 4, 8, 16 and 32 ms with the load), so the single-thread figure is the steady one.
    for threads in (1, None) if HAVE_THREADPOOLCTL else (None,):
        with blas_threads(threads):
            cycles = interleave(s.cycles, {
                "numpy argpartition": lambda: per_call(lambda: numpy_top_k(vectors, query), n),
                "RAG.search": lambda: per_call(lambda: rag.search("a query", k=K), n)})
        m = {k: median(v) * 1000 for k, v in cycles.items()}
        label = "1 BLAS thread" if threads else "default BLAS threads"
        raw[label] = cycles
        figs.append(Figure(f"RAG.search top-5 over 100,000 × 384, {label}", m["RAG.search"],
                           m["numpy argpartition"], "ms", "ratio", "numpy matvec + argpartition", "value < 10 ms",
                           m["RAG.search"] < 10))
    return {"figures": figs, "raw": {"cycles_s": raw}}


@contextlib.contextmanager
def blas_threads(n: int | None):
    if n is None:
        yield
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield
