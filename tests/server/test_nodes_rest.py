"""REST over the nodes of a cluster (issue 15), a 2-node fake inventory: the gpus route's devices carry
their node, a start body may pin a node, a bad node is a 400 naming the nodes there are."""

import json

import pytest

from ..controlplane.test_nodes_placement import CLUSTER
from .test_rest import call, error

pytestmark = pytest.mark.usefixtures("cleanup_engines")


@pytest.mark.parametrize("fake_gpus", [json.dumps(CLUSTER)])
async def test_start_with_a_node_and_gpus_by_node(jp_fetch, model_dir, fake_gpus):
    _, gpus = await call(jp_fetch, "api", "gpus")
    assert [(g["index"], g["node"]) for g in gpus["devices"]] == [(0, "n1"), (1, "n1"), (2, "n2"), (3, "n2")]
    model = str(model_dir(4, max_pos=4096))
    code, e = await call(jp_fetch, "api", "engines", method="POST", body={"model": model, "node": "n2"})
    assert code in (200, 201, 202) and e["node"] == "n2" and e["gpu_ids"] == [2]
    code, message = await error(jp_fetch, "api", "engines", method="POST", body={"model": model, "node": "n9"})
    assert code == 400 and "unknown node 'n9'; this server's GPUs are on node(s) n1, n2" in message
    code, message = await error(jp_fetch, "api", "engines", method="POST",
                                body={"model": model, "node": "n1", "gpu_ids": [3]})
    assert code == 400 and "gpu_ids [3] are not on node 'n1'" in message
    code, message = await error(jp_fetch, "api", "engines", method="POST",
                                body={"model": model, "tensor_parallel_size": 2, "max_model_len": 4096,
                                      "node": "n1"})
    assert code == 409 and "of one node; free: node n1: GPU0 2384 MiB, GPU1 10384 MiB" in message
    _, engines = await call(jp_fetch, "api", "engines")
    assert [(x["node"], x["gpu_ids"]) for x in engines] == [("n2", [2])]
