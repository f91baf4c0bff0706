"""The loopback Ray test cluster (issue 15): a head (no GPU) and two worker raylets with their own
fake inventories (node 1: GPU0 busy; node 2: two empty GPUs). Import ``ray_cluster`` into a test
module: one cluster per module."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from tests.conftest import BUSY_BOX

NODE1 = [{**BUSY_BOX[0], "uuid": "GPU-n1-busy"}]
NODE2 = [{**BUSY_BOX[1], "uuid": f"GPU-n2-{i}"} for i in range(2)]
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray binds 127.0.0.1, not the machine's address


@pytest.fixture(scope="module")
def ray_cluster():
    saved = {k: os.environ.get(k) for k in LOOPBACK}
    os.environ.update(LOOPBACK)  # before ray is imported: it reads this once
    ray = pytest.importorskip("ray")
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    from sage_nb.controlplane.cluster import agents

    ray_constants.ENABLE_RAY_CLUSTER = False  # in case ray was imported earlier in this process
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "env_vars": {agents.FAKE_ENV: "[]"}})
    try:
        n1 = c.add_node(num_cpus=1, env_vars={agents.FAKE_ENV: json.dumps(NODE1)})
        n2 = c.add_node(num_cpus=1, env_vars={agents.FAKE_ENV: json.dumps(NODE2)})
        assert c.address.startswith("127.0.0.1:"), c.address  # tests use loopback addresses only
        c.wait_for_nodes()
        agents.connect(c.address)
        yield SimpleNamespace(cluster=c, address=c.address, n1=n1.node_id, n2=n2.node_id, node1=n1, node2=n2)
    finally:
        ray.shutdown()
        c.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
