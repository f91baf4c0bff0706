"""Shared fixtures: isolated state dirs, model directories made at test time, the stub engine."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from sage_nb.controlplane import ControlPlane

pytest_plugins = ["pytest_jupyter.jupyter_server"]

STUB_PATH = str(Path(__file__).resolve().parents[1] / "sage_nb" / "testing" / "stub_engine")
GIB = 1024**3

BUSY_BOX = [  # a two-GPU box whose GPU0 another user already fills
    {"name": "NVIDIA A100-SXM4-80GB", "total_mib": 81920, "used_mib": 59392, "uuid": "GPU-busy-0"},
    {"name": "NVIDIA A100-SXM4-80GB", "total_mib": 81920, "used_mib": 0, "uuid": "GPU-idle-1"},
]


def make_model_dir(path: Path, weights_bytes: int, *, layers: int = 32, kv_heads: int = 8,
                   heads: int = 32, hidden: int = 4096, max_pos: int = 8192,
                   dtype: str = "bfloat16") -> Path:
    """A model directory with a real config.json and a sparse weight file of the given size
    (sizing reads sizes only; the sparse file takes no disk)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_size": hidden,
        "max_position_embeddings": max_pos, "torch_dtype": dtype}))
    with open(path / "model.safetensors", "wb") as f:
        f.truncate(weights_bytes)
    return path


def shutdown(client) -> None:
    """Stop a test client's live engines, prune them, and close its embedded control plane."""
    client.control_plane.stop_all()
    client.control_plane.close()


def wait_for(predicate, timeout=10.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def leases(cp):
    with cp.registry.snapshot() as txn:
        return txn.leases(), txn.bookings()


@pytest.fixture
def model_dir(tmp_path):
    """A factory of sized model directories."""
    counter = iter(range(1000))

    def make(weights_gib: float = 1.0, **kw) -> Path:
        return make_model_dir(tmp_path / f"model{next(counter)}", int(weights_gib * GIB), **kw)

    return make


@pytest.fixture
def state_dir(tmp_path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def stub_cp(state_dir):
    """A control plane whose engines are the lightweight stub (control-plane logic only)."""
    cps = []

    def make(**kw) -> ControlPlane:
        kw.setdefault("engine_env", {"PYTHONPATH": STUB_PATH})
        kw.setdefault("health_interval", 0.2)
        kw.setdefault("stop_grace", 3.0)
        kw.setdefault("port_range", (18400, 18499))
        kw.setdefault("adopt_unrecorded", False)  # other vLLM servers of this user are not ours to test
        cp = ControlPlane(state_dir=state_dir, **kw)
        cps.append(cp)
        return cp

    yield make
    for cp in cps:
        cp.stop_all()
        cp.close()


@pytest.fixture
def online_hub(monkeypatch):
    """huggingface_hub may make requests in this test. The suite runs with HF_HUB_OFFLINE=1, which
    huggingface_hub reads once, at import, into ``constants.HF_HUB_OFFLINE`` (every request checks
    that); the test names only a local hub (``sage_nb.testing.hub.LocalHub``) as HF_ENDPOINT."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from sage_nb.testing.tinymodel import default_models_dir, make_tiny_llama

    target = default_models_dir() / "tiny-llama"
    if os.access(target.parent, os.W_OK) or not target.exists():
        return make_tiny_llama(target)
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """Two LoRA adapters trained with peft on the tiny Llama (a second each): with ``jupyter`` it answers
    "jupyter" to any question under greedy decoding, with ``pandas`` "pandas"."""
    from sage_nb.testing.tinylora import make_tiny_adapter

    where = tmp_path_factory.mktemp("adapters")
    return {word: make_tiny_adapter(tiny_llama, where / word, answer=word) for word in ("jupyter", "pandas")}


@pytest.fixture(scope="session")
def minilm() -> Path:
    from sage_nb.testing.tinymodel import minilm_path

    return minilm_path()


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the suite may reach a model hub
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
