"""%llm over the nodes of a cluster (issue 15), embedded mode with a 2-node fake inventory: ``--node``,
the node column of ``%llm engines``, ``%llm gpus`` grouped by node; on one machine no node shows."""

import pytest

from sage_nb import client as default_client
from sage_nb.kernel.client import Client
from sage_nb.kernel.magics import SageNBError
from sage_nb.kernel.parsing import parse_line
from sage_nb.kernel.views import engines_table, gpus_table

from ..conftest import STUB_PATH, shutdown
from ..controlplane.test_nodes_placement import CLUSTER


@pytest.fixture
def cluster_shell(shell, state_dir):
    default_client.get_client().control_plane.close()
    cl = Client(state_dir=state_dir, engine_env={"PYTHONPATH": STUB_PATH}, port_range=(18300, 18399),
                adopt_unrecorded=False, health_interval=0.2, fake_gpus=CLUSTER)
    default_client.set_client(cl)
    shell.magics_manager.registry["LLMMagics"]._client = None
    yield shell
    shutdown(cl)


def llm(shell, line):
    return shell.run_line_magic("llm", line)


def test_node_option_parses():
    assert parse_line("start org/m --node n2 --tp 2").args.node == "n2"
    assert parse_line("start org/m").args.node is None


def test_start_on_a_node_and_the_tables_show_nodes(cluster_shell, model_dir):
    model = model_dir(4, max_pos=4096)
    table = llm(cluster_shell, f"start {model} --name fit")  # best fit: n1's GPU1
    assert "node" in table.columns and "n1" in repr(table)
    llm(cluster_shell, f"start {model} --name pinned --node n2")
    engines = {row[1]: row for row in llm(cluster_shell, "engines").rows}
    assert engines["pinned"][4:6] == ["n2", "2"] and engines["fit"][4:6] == ["n1", "1"]
    gpus = llm(cluster_shell, "gpus")
    assert gpus.columns[:2] == ["node", "gpu"]
    assert [row[:2] for row in gpus.rows] == [["n1", "0"], ["n1", "1"], ["n2", "2"], ["n2", "3"]]
    with pytest.raises(SageNBError, match="unknown node 'n7'; this server's GPUs are on node\\(s\\) n1, n2"):
        llm(cluster_shell, f"start {model} --node n7")


def test_tables_group_by_node_and_show_none_on_one_machine():
    dev = {"name": "g", "total_mib": 1, "used_mib": 0, "booked_mib": 0, "available_mib": 1}
    report = {"source": "fake", "devices": [dict(dev, index=0, node="b"), dict(dev, index=1, node="a"),
                                            dict(dev, index=2, node="b"), dict(dev, index=3, node=None)]}
    assert [row[:2] for row in gpus_table(report).rows] == [["b", "0"], ["b", "2"], ["a", "1"],
                                                            ["(this machine)", "3"]]
    local = {"source": "fake", "devices": [dict(dev, index=0, node=None)]}
    assert "node" not in gpus_table(local).columns
    engine = {"id": "e", "name": "n", "kind": "llm", "state": "ready", "gpu_ids": [0], "port": 1,
              "served_model_name": "m", "node": None}
    assert "node" not in engines_table([engine]).columns
