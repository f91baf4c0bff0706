import pytest

from sage_nb.controlplane.errors import BadRequest
from sage_nb.controlplane.gpus.sizing import (
    BLOCK,
    CUDA_CONTEXT_MIB,
    OVERHEAD_MIB,
    inspect_model,
    local_model_dir,
    spec_from_config,
    validate_model_name,
)

GIB = 1024**3


def test_kv_cache_formula_and_need(model_dir):
    spec = inspect_model(str(model_dir(weights_gib=16, layers=32, kv_heads=8, heads=32, hidden=4096)))
    # layers x kv heads x head_dim x 2 (K,V) x 2 bytes (bf16)
    assert spec.kv_bytes_per_token() == 32 * 8 * 128 * 2 * 2
    assert spec.weights_mib() == 16 * 1024 + 1
    need = spec.need_mib(8192)
    kv_mib = 32 * 8 * 128 * 2 * 2 * 8192 / 2**20  # 1024 MiB
    assert need == int(16 * 1024 + 1 + kv_mib) + OVERHEAD_MIB + CUDA_CONTEXT_MIB
    # tensor parallel splits weights and KV cache
    assert spec.need_mib(8192, tp=2) == int((16 * 1024 + 1 + kv_mib) / 2) + OVERHEAD_MIB + CUDA_CONTEXT_MIB


def test_fp32_weights_run_in_half_precision_by_default(model_dir):
    spec = inspect_model(str(model_dir(weights_gib=4, dtype="float32")))
    assert spec.weights_mib() == 2 * 1024 + 1
    assert spec.weights_mib("float32") == 4 * 1024 + 1


def test_max_len_fitting_is_largest_block_multiple(model_dir):
    spec = inspect_model(str(model_dir(weights_gib=16, max_pos=131072)))
    avail = 20 * 1024
    fit = spec.max_len_fitting(avail)
    assert fit % BLOCK == 0 and fit > 0
    assert spec.need_mib(fit) <= avail < spec.need_mib(fit + 4 * BLOCK)
    assert spec.max_len_fitting(10 * 1024) == 0  # weights alone do not fit
    assert spec.max_len_fitting(10**7) == 131072  # capped at the model's context


def test_config_without_weights_is_estimated():
    spec = spec_from_config({"num_hidden_layers": 2, "num_attention_heads": 2, "hidden_size": 128,
                             "vocab_size": 1000}, 0, "x")
    assert spec.weights_bytes > 0 and spec.head_dim == 64 and spec.num_kv_heads == 2


def test_nested_text_config():
    spec = spec_from_config({"text_config": {"num_hidden_layers": 4, "num_attention_heads": 8,
                                             "hidden_size": 512, "num_key_value_heads": 2}}, 10, "x")
    assert (spec.num_layers, spec.num_kv_heads, spec.head_dim) == (4, 2, 64)


def test_bad_config_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "mystery"}')
    with pytest.raises(BadRequest, match="cannot size"):
        inspect_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(BadRequest, match="cannot read"):
        inspect_model(str(tmp_path))


def test_hub_cache_lookup(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    snap = tmp_path / "models--org--name" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text("{}")
    (tmp_path / "models--org--name" / "refs").mkdir()
    (tmp_path / "models--org--name" / "refs" / "main").write_text("abc")
    assert local_model_dir("org/name") == snap
    assert local_model_dir("org/other") is None


@pytest.mark.parametrize("name", ["", "   ", "/no/such/dir", "./missing", "a/b/c",
                                  "m; rm -rf /", "$(reboot)", "x`id`", "a|b", "model && ls"])
def test_invalid_model_names(name):
    with pytest.raises(BadRequest):
        validate_model_name(name)


@pytest.mark.parametrize("name", ["Qwen/Qwen2.5-7B-Instruct", "gpt2", "meta-llama/Llama-3.1-8B"])
def test_valid_hub_ids(name):
    validate_model_name(name)


def test_a_sentence_transformers_limit_caps_the_context(minilm):
    """vLLM derives max_model_len from sentence_bert_config.json's max_seq_length (256 for MiniLM,
    whose config says 512 positions) and refuses a longer --max-model-len."""
    from sage_nb.controlplane.gpus.sizing import inspect_model

    assert inspect_model(str(minilm)).max_position_embeddings == 256
