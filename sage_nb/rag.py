"""A small RAG helper: add texts and files, embed them on an embedding backend, retrieve by cosine
score, answer on an LLM backend citing numbered sources.

    rag = RAG()                            # backends via sage_nb.client.get_client(), on first use
    rag.add(["notes/", "some raw text"])   # chunks; embedded lazily, at the next search/ask
    rag.search("what about X?")            # [Chunk(...), ...], best first
    rag.ask("what about X?")               # Answer: text citing [n] + its sources
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sage_nb.controlplane.validation import integer

DEFAULT_SYSTEM = ("Answer the question using only the numbered context passages. Cite the passages you use "
                  "as [n]. If the passages do not contain the answer, say so.")
FORMAT = "sage_nb.rag/1"
DOC_SUFFIXES = (".txt", ".md")
_WORD = re.compile(r"\S")
_CUTS = (re.compile(r"\n\s*\n"), re.compile(r"[.!?][\"')\]]?\s"), re.compile(r"\s+"))  # best first


@dataclass
class Chunk:
    """A piece of a document: its text, its ``source`` and ``start`` offset there, and a score."""

    text: str
    source: str
    start: int
    score: float | None = None

    def __repr__(self) -> str:
        score = "" if self.score is None else f", score={self.score:.3f}"
        return f"Chunk({self.source}@{self.start}{score}: {_preview(self.text)!r})"


@dataclass
class Answer:
    """An LLM answer (``text``, by ``model``) with the numbered chunks it was given as context."""

    text: str
    sources: list[Chunk] = field(default_factory=list)
    model: str = ""

    def _lines(self) -> list[str]:
        return [f"[{i}] {c.source}@{c.start}" + ("" if c.score is None else f" (score {c.score:.3f})")
                + f": {_preview(c.text)}" for i, c in enumerate(self.sources, 1)]

    def __str__(self) -> str:
        return self.text + "".join(f"\n{s}" for s in ["\nSources:", *self._lines()] if self.sources)

    def _repr_markdown_(self) -> str:
        sources = "".join(f"\n- {s}" for s in self._lines())
        return self.text + (f"\n\n**Sources** (model `{self.model}`):\n{sources}" if sources else "")


def _preview(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def chunk_text(text: str, chunk_size: int = 800, overlap: int = 100) -> list[tuple[int, str]]:
    """Split ``text`` into ``(start, chunk)`` pieces of at most ``chunk_size`` characters, each
    starting at most ``overlap`` characters before the previous one ends; cuts prefer a paragraph
    break, then a sentence end, then whitespace. ``text[start:start + len(chunk)] == chunk``."""
    _check_sizes(chunk_size, overlap)
    pieces, pos, n = [], 0, len(text)
    while word := _WORD.search(text, pos):
        pos = word.start()  # chunks start at a non-space character
        end = min(pos + chunk_size, n)
        if end < n:  # cut at the last good boundary in the second half of the window
            lo = pos + max(overlap + 1, chunk_size // 2)
            end = next((m[-1].end() for p in _CUTS if (m := list(p.finditer(text, lo, end)))), end)
        pieces.append((pos, text[pos:end].rstrip()))
        if end >= n:
            break
        nxt = end - overlap
        if overlap and not text[nxt - 1].isspace():  # start the overlap at a word boundary if any
            space = re.search(r"\s", text[nxt:end])
            nxt = nxt + space.end() if space else nxt
        pos = max(nxt, pos + 1)
    return pieces


def _check_sizes(chunk_size: int, overlap: int) -> None:
    integer("chunk_size", chunk_size)
    if not isinstance(overlap, int) or isinstance(overlap, bool) or not 0 <= overlap < chunk_size:
        raise ValueError(f"overlap must be an integer, 0 <= overlap < chunk_size ({chunk_size}), got {overlap!r}")


def _check_query(query: Any, k: Any) -> None:
    if not isinstance(query, str) or not query.strip():
        raise ValueError(f"the query must be a non-empty string, got {query!r}")
    integer("k", k)


def _as_path(item: str) -> Path | None:
    """``item`` as an existing path, else ``None`` (it is a text)."""
    try:
        path = Path(item).expanduser()
        return path if item.strip() and "\n" not in item and len(item) < 4096 and path.exists() else None
    except (OSError, ValueError, RuntimeError):  # RuntimeError: "~user" with no such user
        return None


def _read_path(path: Path) -> list[tuple[str, str]]:
    """``(source, text)`` of a file, or of every .txt/.md file under a directory."""
    files = [path] if not path.is_dir() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES)
    if not files:
        raise ValueError(f"no {'/'.join(DOC_SUFFIXES)} files under {path}")
    return [(str(f), f.read_text(encoding="utf-8", errors="replace")) for f in files]


def _files(path: str | os.PathLike) -> tuple[Path, Path]:
    """The ``(.npz, .json)`` pair of an index at ``path`` (see :meth:`RAG.save`)."""
    path = Path(path).expanduser()
    name = path.stem if path.suffix in (".npz", ".json") else path.name
    if name == path.name and (path.is_dir() or not path.with_name(name + ".json").exists()):
        path, name = path / "index", "index"
    return path.with_name(name + ".npz"), path.with_name(name + ".json")


class RAG:
    """Retrieval-augmented generation over an embedding backend and an LLM backend."""

    def __init__(self, client: Any = None, *, embedding_model: str | None = None,
                 llm_model: str | None = None, batch_size: int = 64) -> None:
        self._client, self.embedding_model, self.llm_model = client, embedding_model, llm_model
        self.batch_size = integer("batch_size", batch_size)
        self.chunks: list[Chunk] = []  # the first len(vectors) are embedded, the others pending
        self.vectors = np.zeros((0, 0), dtype=np.float32)
        self.embedded_with: str | None = None  # served name of the model that made the vectors
        self.n_texts = 0  # raw texts added so far (their sources are text[i])

    @property
    def client(self) -> Any:
        """The client given, else ``sage_nb.client.get_client()`` (resolved on first use)."""
        if self._client is None:
            from sage_nb.client import get_client

            self._client = get_client()
        return self._client

    def __len__(self) -> int:
        return len(self.chunks)

    def __repr__(self) -> str:
        return f"RAG({len(self)} chunks, {len(self.vectors)} embedded with {self.embedded_with!r})"

    def add(self, texts_or_paths: str | os.PathLike | list, chunk_size: int = 800, overlap: int = 100) -> int:
        """Chunk texts and files (directories: their .txt/.md files, recursively); a str naming an
        existing path is read as one. Returns the number of chunks added (embedded at next use)."""
        _check_sizes(chunk_size, overlap)
        items = [texts_or_paths] if isinstance(texts_or_paths, str | os.PathLike) else list(texts_or_paths)
        docs: list[tuple[str, str]] = []
        n_texts = self.n_texts
        for item in items:
            if not isinstance(item, str | os.PathLike):
                raise TypeError(f"expected a text or a path, got {type(item).__name__}")
            path = Path(item).expanduser() if isinstance(item, os.PathLike) else _as_path(item)
            if path is None:
                docs.append((f"text[{n_texts}]", item))
                n_texts += 1
            else:
                docs += _read_path(path)
        new = [Chunk(piece, source, start) for source, text in docs
               for start, piece in chunk_text(text, chunk_size, overlap)]
        self.chunks += new
        self.n_texts = n_texts
        return len(new)

    def _embed(self, oa: Any, texts: list[str]) -> np.ndarray:
        """L2-normalized float32 embeddings of ``texts``, at most ``batch_size`` inputs a request."""
        rows: list[list[float]] = []
        for i in range(0, len(texts), self.batch_size):
            reply = oa.embeddings.create(model=oa.model, input=texts[i:i + self.batch_size])
            rows += [d.embedding for d in sorted(reply.data, key=lambda d: d.index)]
        matrix = np.asarray(rows, dtype=np.float32)
        matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        if len(self.vectors) and matrix.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"the embedding backend {oa.model!r} makes {matrix.shape[1]}-d vectors but this "
                             f"index holds {self.vectors.shape[1]}-d ones from {self.embedded_with!r}")
        return matrix

    def search(self, query: str, k: int = 4) -> list[Chunk]:
        """The ``k`` chunks closest to ``query`` by cosine score, best first (``[]`` if empty)."""
        _check_query(query, k)
        if not self.chunks:
            return []
        oa = self.client.embeddings(self.embedding_model)
        pending = [c.text for c in self.chunks[len(self.vectors):]]
        if pending:  # embed the chunks added since the last search
            new = self._embed(oa, pending)
            self.vectors = np.vstack([self.vectors, new]) if len(self.vectors) else new
            self.embedded_with = self.embedded_with or oa.model
        scores = self.vectors @ self._embed(oa, [query])[0]
        return [Chunk(self.chunks[i].text, self.chunks[i].source, self.chunks[i].start, float(scores[i]))
                for i in top_k(scores, k)]

    def ask(self, question: str, k: int = 4, max_tokens: int = 256, temperature: float = 0.0,
            system: str | None = None, model: str | None = None) -> Answer:
        """Retrieve ``k`` chunks and have an LLM backend answer from them, citing them as [n] (``model``: a
        served name or a LoRA adapter's, instead of ``llm_model``)."""
        _check_query(question, k)
        integer("max_tokens", max_tokens)
        llm = self.client.llm(model or self.llm_model)  # no LLM backend: fail before any embedding work
        sources = self.search(question, k)
        context = "\n\n".join(f"[{i}] ({c.source})\n{c.text}" for i, c in enumerate(sources, 1))
        prompt = (f"Context passages:\n\n{context or '(none)'}\n\nQuestion: {question}\n"
                  "Answer, citing the passages you use as [n].")
        reply = llm.chat.completions.create(
            model=llm.model, max_tokens=max_tokens, temperature=temperature,
            messages=[{"role": "system", "content": system or DEFAULT_SYSTEM}, {"role": "user", "content": prompt}])
        return Answer((reply.choices[0].message.content or "").strip(), sources, llm.model)

    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``.npz`` (vectors) and ``.json`` (chunks, model names) files with a common stem:
        ``path`` less a ``.npz``/``.json`` suffix, else ``path/index`` when ``path`` is a directory or
        no ``path.json`` exists. Returns the two paths."""
        npz, js = _files(path)
        npz.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "embedding_model": self.embedding_model, "llm_model": self.llm_model,
                "embedded_with": self.embedded_with, "batch_size": self.batch_size, "n_texts": self.n_texts,
                "chunks": [{"text": c.text, "source": c.source, "start": c.start} for c in self.chunks]}
        with open(npz, "wb") as f:
            np.savez(f, vectors=self.vectors.astype(np.float32))
        js.write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
        return npz, js

    @classmethod
    def load(cls, path: str | os.PathLike, client: Any = None) -> RAG:
        """Read an index written by :meth:`save` (same ``path``)."""
        npz, js = _files(path)
        meta = json.loads(js.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise ValueError(f"{js} is not a {FORMAT} index")
        with np.load(npz) as data:
            vectors = np.asarray(data["vectors"], dtype=np.float32)
        rag = cls(client, **{k: meta[k] for k in ("embedding_model", "llm_model", "batch_size")})
        rag.chunks = [Chunk(c["text"], c["source"], c["start"]) for c in meta["chunks"]]
        if vectors.ndim != 2 or len(vectors) > len(rag.chunks):
            raise ValueError(f"{npz}: vectors of shape {vectors.shape} do not fit {len(rag.chunks)} chunks")
        rag.vectors, rag.embedded_with, rag.n_texts = vectors, meta["embedded_with"], meta["n_texts"]
        return rag


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` best scores, best first (ties by index): a partial partition, then a sort
    of those ``k`` only — a full sort of 100,000 scores costs 50 times more."""
    if k >= len(scores):
        return np.argsort(-scores, kind="stable")
    best = np.argpartition(-scores, k - 1)[:k]
    return best[np.lexsort((best, -scores[best]))]
