"""Sizing a model that is not on this machine from the hub's metadata, against a local hub
(``sage_nb.testing.hub``): placement and booking as for the same model on disk, a refusal with the
numbers that costs nothing beyond the metadata round trip, and one clear message for each way the
hub can fail (offline, unreachable, gated, missing). The engines are the stub: nothing is downloaded."""

import json
import socket
import time

import psutil
import pytest

from sage_nb.controlplane import BadRequest
from sage_nb.controlplane.errors import NoRoom
from sage_nb.controlplane.gpus.sizing import inspect_hub_model
from sage_nb.testing.hub import HubModel, LocalHub

from ..conftest import BUSY_BOX, GIB, leases, make_model_dir

pytestmark = pytest.mark.usefixtures("online_hub")

LLAMA_34B = dict(layers=48, kv_heads=8, heads=56, hidden=7168, max_pos=16384)
LLAMA_70B = dict(layers=80, kv_heads=8, heads=64, hidden=8192, max_pos=131072)


def config(layers, kv_heads, heads, hidden, max_pos, dtype="bfloat16") -> dict:
    """The config.json make_model_dir writes, for the same shape."""
    return {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "hidden_size": hidden, "max_position_embeddings": max_pos,
            "torch_dtype": dtype}


def shards(total: int, n: int) -> dict[str, int]:
    """``n`` safetensors shards adding up to ``total`` bytes, plus what else a hub repo holds."""
    sizes = {f"model-{i + 1:05d}-of-{n:05d}.safetensors": total // n for i in range(n)}
    sizes[f"model-{n:05d}-of-{n:05d}.safetensors"] += total % n
    # not loaded by vLLM: a consolidated checkpoint in a subfolder, a tokenizer
    return {**sizes, "original/consolidated.00.pth": total, "tokenizer.json": 9_000_000}


MODELS = {
    "sage-test/made-up-34b": HubModel.metadata_only(config(**LLAMA_34B), shards(int(40 * GIB), 7)),
    "sage-test/made-up-70b": HubModel.metadata_only(config(**LLAMA_70B), shards(int(131.5 * GIB), 30)),
    "sage-test/gated-401": HubModel.metadata_only(config(**LLAMA_34B), shards(GIB, 1), gated=401),
    "sage-test/gated-403": HubModel.metadata_only(config(**LLAMA_34B), shards(GIB, 1), gated=403),
}


@pytest.fixture(scope="module")
def hub():
    with LocalHub(MODELS) as hub:
        yield hub


@pytest.fixture
def hub_env(hub, tmp_path):
    """The engines' environment: the local hub, online, an empty cache."""
    return {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}


def test_a_hub_model_is_placed_and_booked_as_the_same_model_on_disk(stub_cp, hub, hub_env, tmp_path):
    cp = stub_cp(fake_gpus=BUSY_BOX, engine_env=hub_env)
    on_disk = make_model_dir(tmp_path / "local-34b", int(40 * GIB), **LLAMA_34B)
    hub.requests.clear()
    planned = cp.plan("sage-test/made-up-34b")
    sha = MODELS["sage-test/made-up-34b"].sha  # two requests: the file sizes, then config.json at that commit
    assert hub.requests == [("GET", "/api/models/sage-test/made-up-34b"),
                            ("GET", f"/sage-test/made-up-34b/resolve/{sha}/config.json")]
    local = cp.plan(str(on_disk))
    keys = ("gpu_ids", "booked_mib", "weights_mib", "max_model_len", "gpu_memory_utilization", "note")
    assert {k: planned[k] for k in keys} == {k: local[k] for k in keys}
    assert planned["gpu_ids"] == [1] and planned["weights_mib"] == 40 * 1024 + 1  # the shards, not original/
    engine = cp.start_engine("sage-test/made-up-34b", name="m34", wait=False)
    assert engine["state"] == "starting" and engine["booked_mib"] == local["booked_mib"]
    _, bookings = leases(cp)
    assert [(eid, index, mib) for eid, index, _uuid, mib in bookings] == [(engine["id"], 1, local["booked_mib"])]
    assert not list((tmp_path / "hf").rglob("config.json"))  # sizing writes nothing to the engines' cache
    # a hub model's engine logs huggingface_hub's downloads (the "downloading weights" phase); a local one not
    env = psutil.Process(cp.engine("m34")["pid"]).environ()
    assert env["HF_HUB_VERBOSITY"] == "debug" and env["HF_ENDPOINT"] == hub.url
    local_engine = cp.start_engine(str(make_model_dir(tmp_path / "small", GIB)), name="local", wait=False)
    assert "HF_HUB_VERBOSITY" not in psutil.Process(local_engine["pid"]).environ()


def test_a_hub_model_that_fits_nowhere_is_refused_with_numbers_at_once(stub_cp, hub_env, capsys):
    cp = stub_cp(fake_gpus=BUSY_BOX, engine_env=hub_env)
    model = "sage-test/made-up-70b"
    inspect_hub_model(model, hub_env)  # huggingface_hub imported and connected once, as in a running server
    rounds = []
    for _ in range(3):
        t0 = time.perf_counter()
        inspect_hub_model(model, hub_env)
        t1 = time.perf_counter()
        with pytest.raises(NoRoom) as planned:
            cp.plan(model)
        t2 = time.perf_counter()
        with pytest.raises(NoRoom) as started:
            cp.start_engine(model, wait=False)
        t3 = time.perf_counter()
        rounds.append((t1 - t0, t2 - t1, t3 - t2))
    for exc in (planned, started):
        assert "no GPU has room for model 'sage-test/made-up-70b'" in exc.value.message
        assert "free: GPU0 22528 MiB, GPU1 81920 MiB" in exc.value.message
    assert cp.engines() == [] and leases(cp) == ({}, [])
    with capsys.disabled():
        print("\nhub sizing, seconds per round (metadata round trip, plan refused, start refused): "
              + "; ".join(f"{a:.4f} {b:.4f} {c:.4f}" for a, b, c in rounds))
    # the refusal costs under 100 ms beyond the metadata round trip (the best of three: a loaded box)
    assert min(b - a for a, b, _ in rounds) < 0.1
    assert min(c - a for a, _, c in rounds) < 0.1


def test_hub_failures_each_say_what_is_wrong(stub_cp, hub_env):
    def refusal(model, **env):
        cp = stub_cp(fake_gpus=BUSY_BOX, engine_env={**hub_env, **env})
        with pytest.raises(BadRequest) as exc:
            cp.start_engine(model, wait=False)
        assert cp.engines() == [] and leases(cp) == ({}, [])
        with pytest.raises(BadRequest) as planned:
            cp.plan(model)
        assert planned.value.message == exc.value.message
        assert "cannot size model" not in exc.value.message  # the old catch-all
        return exc.value.message

    hub = hub_env["HF_ENDPOINT"]
    for status in (401, 403):
        message = refusal(f"sage-test/gated-{status}")
        assert f"'sage-test/gated-{status}' on {hub} is gated or private" in message and f"({status})" in message
        assert "accept its license" in message and "hf auth login" in message and "HF_TOKEN" in message
    message = refusal("sage-test/no-such-model")
    assert f"no model 'sage-test/no-such-model' on the hub at {hub} (404): check the id" in message
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{s.getsockname()[1]}"
    message = refusal("sage-test/made-up-34b", HF_ENDPOINT=nobody)
    assert f"the hub at {nobody} is unreachable" in message and "not in the Hugging Face cache" in message
    assert "local model directory" in message and "HF_HUB_OFFLINE" in message
    message = refusal("sage-test/made-up-34b", HF_HUB_OFFLINE="1")
    assert "not in the Hugging Face cache" in message
    assert "HF_HUB_OFFLINE is set, so the hub is not asked for its size" in message


def test_offline_asks_no_hub(hub, hub_env):
    hub.requests.clear()
    with pytest.raises(BadRequest, match="HF_HUB_OFFLINE is set"):
        inspect_hub_model("sage-test/made-up-34b", {**hub_env, "HF_HUB_OFFLINE": "1"})
    assert hub.requests == []


def test_a_cached_model_is_sized_from_the_cache_not_the_hub(stub_cp, hub, hub_env, tmp_path):
    """The engines' HF_HOME (engine_env) is where sizing looks first: a model vLLM downloaded there
    is sized from its files, and the hub is not asked."""
    snap = tmp_path / "hf" / "hub" / "models--sage-test--made-up-34b" / "snapshots" / "abc"
    make_model_dir(snap, int(40 * GIB), **LLAMA_34B)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc")
    cp = stub_cp(fake_gpus=BUSY_BOX, engine_env=hub_env)
    hub.requests.clear()
    assert cp.plan("sage-test/made-up-34b")["gpu_ids"] == [1] and hub.requests == []


def test_the_config_is_read_as_json(hub, hub_env):
    spec = inspect_hub_model("sage-test/made-up-70b", hub_env)
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim, spec.max_position_embeddings) == (80, 8, 128, 131072)
    assert spec.weights_bytes == int(131.5 * GIB) and json.loads(MODELS["sage-test/made-up-70b"].files["config.json"])
