"""A start on a machine without GPUs is sized and checked against the free host memory (psutil),
less what this registry's engines still loading will take; a refusal is a 409 with the numbers,
before anything is launched. The engines are the stub (they take no real memory)."""

from __future__ import annotations

import psutil
import pytest

from sage_nb.controlplane import BadRequest, Conflict, ControlPlane
from sage_nb.controlplane.gpus import hostmem
from sage_nb.controlplane.store.registry import Engine

from ..conftest import GIB, STUB_PATH, leases

MIB = 1024 * 1024


def test_a_model_larger_than_the_machine_is_refused_with_the_numbers(stub_cp, model_dir):
    cp = stub_cp(use_nvml=False)
    total_gib = psutil.virtual_memory().total / GIB
    model = model_dir(weights_gib=2 * total_gib)
    with pytest.raises(Conflict) as refused:
        cp.start_engine(str(model), wait=False)
    message = refused.value.message
    assert refused.value.status == 409 and cp.engines() == [] and leases(cp) == ({}, [])
    weights = int(2 * total_gib * GIB) // MIB + 1
    need = weights + 1024 + hostmem.CPU_RUNTIME_MIB
    assert (f"it needs {need} MiB of host memory (weights {weights} + KV cache 1024 (VLLM_CPU_KVCACHE_SPACE) + "
            f"engine runtime {hostmem.CPU_RUNTIME_MIB})") in message
    assert f"of {psutil.virtual_memory().total // MIB} MiB" in message and "\n" not in message
    with pytest.raises(Conflict) as planned:
        cp.plan(str(model))
    assert planned.value.message.split("; free")[0] == message.split("; free")[0]


def test_a_fitting_model_records_what_it_takes(stub_cp, model_dir):
    cp = stub_cp(use_nvml=False, engine_env={"PYTHONPATH": STUB_PATH, "VLLM_CPU_KVCACHE_SPACE": "2"})
    model = model_dir(weights_gib=1, layers=2, kv_heads=2, hidden=128, heads=2, max_pos=2048)
    plan = cp.plan(str(model))
    engine = cp.start_engine(str(model))
    weights = GIB // MIB + 1
    for record in (plan, engine):
        assert record["host_mib"] == weights + 2048 + hostmem.CPU_RUNTIME_MIB and record["weights_mib"] == weights
        assert record["gpu_ids"] == [] and record["booked_mib"] == 0 and record["max_model_len"] is None
    assert engine["state"] == "ready"


def test_engines_still_loading_count_against_the_free_memory(stub_cp, model_dir):
    """Two starts that fit one at a time: while the first loads, its need is held back from the free
    memory (it has not taken it yet), so the second is refused; once it is ready it is not."""
    cp = stub_cp(use_nvml=False, engine_env={"PYTHONPATH": STUB_PATH, "STUB_STARTUP_DELAY": "4"})
    available = psutil.virtual_memory().available / GIB
    model = model_dir(weights_gib=0.6 * available - 2.5)
    first = cp.start_engine(str(model), wait=False)
    assert first["state"] == "starting"
    with pytest.raises(Conflict, match="MiB that engines still loading here will take"):
        cp.start_engine(str(model), wait=False)
    cp.wait_ready(first["id"], timeout=60)
    second = cp.start_engine(str(model), wait=False)  # the stub took none of it
    assert second["state"] == "starting" and len(cp.engines()) == 2


def test_the_kv_cache_bounds_max_model_len_on_cpu(stub_cp, model_dir):
    cp = stub_cp(use_nvml=False)
    # 28 layers x 4 KV heads x 128 x 2 x 2 bytes = 56 KiB a token: 1 GiB holds 18,724, 18,720 in blocks of 16
    model = model_dir(weights_gib=0.5, layers=28, kv_heads=4, heads=28, hidden=3584, max_pos=32768)
    plan = cp.plan(str(model))
    assert plan["max_model_len"] == 18720 and "reduced from 32768 to 18720 to fit the KV cache on CPU" in plan["note"]
    assert cp.plan(str(model), max_model_len=8192)["max_model_len"] == 8192
    with pytest.raises(Conflict, match="max_model_len 32768 does not fit its KV cache on CPU, which holds 18720 "
                                       "tokens: give max_model_len 18720 or less, or raise VLLM_CPU_KVCACHE_SPACE"):
        cp.plan(str(model), max_model_len=32768)
    assert cp.engines() == []


def test_an_offline_hub_model_is_refused_before_anything_starts(stub_cp):
    """The README's first example on an offline machine without GPUs: a 400 saying why, nothing made."""
    cp = stub_cp(use_nvml=False, engine_env={"PYTHONPATH": STUB_PATH, "HF_HUB_OFFLINE": "1"})
    with pytest.raises(BadRequest, match="model 'Qwen/Qwen2.5-7B-Instruct' is not on this machine .* and "
                                         "HF_HUB_OFFLINE is set, so the hub is not asked for its size"):
        cp.start_engine("Qwen/Qwen2.5-7B-Instruct")
    assert cp.engines() == [] and leases(cp) == ({}, [])


def test_kv_cache_setting_and_pending_memory(tmp_path):
    assert hostmem.kv_cache_gib({"VLLM_CPU_KVCACHE_SPACE": "4"}, 1) == 4
    assert hostmem.kv_cache_gib({"VLLM_CPU_KVCACHE_SPACE": "0"}, 2) == 2  # 0: the setting, not vLLM's own guess
    assert hostmem.kv_cache_gib({"VLLM_CPU_KVCACHE_SPACE": "lots"}, 3) == 3 and hostmem.kv_cache_gib({}, 1) == 1
    loading = Engine(id="a", name="a", model="m", served_model_name="m", kind="llm", host_mib=5000)
    ready = Engine(id="b", name="b", model="m", served_model_name="m", kind="llm", host_mib=7000, state="ready")
    on_gpu = Engine(id="c", name="c", model="m", served_model_name="m", kind="llm", host_mib=0, gpu_ids=[0])
    assert hostmem.pending_mib([loading, ready, on_gpu]) == 5000


def test_a_gpu_box_is_not_checked_against_host_memory(stub_cp, model_dir):
    cp: ControlPlane = stub_cp(fake_gpus=[{"name": "big", "total_mib": 10_000_000, "used_mib": 0, "uuid": "GPU-x"}])
    total_gib = psutil.virtual_memory().total / GIB
    plan = cp.plan(str(model_dir(weights_gib=2 * total_gib)))
    assert plan["gpu_ids"] == [0] and plan["host_mib"] == 0
