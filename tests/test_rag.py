"""The RAG helper: chunking, inputs, arguments, save/load, backend errors (fast, fake or engine-less
clients), then retrieval and answers on real engines (MiniLM embeddings, the tiny Llama)."""

from __future__ import annotations

import re
import time
import zlib
from types import SimpleNamespace

import numpy as np
import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sage_nb.client as default_client
from sage_nb.controlplane.engines.process import kill_tree
from sage_nb.controlplane.routing.router import NoBackend
from sage_nb.kernel import client as kernel_client
from sage_nb.kernel.client import Client
from sage_nb.rag import RAG, Answer, Chunk, chunk_text

SENTENCES = [f"Sentence number {i} talks about topic {i % 7} in a few plain words." for i in range(60)]
TEXT = " ".join(SENTENCES[:20]) + "\n\n" + " ".join(SENTENCES[20:40]) + "\n\n" + " ".join(SENTENCES[40:])


def check_chunks(text: str, pieces: list[tuple[int, str]], chunk_size: int, overlap: int) -> None:
    """Offsets are exact, sizes bounded, every non-space character covered, overlaps bounded."""
    covered = np.zeros(len(text), dtype=bool)
    for (start, piece), (nxt, _) in zip(pieces, [*pieces[1:], (len(text), "")], strict=False):
        assert text[start:start + len(piece)] == piece and piece == piece.strip()
        assert 0 < len(piece) <= chunk_size
        assert start < nxt and start + len(piece) - nxt <= overlap
        covered[start:start + len(piece)] = True
    assert all(covered[i] for i, ch in enumerate(text) if not ch.isspace())


# ------------------------------------------------------------------ chunking
@pytest.mark.parametrize(("chunk_size", "overlap"), [(200, 50), (200, 0), (120, 119), (800, 100), (37, 5)])
def test_chunks_are_exact_bounded_and_cover_the_text(chunk_size, overlap):
    check_chunks(TEXT, chunk_text(TEXT, chunk_size, overlap), chunk_size, overlap)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab .!?\n\t", max_size=400), st.integers(1, 60), st.data())
def test_chunk_invariants_hold_for_any_text(text, chunk_size, data):
    overlap = data.draw(st.integers(0, chunk_size - 1))
    check_chunks(text, chunk_text(text, chunk_size, overlap), chunk_size, overlap)


def test_chunks_cut_at_sentence_ends_and_overlap_by_whole_words():
    pieces = chunk_text(TEXT, 200, 50)
    assert len(pieces) > 5
    for (start, piece), (nxt, _) in zip(pieces, pieces[1:], strict=False):
        assert piece.endswith("words.")  # cut after a sentence, never mid-sentence here
        assert 0 < start + len(piece) - nxt <= 50  # overlapping ...
        assert TEXT[nxt - 1].isspace()  # ... from a word start


def test_chunks_prefer_paragraph_breaks():
    text = "\n\n".join(" ".join(SENTENCES[i:i + 3]) for i in range(0, 30, 3))  # ~200-char paragraphs
    pieces = chunk_text(text, 300, 0)
    paragraphs = text.split("\n\n")
    assert [p for _, p in pieces] == paragraphs


def test_chunks_hard_cut_without_whitespace():
    assert chunk_text("abcdefghij" * 3, 10, 3) == [(0, "abcdefghij"), (7, "hijabcdefg"), (14, "efghijabcd"),
                                                   (21, "bcdefghij")]
    assert chunk_text("", 10, 3) == [] and chunk_text(" \n\n ", 10, 3) == []
    assert chunk_text("short text", 800, 100) == [(0, "short text")]


def test_chunk_repr_is_short():
    assert repr(Chunk("x" * 100, "notes.md", 42)) == f"Chunk(notes.md@42: {'x' * 57 + '...'!r})"
    assert repr(Chunk("hi", "text[0]", 0, 0.5)) == "Chunk(text[0]@0, score=0.500: 'hi')"


# ------------------------------------------------------------------ inputs
class Untouchable:
    """A client that fails the test if anything asks it for a backend."""

    def __getattr__(self, name):
        raise AssertionError(f"the client was used: {name}")


def test_texts_get_positional_sources_across_calls():
    rag = RAG(Untouchable())
    assert rag.add("first text") == 1
    assert rag.add(["second", "", "fourth " * 300], chunk_size=500, overlap=50) > 2
    sources = [c.source for c in rag.chunks]
    assert sources[:2] == ["text[0]", "text[1]"] and set(sources[2:]) == {"text[3]"}
    assert [c.start for c in rag.chunks if c.source == "text[3]"][0] == 0
    assert len(rag) == len(rag.chunks) and len(rag.vectors) == 0  # embedded lazily


def test_files_and_directories(tmp_path):
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.txt").write_text("Alpha file about rivers.")
    (tmp_path / "docs" / "sub" / "b.md").write_text("# Beta\n\nMarkdown about mountains.")
    (tmp_path / "docs" / "skip.py").write_text("print('not a document')")
    single = tmp_path / "single.txt"
    single.write_text("x " * 1000)
    rag = RAG(Untouchable())
    assert rag.add(tmp_path / "docs") == 2
    assert [c.source for c in rag.chunks] == [str(tmp_path / "docs" / "a.txt"), str(tmp_path / "docs" / "sub" / "b.md")]
    assert rag.chunks[1].text == "# Beta\n\nMarkdown about mountains."
    n = rag.add([str(single), "raw words", single, str(tmp_path / "docs" / "a.txt")], chunk_size=500, overlap=0)
    added = rag.chunks[2:]
    assert n == len(added) == 4 + 1 + 4 + 1
    assert [c.source for c in added].count(str(single)) == 8
    assert [c for c in added if c.source == "text[0]"][0].text == "raw words"
    odd = ["~nosuchuser/notes", "", "a\x00b", "y" * 5000]  # texts, though some look like paths
    assert rag.add(odd) == 2 + 7 and [c.source for c in rag.chunks[-9:-6]] == ["text[1]", "text[3]", "text[4]"]


def test_bad_arguments_fail_before_any_backend_call(tmp_path):
    rag = RAG(Untouchable())
    for chunk_size, overlap, what in [(0, 0, "chunk_size"), (-5, 0, "chunk_size"), (1.5, 0, "chunk_size"),
                                      (True, 0, "chunk_size"), (100, -1, "overlap"), (100, 100, "overlap"),
                                      (100, 150, "overlap"), (100, 2.0, "overlap")]:
        with pytest.raises(ValueError, match=what):
            rag.add("some text", chunk_size=chunk_size, overlap=overlap)
    with pytest.raises(FileNotFoundError):
        rag.add(tmp_path / "missing.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt/.md files"):
        rag.add(tmp_path / "empty")
    with pytest.raises(TypeError, match="int"):
        rag.add(["ok", 3])
    assert len(rag) == 0  # nothing half-added
    with pytest.raises(ValueError, match="batch_size"):
        RAG(batch_size=0)
    rag.add("something")
    for k in (0, -1, 2.5, None):
        with pytest.raises(ValueError, match="k must"):
            rag.search("query", k=k)
    for query in ("", "   ", None):
        with pytest.raises(ValueError, match="query"):
            rag.search(query)
    with pytest.raises(ValueError, match="max_tokens"):
        rag.ask("question", max_tokens=0)


def test_creating_a_rag_never_resolves_the_default_client(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("get_client called")

    monkeypatch.setattr(default_client, "get_client", boom)
    rag = RAG()
    assert rag.add("text") == 1 and RAG().search("anything") == []
    with pytest.raises(AssertionError, match="get_client called"):
        rag.search("anything")


# ------------------------------------------------------------------ a fake client (no engine)
def bag_of_words(text: str, dim: int = 256) -> list[float]:
    vec = [0.0] * dim
    for word in re.findall(r"[a-z]+", text.lower()):
        vec[zlib.crc32(word.encode()) % dim] += 1.0
    return vec


class FakeClient:
    """``embeddings()``/``llm()`` as sage_nb's Client gives them, recording every request."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.chats: list[dict] = []

    def embeddings(self, model=None):
        def create(model, input):  # noqa: A002 - the OpenAI signature
            assert model == "fake-emb"
            self.batches.append(list(input))
            data = [SimpleNamespace(index=i, embedding=[x * (i + 1) for x in bag_of_words(t)])
                    for i, t in enumerate(input)]
            return SimpleNamespace(data=data[::-1])  # out of order on purpose

        return SimpleNamespace(model="fake-emb", embeddings=SimpleNamespace(create=create))

    def llm(self, model=None):
        def create(**kw):
            self.chats.append(kw)
            message = SimpleNamespace(content="  It is [1].  ")
            return SimpleNamespace(choices=[SimpleNamespace(message=message)], model="whatever")

        chat = SimpleNamespace(completions=SimpleNamespace(create=create))
        return SimpleNamespace(model=model or "fake-llm", chat=chat)


DOCS = ["volcano lava magma eruption", "chess king queen checkmate", "bread flour yeast oven",
        "jazz trumpet swing improvisation", "bees honey hive queen", "moon tides orbit phases",
        "coffee espresso caffeine beans", "dinosaurs asteroid extinction reptiles"]


def test_batched_normalized_embeddings_and_ranking():
    fake = FakeClient()
    rag = RAG(fake, batch_size=3)
    rag.add(DOCS)
    assert fake.batches == []
    hits = rag.search("lava from a volcano", k=3)
    assert [len(b) for b in fake.batches] == [3, 3, 2, 1] and fake.batches[-1] == ["lava from a volcano"]
    assert rag.vectors.dtype == np.float32 and rag.vectors.shape == (8, 256)
    assert np.allclose(np.linalg.norm(rag.vectors, axis=1), 1.0, atol=1e-6)
    assert rag.embedded_with == "fake-emb"
    assert [h.source for h in hits][0] == "text[0]" and len(hits) == 3
    query = np.array(bag_of_words("lava from a volcano"))
    assert hits[0].score == pytest.approx(float(rag.vectors[0] @ (query / np.linalg.norm(query))), abs=1e-6)
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:], strict=False)) and -1 <= hits[-1].score <= 1
    assert rag.search("espresso", k=100)[0].source == "text[6]" and len(rag.search("espresso", k=100)) == 8
    assert [len(b) for b in fake.batches[4:]] == [1, 1]  # nothing re-embedded
    rag.add("new document about espresso coffee beans")
    rag.search("coffee")
    assert [len(b) for b in fake.batches[6:]] == [1, 1]  # only the new chunk, then the query
    assert "score=" in repr(hits[0]) and "text[0]@0" in repr(hits[0])


def test_ask_builds_numbered_context_and_returns_sources():
    fake = FakeClient()
    rag = RAG(fake, llm_model="my-llm")
    rag.add(DOCS)
    answer = rag.ask("Which insects make honey?", k=2, max_tokens=32)
    assert isinstance(answer, Answer) and answer.text == "It is [1]." and answer.model == "my-llm"
    assert [c.source for c in answer.sources] == [c.source for c in rag.search("Which insects make honey?", k=2)]
    (chat,) = fake.chats
    assert chat["model"] == "my-llm" and chat["max_tokens"] == 32 and chat["temperature"] == 0.0
    system, user = chat["messages"]
    assert system["role"] == "system" and "[n]" in system["content"]
    assert "[1] (text[4])\nbees honey hive queen" in user["content"] and "[2] (" in user["content"]
    assert "[3]" not in user["content"] and "Question: Which insects make honey?" in user["content"]
    rag.ask("q", k=1, system="Be terse.")
    assert fake.chats[-1]["messages"][0]["content"] == "Be terse."
    assert rag.ask("q", k=1, model="my-adapter").model == "my-adapter"  # e.g. a LoRA adapter's name
    assert fake.chats[-1]["model"] == "my-adapter"
    shown = str(answer)
    assert shown.startswith("It is [1].\n\nSources:\n[1] text[4]@0 (score ") and "[2] " in shown
    assert "**Sources**" in answer._repr_markdown_() and "- [1] text[4]@0" in answer._repr_markdown_()
    assert str(Answer("plain")) == "plain" and Answer("plain")._repr_markdown_() == "plain"
    assert RAG(fake).ask("anything").sources == []  # empty index: the LLM still answers


# ------------------------------------------------------------------ save / load
def test_save_load_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rag = RAG(Untouchable(), embedding_model="emb-x", llm_model="llm-y", batch_size=7)
    rag.add(["é unicode text – with “quotes”", "second text " * 200], chunk_size=300, overlap=30)
    rows = rng.normal(size=(len(rag) - 1, 16)).astype(np.float32)  # the last chunk still pending
    rag.vectors = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    rag.embedded_with = "emb-x-served"
    for target, written in [(tmp_path / "dir", ("dir/index.npz", "dir/index.json")),
                            (tmp_path / "stem.v1.npz", ("stem.v1.npz", "stem.v1.json"))]:
        npz, js = rag.save(target)
        assert (npz, js) == tuple(tmp_path / w for w in written) and npz.is_file() and js.is_file()
    for source in [tmp_path / "dir", str(tmp_path / "dir" / "index.json"), tmp_path / "stem.v1",
                   tmp_path / "stem.v1.json"]:
        back = RAG.load(source, client=Untouchable())
        assert back.chunks == rag.chunks and back.vectors.dtype == np.float32
        assert np.array_equal(back.vectors, rag.vectors) and back.vectors.tobytes() == rag.vectors.tobytes()
        assert (back.embedding_model, back.llm_model, back.batch_size, back.embedded_with, back.n_texts) == (
            "emb-x", "llm-y", 7, "emb-x-served", 2)
    back.add("third")
    assert back.chunks[-1].source == "text[2]"
    with pytest.raises(FileNotFoundError):
        RAG.load(tmp_path / "nowhere")


def test_loaded_index_searches_like_the_original(tmp_path):
    rag = RAG(FakeClient())
    rag.add(DOCS)
    before = rag.search("a queen in chess", k=4)
    rag.save(tmp_path / "idx")
    back = RAG.load(tmp_path / "idx", client=FakeClient())
    assert back.search("a queen in chess", k=4) == before


# ------------------------------------------------------------------ no backend
@pytest.fixture
def bare_client(tmp_path, monkeypatch):
    """An embedded client with no engines (vLLM servers of other test runs are not adopted)."""
    client = Client(embedded=True, state_dir=tmp_path / "state", use_nvml=False, fake_gpus=None,
                    adopt_unrecorded=False)
    yield client
    client.control_plane.close()


def test_no_backend_errors_are_the_clients(bare_client):
    rag = RAG(bare_client)
    assert rag.add(DOCS) == len(DOCS)
    with pytest.raises(NoBackend) as e:
        rag.search("lava")
    assert str(e.value) == "No embedding backend available. Start one with: %llm start <model> --embedding"
    with pytest.raises(NoBackend) as e:
        rag.ask("lava")
    assert str(e.value) == "No LLM backend available. Start one with: %llm start <model>"
    assert len(rag) == len(DOCS) and len(rag.vectors) == 0


# ------------------------------------------------------------------ real engines
TOPICS = [
    "Volcanoes form where molten rock called magma rises through cracks in the Earth's crust. When pressure "
    "builds up, an eruption throws out lava, ash and gas, and the lava cools into new rock.",
    "Chess is a board game for two players on an eight-by-eight grid. Each side commands a king, a queen, "
    "rooks, bishops, knights and pawns, and the goal is to checkmate the opposing king.",
    "To bake bread, mix flour, water, salt and yeast into a dough, knead it, and let it rise until it doubles. "
    "Then shape the loaf and bake it in a hot oven until the crust is golden brown.",
    "Photosynthesis is how green plants turn sunlight into food. Using chlorophyll in their leaves, they "
    "combine carbon dioxide and water to make glucose, releasing oxygen as a by-product.",
    "The stock market is where shares of public companies are bought and sold. Prices move with supply and "
    "demand, and investors hope the value of their shares grows over time.",
    "Jazz is a style of music that grew up in New Orleans in the early twentieth century. It is known for "
    "swing rhythms, blue notes and improvised solos on trumpet, saxophone and piano.",
    "Honeybees live in colonies ruled by a single queen. Worker bees collect nectar and pollen from flowers, "
    "and they turn the nectar into honey stored in wax combs.",
    "The Moon orbits the Earth about once every 27 days. Its gravity pulls on the oceans and causes the "
    "tides, and its phases change from new moon to full moon as it travels.",
    "Soccer is played by two teams of eleven players who try to kick a ball into the other team's goal. "
    "Only the goalkeeper may touch the ball with the hands.",
    "Coffee is brewed from roasted beans of the coffee plant. The caffeine it contains keeps people awake, "
    "and espresso is made by forcing hot water through finely ground beans.",
    "Vaccines train the immune system to recognise a germ without causing the disease. After vaccination "
    "the body makes antibodies, so a later infection is fought off quickly.",
    "The Roman Empire was ruled from Rome by emperors such as Augustus. Its legions built roads, aqueducts "
    "and forts across Europe, and Latin spread as its language.",
    "Python is a programming language known for readable code. Programmers write functions and loops, and "
    "an interpreter runs the program line by line.",
    "In the water cycle, the sun heats seas and lakes so water evaporates. The vapour cools into clouds, "
    "falls back as rain or snow, and flows through rivers to the sea again.",
    "Dinosaurs were reptiles that ruled the land for over 150 million years. Most of them died out 66 "
    "million years ago, probably after a huge asteroid struck the Earth.",
    "Knitting makes fabric from yarn using two needles. Loops of wool are pulled through one another row "
    "by row to make scarves, sweaters and socks.",
    "Climbing Mount Everest, the highest mountain on Earth, takes weeks. Climbers use oxygen bottles, ropes "
    "and ice axes to survive the thin air and freezing cold near the summit.",
    "Cats are small carnivorous pets that purr when content. They sleep for much of the day, groom their "
    "fur with rough tongues, and hunt mice and birds.",
    "Electric current is a flow of electrons through a wire. Voltage pushes the current, resistance slows "
    "it, and a battery or generator provides the energy.",
    "The Olympic Games bring together athletes from around the world every four years. Winners of each "
    "event receive gold medals, and the first modern Games were held in Athens in 1896.",
]
QUESTIONS = [  # paraphrases -> the index of the document that must rank first
    ("What happens when hot liquid rock bursts out of a mountain?", 0),
    ("Which game ends when you trap the opponent's monarch piece?", 1),
    ("How can I prepare a homemade loaf in my kitchen?", 2),
    ("How do leaves make sugar out of light?", 3),
    ("Where can investors buy a stake in corporations?", 4),
    ("Which musical genre is famous for improvisation and swing?", 5),
    ("Which insects produce a sweet syrup in their hives?", 6),
    ("How does an injection protect you from getting ill?", 10),
    ("What wiped out the giant prehistoric lizards?", 14),
    ("Which competition awards medals to sportspeople every four years?", 19),
]


@pytest.fixture(scope="module")
def engines(tmp_path_factory, tiny_llama, minilm):
    """An embedded client with MiniLM (embedding) and the tiny Llama (llm), loaded in parallel."""
    client = Client(embedded=True, state_dir=tmp_path_factory.mktemp("rag-state"), port_range=(18200, 18299),
                    use_nvml=False, fake_gpus=None, adopt_unrecorded=False)  # only its own engines
    started, pids = [], []
    t0 = time.monotonic()
    try:
        for model, kind in ((minilm, "embedding"), (tiny_llama, "llm")):
            engine = client.start(str(model), kind, name=f"rag-{kind}", wait=False)
            started.append(engine["id"])
            pid = client.engine(engine["id"])["pid"]
            if pid:
                pids.append((pid, psutil.Process(pid).create_time()))
        emb, llm = (client.wait_ready(i, timeout=600) for i in started)
        print(f"\nengines ready in {time.monotonic() - t0:.1f} s")
        yield {"client": client, "emb": emb, "llm": llm}
    finally:
        for engine_id in started:
            try:
                client.stop(engine_id)
            except Exception as e:  # still make sure below that nothing is left
                print(f"stopping {engine_id}: {e}")
        client.prune()
        left = [p for pid, created in pids for p in kill_tree(pid, created, grace=3.0)]
        client.control_plane.close()
        assert not left, f"engine processes left: {left}"


@pytest.fixture(scope="module")
def index(engines):
    rag = RAG(engines["client"])
    assert rag.add(TOPICS) == len(TOPICS)
    return rag


@pytest.mark.vllm
def test_paraphrased_questions_find_their_document(index, engines):
    for question, expected in QUESTIONS:
        hits = index.search(question, k=3)
        assert hits[0].source == f"text[{expected}]", (question, hits)
        assert hits[0].text == TOPICS[expected] and hits[0].score > hits[1].score >= hits[2].score
    assert index.vectors.shape == (len(TOPICS), 384) and index.embedded_with == engines["emb"]["served_model_name"]
    assert np.allclose(np.linalg.norm(index.vectors, axis=1), 1.0, atol=1e-5)


@pytest.mark.vllm
def test_ask_answers_with_the_llm_and_the_top_chunks(index, engines):
    question = QUESTIONS[0][0]
    # greedy decoding of the random tiny Llama gives only newlines (stripped: ""); sampling gives text
    answer = index.ask(question, k=3, max_tokens=16, temperature=1.0)
    assert isinstance(answer, Answer) and answer.text and answer.text == answer.text.strip()
    assert answer.model == engines["llm"]["served_model_name"] == engines["client"].llm().model
    top = index.search(question, k=3)
    assert [(c.source, c.start, c.text) for c in answer.sources] == [(c.source, c.start, c.text) for c in top]
    assert [c.score for c in answer.sources] == pytest.approx([c.score for c in top], abs=1e-4)
    assert "Sources:\n[1] text[0]@0" in str(answer)


@pytest.mark.vllm
def test_default_client_and_save_load_on_real_engines(index, engines, tmp_path):
    previous = kernel_client._default
    default_client.set_client(engines["client"])
    try:
        rag = RAG()  # the shared client, resolved at first use
        rag.add(TOPICS[:5])
        assert rag.search(QUESTIONS[1][0], k=1)[0].source == "text[1]"
    finally:
        default_client.set_client(previous)
    index.save(tmp_path / "index")
    back = RAG.load(tmp_path / "index", client=engines["client"])
    assert len(back) == len(index) and np.array_equal(back.vectors, index.vectors)
    question = QUESTIONS[2][0]
    assert [c.source for c in back.search(question, k=3)] == [c.source for c in index.search(question, k=3)]

