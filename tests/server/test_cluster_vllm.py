"""One real vLLM engine on a Ray node (issue 15), from a real Jupyter server's REST: it lands on the node
and GPU best fit says, a chat through the gateway answers, and a SIGKILLed and restarted server finds
it again, same id, routable. The loopback Cluster of ``tests/raycluster.py``."""

from __future__ import annotations

import openai
import psutil
import pytest

from tests import raycluster
from tests.raycluster import LOOPBACK

from ..serverproc import TOKEN, running_server, wait_ready

pytestmark = pytest.mark.vllm
ray_cluster = raycluster.ray_cluster  # the module's cluster


def chat(server) -> str:
    oa = openai.OpenAI(base_url=server.url + "sage_nb/v1", api_key=TOKEN, max_retries=0, timeout=120)
    answer = oa.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    return answer.choices[0].message.content


def test_a_vllm_engine_on_a_ray_node_through_rest_survives_a_server_restart(ray_cluster, tmp_path, tiny_llama):
    with running_server(tmp_path, (18950, 18969), extra_args=[f"--SageNBApp.ray_address={ray_cluster.address}"],
                        env=LOOPBACK) as server:
        code, engine = server.request("POST", "sage_nb/api/engines", {"model": str(tiny_llama), "name": "tiny"})
        assert code == 202, engine
        engine = wait_ready(server, engine["id"], timeout=400)
        assert (engine["node"], engine["host"]) == (ray_cluster.n1, "127.0.0.1")  # node 1's free room fits it
        env = psutil.Process(engine["pid"]).environ()
        assert env["SAGE_NB_RAY_NODE"] == ray_cluster.n1 and env["CUDA_VISIBLE_DEVICES"] == "GPU-n1-busy"
        assert chat(server)

        server.kill()
        server.start()
        listed = server.get("sage_nb/api/engines")[1]
        assert [(e["id"], e["node"]) for e in listed] == [(engine["id"], ray_cluster.n1)]
        again = wait_ready(server, engine["id"], timeout=60)
        assert again["pid"] == engine["pid"]
        assert chat(server)
        code, stopped = server.request("DELETE", f"sage_nb/api/engines/{engine['id']}")
        assert code == 200 and stopped["state"] == "stopped", stopped
        assert not psutil.pid_exists(engine["pid"]) or psutil.Process(engine["pid"]).status() == psutil.STATUS_ZOMBIE
