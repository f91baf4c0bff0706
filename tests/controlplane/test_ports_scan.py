import os
import socket
import subprocess
import sys
import time

import pytest

from sage_nb.controlplane.engines.scan import find_orphans, parse_cmdline
from sage_nb.controlplane.errors import Conflict
from sage_nb.controlplane.store.ports import bindable, lease
from sage_nb.controlplane.store.registry import Engine, Registry


@pytest.fixture
def reg(tmp_path):
    r = Registry(tmp_path / "r.db")
    with r.transaction() as txn:
        txn.insert(Engine(id="e1", name="holder", model="m", served_model_name="m", kind="llm"))
    return r


def test_leases_skip_leased_and_bound_ports(reg):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with reg.transaction() as txn:
            first = lease(txn, "a", (port, port + 5))
            second = lease(txn, "b", (port, port + 5))
        assert first == port + 1 and second == port + 2  # `port` is bound by someone else
        assert not bindable(port)


def test_requested_port_leased_or_bound_is_409_naming_holder(reg):
    with reg.transaction() as txn:
        lease(txn, "e1", (18950, 18959), 18950)
    with pytest.raises(Conflict, match=r"18950 is already leased to engine 'holder' \(e1, starting\)"), \
            reg.transaction() as txn:
        lease(txn, "x", (18950, 18959), 18950)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(Conflict, match=f"in use by pid {os.getpid()}"), reg.transaction() as txn:
            lease(txn, "x", (18950, 18959), port)


def test_release_and_exhaustion(reg):
    with reg.transaction() as txn:
        lease(txn, "a", (18960, 18961))
        lease(txn, "b", (18960, 18961))
    with pytest.raises(Conflict, match="no free port left"), reg.transaction() as txn:
        lease(txn, "c", (18960, 18961))
    with reg.transaction() as txn:
        txn.release_all("a")
        assert lease(txn, "c", (18960, 18961)) == 18960


@pytest.mark.parametrize("argv,expect", [
    (["/v/bin/python", "-m", "vllm.entrypoints.openai.api_server", "--model", "/m/tiny", "--port", "9001",
      "--served-model-name", "tiny", "other"],
     {"model": "/m/tiny", "port": 9001, "served_model_name": "tiny", "kind": "llm"}),
    (["vllm", "serve", "BAAI/bge-small", "--port=8001", "--task", "embed"],
     {"model": "BAAI/bge-small", "port": 8001, "served_model_name": "BAAI/bge-small", "kind": "embedding"}),
    (["/usr/bin/vllm", "serve", "m", "--runner", "pooling", "--api-key", "k"],
     {"port": 8000, "kind": "embedding", "api_key": "k"}),
    (["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "m", "--convert", "embed",
      "-tp", "2", "--max-model-len", "4096"],
     {"kind": "embedding", "tensor_parallel_size": 2, "max_model_len": 4096}),
    (["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "m", "--runner", "generate"],
     {"kind": "llm"}),
])
def test_parse_vllm_command_lines(argv, expect):
    parsed = parse_cmdline(argv)
    assert {k: parsed[k] for k in expect} == expect


@pytest.mark.parametrize("argv", [["python", "app.py"], ["VLLM::EngineCore", "", ""], ["vllm", "bench"],
                                  ["python", "-m", "vllm.entrypoints.openai.api_server", "--port", "x"]])
def test_not_a_vllm_server(argv):
    assert parse_cmdline(argv) is None


ORPHAN = r"""
import os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c",
    "import setproctitle, time; setproctitle.setproctitle('VLLM::EngineCore'); time.sleep(60)"])
print(child.pid, flush=True)
os._exit(0)  # the group leader dies, like a SIGKILLed api_server
"""


def test_orphaned_vllm_children_are_reported():
    leader = subprocess.Popen([sys.executable, "-c", ORPHAN], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    orphan_pid = int(leader.stdout.readline())
    leader.wait()
    try:
        deadline = time.monotonic() + 10
        while not (found := [o for o in find_orphans(set()) if o["pid"] == orphan_pid]):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert found[0]["title"] == "VLLM::EngineCore" and found[0]["pgid"] == leader.pid
        assert not [o for o in find_orphans({leader.pid}) if o["pid"] == orphan_pid]  # known group
    finally:
        os.kill(orphan_pid, 9)

