"""Placement over the nodes of a cluster (issue 15), with a fake inventory that names each GPU's node:
best fit over (node, GPUs), tensor parallel within one node, a request pinning a node, refusals with
numbers per node, the engine record's node. Single-machine behaviour is test_placement.py's."""

import pytest

from sage_nb.controlplane import BadRequest, Settings
from sage_nb.controlplane.errors import NoRoom
from sage_nb.controlplane.gpus.inventory import GpuDevice
from sage_nb.controlplane.gpus.placement import best_available, choose_gpus, gpu_views

from ..conftest import leases

GIB16 = 16384
# node n1: GPU0 busy, GPU1 free-ish; node n2: two empty GPUs. A 4 GiB model needs 6145 MiB on one
# GPU, or 3840 MiB on each of two: the two tightest GPUs that fit are GPU1 (n1) and GPU2 (n2).
CLUSTER = [{"name": "L4", "total_mib": GIB16, "used_mib": 14000, "uuid": "GPU-n1-0", "node": "n1"},
           {"name": "L4", "total_mib": GIB16, "used_mib": 6000, "uuid": "GPU-n1-1", "node": "n1"},
           {"name": "L4", "total_mib": GIB16, "used_mib": 0, "uuid": "GPU-n2-0", "node": "n2"},
           {"name": "L4", "total_mib": GIB16, "used_mib": 0, "uuid": "GPU-n2-1", "node": "n2"}]
# one GPU with room on each node: only the two nodes together would fit a 2-GPU engine
SPLIT = [dict(CLUSTER[0]), dict(CLUSTER[1]), dict(CLUSTER[2], used_mib=6000), dict(CLUSTER[3], used_mib=14000)]


def views_of(*nodes_used):
    return gpu_views([GpuDevice(index=i, uuid=f"G{i}", name="gpu", total_mib=GIB16, used_mib=u, node=n)
                      for i, (n, u) in enumerate(nodes_used)], [], {})


def indices(chosen):
    return [v.device.index for v in chosen]


def test_the_fake_inventory_names_nodes_and_keeps_global_indices(stub_cp):
    gpus = stub_cp(fake_gpus=CLUSTER).gpus()
    assert [(g["index"], g["node"], g["available_mib"]) for g in gpus] == [
        (0, "n1", 2384), (1, "n1", 10384), (2, "n2", GIB16), (3, "n2", GIB16)]
    mig = Settings(fake_gpus=[{"total_mib": 100, "node": "n9", "mig": [{"total_mib": 50}]}]).fake_gpus
    assert mig[0]["node"] == "n9"
    with pytest.raises(BadRequest, match="fake GPU 0: node must be a non-empty string"):
        Settings(fake_gpus=[{"total_mib": 100, "node": 3}])


def test_one_gpu_engine_lands_by_best_fit_over_all_nodes(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=CLUSTER)
    e = cp.start_engine(str(model_dir(4, max_pos=4096)), name="small")
    assert e["gpu_ids"] == [1] and e["node"] == "n1"  # n1's GPU1 is the tightest fit of all
    assert [(b[1], b[2]) for b in leases(cp)[1]] == [(1, "GPU-n1-1")]


def test_tensor_parallel_goes_to_one_node_never_across(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=CLUSTER)
    e = cp.start_engine(str(model_dir(4, max_pos=4096)), name="tp2", tensor_parallel_size=2)
    assert e["gpu_ids"] == [2, 3] and e["node"] == "n2", e  # not GPU1 (n1) + GPU2 (n2)
    assert cp.engine("tp2")["node"] == "n2"


def test_a_fit_only_across_nodes_is_refused_with_numbers_per_node(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=SPLIT)
    with pytest.raises(NoRoom) as exc:
        cp.plan(str(model_dir(4, max_pos=4096)), tensor_parallel_size=2, max_model_len=4096)
    assert ("needs 3840 MiB on each of 2 GPU(s) of one node; free: node n1: GPU0 2384 MiB, GPU1 10384 MiB; "
            "node n2: GPU2 10384 MiB, GPU3 2384 MiB") in exc.value.message
    # shrinking max_model_len to fit counts what one node offers, never two
    try:
        plan = cp.plan(str(model_dir(4, max_pos=4096)), tensor_parallel_size=2)
    except NoRoom as e:
        assert "of one node" in e.message
    else:
        assert plan["gpu_ids"] in ([0, 1], [2, 3]), plan
    assert cp.engines() == []


def test_a_node_pin_is_honoured_and_checked(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=CLUSTER)
    model = str(model_dir(4, max_pos=4096))
    assert cp.plan(model, node="n2")["gpu_ids"] == [2]  # best fit within n2, though GPU1 fits tighter
    assert cp.plan(model, node="n2")["node"] == "n2"
    with pytest.raises(BadRequest, match="unknown node 'n3'; this server's GPUs are on node\\(s\\) n1, n2"):
        cp.plan(model, node="n3")
    with pytest.raises(BadRequest, match="invalid node"):
        cp.plan(model, node="n 1")
    with pytest.raises(BadRequest, match="gpu_ids \\[2\\] are not on node 'n1'; its GPUs are \\[0, 1\\]"):
        cp.plan(model, node="n1", gpu_ids=[2])
    assert cp.plan(model, node="n2", gpu_ids=[3])["gpu_ids"] == [3]
    with pytest.raises(BadRequest, match="gpu_ids \\[1, 2\\] are on nodes n1, n2: an engine's GPUs are all on one"):
        cp.plan(model, gpu_ids=[1, 2])
    with pytest.raises(NoRoom, match="no GPU has room .* of one node; free: node n1: GPU0 2384 MiB, GPU1 10384 MiB"):
        cp.plan(model, node="n1", tensor_parallel_size=2, max_model_len=4096)
    assert cp.engines() == []


def test_a_node_pin_on_one_machine_or_without_gpus(stub_cp, model_dir):
    model = str(model_dir(1))
    with pytest.raises(BadRequest, match="unknown node 'n1'; this server's GPUs are on this machine only"):
        stub_cp(fake_gpus=[{"total_mib": GIB16}]).plan(model, node="n1")
    with pytest.raises(BadRequest, match="node 'n1' given but this machine has no NVIDIA GPU"):
        stub_cp(use_nvml=False).plan(model, node="n1")


def test_choose_gpus_over_nodes():
    views = views_of(("a", 0), ("a", 9000), ("b", 8000), ("b", 8000))
    # two GPUs of 7000 MiB: a's pair leaves 16384 + 7384 over, b's pair 2 * 8384: b is the tighter fit
    assert indices(choose_gpus(views, 7000, 2)) == [2, 3]
    assert indices(choose_gpus(views, 7000, 1)) == [1]  # the tightest GPU of all, as on one box
    assert indices(choose_gpus(views, 7000, 2, node="a")) == [0, 1]
    assert best_available(views, 2) == 8384 and best_available(views, 2, node="a") == 7384
    with pytest.raises(NoRoom, match="needs 2 GPU\\(s\\) of one node but no node has that many: node a 1, node b 1"):
        choose_gpus(views_of(("a", 0), ("b", 0)), 100, 2)
    # a machine's own GPUs (no node) next to a cluster's
    mixed = views_of((None, 0), ("b", 1000))
    with pytest.raises(NoRoom, match="free: node this machine: GPU0 16384 MiB; node b: GPU1 15384 MiB"):
        choose_gpus(mixed, 16500, 1)


def test_mig_devices_on_a_node_never_take_tensor_parallel(stub_cp, model_dir):
    mig = {"name": "A100", "total_mib": 81920, "used_mib": 0, "uuid": "GPU-mig", "node": "n2",
           "mig": [{"total_mib": 40192, "uuid": "MIG-a"}, {"total_mib": 40192, "uuid": "MIG-b"}]}
    cp = stub_cp(fake_gpus=[CLUSTER[0], CLUSTER[1], mig])
    gpus = cp.gpus()
    assert [(g["index"], g["node"], g["mig"]) for g in gpus] == [(0, "n1", False), (1, "n1", False),
                                                                 (3, "n2", True), (4, "n2", True)]
    model = str(model_dir(4, max_pos=4096))
    assert cp.plan(model, node="n2")["gpu_ids"] == [3]
    with pytest.raises(BadRequest, match="tensor parallel across MIG"):
        cp.plan(model, node="n2", tensor_parallel_size=2)


def test_an_unloaded_engine_wakes_on_its_pinned_node(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=CLUSTER)
    e = cp.start_engine(str(model_dir(4, max_pos=4096)), name="pinned", node="n2")
    assert e["node"] == "n2"
    assert cp.sleep_engine("pinned", "unload")["state"] == "unloaded"
    woken = cp.wake_engine("pinned", timeout=20)
    assert woken["state"] == "ready" and woken["node"] == "n2" and woken["gpu_ids"] == [2]


def test_engine_pids_for_nvml_leave_out_engines_on_cluster_nodes():
    """NVML's per-process memory is matched to engines by local pids: with a Ray cluster, engines on
    its nodes (and other users' bookings of its GPUs) are left out, a pid there is not this machine's."""
    from types import SimpleNamespace

    import psutil

    from sage_nb.controlplane.gpus.attribution import engine_pids

    me = psutil.Process()
    here = SimpleNamespace(id="here", pid=me.pid, create_time=me.create_time(), node=None)
    there = SimpleNamespace(id="there", pid=me.pid, create_time=me.create_time(), node="n2")  # same pid number
    engines = [here, there]
    foreign = [{"engine_id": "theirs-here", "pid": me.pid, "start_time": me.create_time(), "gpu_uuid": "GPU-0"},
               {"engine_id": "theirs-there", "pid": me.pid, "start_time": me.create_time(), "gpu_uuid": "GPU-n2"}]
    assert sorted(engine_pids(engines, foreign, {"GPU-n2"})) == ["here", "theirs-here"]
    assert sorted(engine_pids(engines, foreign)) == ["here", "theirs-here", "theirs-there", "there"]
