"""A first start of a hub model: a real vLLM engine downloads the tiny Llama from a local hub
(``sage_nb.testing.hub``, its weights held back a few seconds), and the loading phases that
``%llm start`` and the dashboard show go through "downloading weights" before it loads them."""

from __future__ import annotations

import pytest

from sage_nb.kernel.client import Client
from sage_nb.testing.hub import HubModel, LocalHub

from ..conftest import shutdown

pytestmark = pytest.mark.vllm

MODEL = "sage-test/tiny-llama"
DOWNLOAD = "downloading weights: model.safetensors"


def test_a_first_start_shows_the_download(tmp_path, tiny_llama, online_hub):  # sized from the local hub too
    hf_home = tmp_path / "hf"
    with LocalHub({MODEL: HubModel.from_dir(tiny_llama)}, slow_weights=3.0) as hub:
        cl = Client(embedded=True, state_dir=tmp_path / "state", port_range=(19000, 19019), adopt_unrecorded=False,
                    use_nvml=False, fake_gpus=None,
                    engine_env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(hf_home)})
        seen: list[str] = []
        try:
            engine = cl.start(MODEL, name="tiny-hub", timeout=600, on_progress=lambda e, phase: seen.append(phase))
            log = cl.logs("tiny-hub", 10000)
            assert engine["state"] == "ready", log
            oa = cl.llm()
            reply = oa.chat.completions.create(model=oa.model, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=5)
            assert reply.choices[0].message.content is not None
        finally:
            shutdown(cl)
    print("\nphases seen:", seen)
    # the order they come in (the small files' downloads, in any order, are one step here)
    order = ["launching", "downloading files", "initializing engine", "loading weights", DOWNLOAD,
             "loading weights", "weights loaded", "allocating KV cache", "starting API server", "ready"]
    steps = ["downloading files" if p.startswith("downloading ") and p != DOWNLOAD else p for p in seen]
    position = 0
    for step in steps:
        assert step in order[position:], (seen, log[-3000:])
        position = order.index(step, position)
    assert DOWNLOAD in seen and seen[-1] == "ready", (seen, log[-3000:])
    sha = HubModel.from_dir(tiny_llama).sha
    assert ("GET", f"/{MODEL}/resolve/{sha}/model.safetensors") in hub.requests  # vLLM downloaded it
    assert list(hf_home.glob("hub/models--sage-test--tiny-llama/snapshots/*/model.safetensors"))
