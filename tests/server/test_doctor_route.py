"""``GET sage_nb/api/doctor/gpu``: the GPU doctor's report as the server sees its GPUs (its own
``CUDA_VISIBLE_DEVICES`` and ``c.SageNBApp.gpus``), behind Jupyter's auth; what ``%llm doctor --gpu`` shows in
server mode."""

import os

import pytest
from tornado.httpclient import HTTPClientError

from sage_nb.testing import fakegpu

from ..fakegpus import MIXED, fake_vllm, install
from .test_rest import call


@pytest.fixture
def fake_box(monkeypatch, tmp_path):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-h100,GPU-l4")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    return install(monkeypatch, tmp_path, MIXED)


@pytest.fixture
def jp_server_config(jp_server_config, fake_box, tmp_path):
    vllm = fake_vllm(tmp_path / "vllm", "vllm", "0.32.0", "cuda")
    path = os.pathsep.join([str(vllm), fakegpu.PATH])
    jp_server_config["SageNBApp"].update(gpus="1", engine_env={"PYTHONPATH": path})
    return jp_server_config


async def test_the_route_reports_the_servers_view(jp_fetch):
    code, model = await call(jp_fetch, "api", "doctor", "gpu")
    assert code == 200
    server = model["server"]
    assert server["cuda_visible_devices"] == "GPU-h100,GPU-l4" and server["gpus_setting"] == [1]
    assert [d["uuid"] for d in server["devices"]] == ["GPU-l4-bbbb"]
    assert [(r["uuid"], r["usable"]) for r in model["devices"]] == [("GPU-h100-aaaa", False), ("GPU-l4-bbbb", True)]
    assert model["vllm"]["build"] == "cuda" and model["exit_code"] == 0, model["checks"]
    for headers in ({"Authorization": "token wrong"}, {"Authorization": ""}):
        with pytest.raises(HTTPClientError) as exc:
            await call(jp_fetch, "api", "doctor", "gpu", headers=headers)
        assert exc.value.code == 403
