"""A real server process started with CUDA_VISIBLE_DEVICES (as an admin or a spawner would) and
``--SageNBApp.gpus``: its REST gpus route lists only the GPUs it may use, and an engine it starts
gets its GPU by UUID. Fake inventory, stub engines."""

import json

import psutil

from ..controlplane.test_visible_gpus import FOUR, UUIDS
from ..serverproc import running_server, stub_model, wait_ready


def test_server_lists_and_places_only_on_its_own_gpus(tmp_path):
    args = [f"--SageNBApp.fake_gpus={json.dumps(FOUR)}", "--SageNBApp.gpus=1,3"]
    with running_server(tmp_path, (18520, 18529), stub_engines=True, extra_args=args,
                        env={"CUDA_VISIBLE_DEVICES": "GPU-cccc2222,3"}) as srv:
        code, report = srv.get("sage_nb/api/gpus")
        assert code == 200 and report["source"] == "fake", report
        assert [(d["index"], d["uuid"]) for d in report["devices"]] == [(3, UUIDS[3])]
        assert "the gpus setting names GPU device(s) [1], which this server's CUDA_VISIBLE_DEVICES" \
            in report["warning"]
        code, e = srv.request("POST", "sage_nb/api/engines", {"model": stub_model(tmp_path), "name": "mine"})
        assert code == 202, e
        e = wait_ready(srv, e["id"], timeout=30)
        assert e["gpu_ids"] == [3]
        assert psutil.Process(e["pid"]).environ()["CUDA_VISIBLE_DEVICES"] == UUIDS[3]
