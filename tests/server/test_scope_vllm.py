"""``--scope kernel`` end to end: a real ``jupyter server`` (a fake GPU so the engine has a booking), a
real kernel of a notebook session started through ``/api/sessions``, ``%llm start <tiny Llama> --scope
kernel`` run in that kernel, a real vLLM engine; REST shows the kernel and notebook that started it;
the kernel shut down through ``/api/kernels`` takes the engine with it within seconds: its process
tree gone, its port free, its booking released."""

from __future__ import annotations

import json
import time

import psutil
import pytest
from jupyter_client import BlockingKernelClient

from sage_nb.controlplane.store.ports import bindable

from ..kernel.test_kernel_vllm import execute, text_of
from ..serverproc import running_server, wait_ready

pytestmark = pytest.mark.vllm
GPU = [{"name": "NVIDIA A100-SXM4-80GB", "total_mib": 81920, "used_mib": 0, "uuid": "GPU-scope-test"}]


def booked(server) -> int:
    return server.get("sage_nb/api/gpus")[1]["devices"][0]["booked_mib"]


def test_a_kernel_scoped_engine_ends_with_its_kernel(tmp_path, tiny_llama):
    args = [f"--SageNBApp.fake_gpus={json.dumps(GPU)}", "--SageNBApp.health_interval=0.5"]
    with running_server(tmp_path, port_range=(18970, 18989), extra_args=args) as server:
        (tmp_path / "work").mkdir()
        code, session = server.request("POST", "api/sessions", {
            "path": "work/nb.ipynb", "name": "nb.ipynb", "type": "notebook", "kernel": {"name": "python3"}})
        assert code == 201, session
        kid = session["kernel"]["id"]
        kc = BlockingKernelClient(connection_file=str(tmp_path / "runtime" / f"kernel-{kid}.json"))
        kc.load_connection_file()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=60)
            out, reply = execute(kc, "%load_ext sage_nb")
            assert reply["status"] == "ok", text_of(out)
            out, reply = execute(kc, f"%llm start {tiny_llama} --name tiny --scope kernel --no-wait")
            assert reply["status"] == "ok", text_of(out)
        finally:
            kc.stop_channels()
        listed = server.get("sage_nb/api/engines")[1]
        assert [(e["name"], e["scope"], e["kernel_id"]) for e in listed] == [("tiny", "kernel", kid)]
        assert listed[0]["notebook"] == str(tmp_path / "work" / "nb.ipynb")  # JPY_SESSION_NAME
        engine = wait_ready(server, listed[0]["id"])
        assert engine["booked_mib"] > 0 and booked(server) == engine["booked_mib"]
        tree = [psutil.Process(engine["pid"]), *psutil.Process(engine["pid"]).children(recursive=True)]

        code, _ = server.request("DELETE", f"api/kernels/{kid}")
        assert code == 204
        t0 = time.monotonic()
        while (e := server.get(f"sage_nb/api/engines/{engine['id']}")[1])["state"] != "stopped":
            assert e["state"] in ("ready", "stopping") and time.monotonic() - t0 < 30, e
            time.sleep(0.25)
        took = time.monotonic() - t0
        print(f"engine stopped {took:.1f} s after the kernel's DELETE returned")
        assert e["note"] == f"stopped: its kernel {kid} shut down"
        assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert bindable(engine["port"]) and booked(server) == 0
        assert took < 20, took  # the kernel's shutdown, a monitor pass, vLLM's exit
