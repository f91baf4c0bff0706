"""One scan of the process table for every engine's pids (GPU attribution on each reading) gives what
a scan per engine gives (zombies left out): the group with its orphans, the descendants, nothing for a
reused pid."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from sage_nb.controlplane.engines.process import start_time, tree_pids, trees_pids

# a session leader with a child, and a grandchild whose parent exits (an orphan still in the group)
TREE = """
import os, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
if os.fork() == 0:
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    os._exit(0)
print("up", flush=True)
time.sleep(60)
"""


def spawn_tree() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout.readline().strip() == b"up"
    time.sleep(0.3)  # the orphan's sleeper is up
    return proc


def test_one_scan_finds_each_engines_group_and_descendants_like_a_scan_each():
    trees = [spawn_tree(), spawn_tree()]
    try:
        engines = {f"e{i}": (p.pid, start_time(p.pid)) for i, p in enumerate(trees)}
        engines["reused"] = (trees[0].pid, start_time(trees[0].pid) - 100)  # same pid, another start
        engines["gone"] = (None, None)
        each = {eid: tree_pids(pid, start) for eid, (pid, start) in engines.items()}
        once = trees_pids(engines)
        for eid in ("e0", "e1"):  # a scan each also lists the exited fork, a zombie that holds nothing
            assert once[eid] == {p for p in each[eid] if psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        assert len(once["e0"]) == 3 and trees[0].pid in once["e0"]  # the leader, its child, the orphan
        assert not once["e0"] & once["e1"]
        assert once["reused"] == set() == each["reused"] and "gone" not in once
    finally:
        for p in trees:
            subprocess.run(["pkill", "-KILL", "-g", str(p.pid)], check=False)
            p.wait()
