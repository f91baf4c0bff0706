import pytest

from sage_nb.controlplane.errors import BadRequest, Conflict
from sage_nb.controlplane.gpus.inventory import GpuDevice, GpuInventory
from sage_nb.controlplane.gpus.placement import (
    best_available,
    choose_gpus,
    gpu_views,
    memory_utilization,
)
from sage_nb.controlplane.settings import parse_fake_gpus


def devices(*used_total):
    return [GpuDevice(index=i, uuid=f"G{i}", name="gpu", total_mib=t, used_mib=u)
            for i, (u, t) in enumerate(used_total)]


def test_best_fit_prefers_the_tightest_gpu_that_fits():
    views = gpu_views(devices((60000, 81920), (0, 81920), (40000, 81920)), [], {})
    # 30 GiB fits GPU1 (80 GiB free) and GPU2 (~41 GiB free): best fit is GPU2
    assert [v.device.index for v in choose_gpus(views, 30 * 1024, 1)] == [2]
    # 50 GiB fits only GPU1
    assert [v.device.index for v in choose_gpus(views, 50 * 1024, 1)] == [1]


def test_tensor_parallel_takes_n_gpus():
    views = gpu_views(devices((0, 40960), (0, 81920), (30000, 40960), (0, 40960)), [], {})
    chosen = choose_gpus(views, 30000, 2)
    assert [v.device.index for v in chosen] == [0, 3]


def test_refusal_names_needed_and_free_per_gpu():
    views = gpu_views(devices((60000, 81920), (70000, 81920)), [], {})
    with pytest.raises(Conflict) as exc:
        choose_gpus(views, 40960, 1, what="model 'big'")
    msg = exc.value.message
    assert "needs 40960 MiB" in msg and "GPU0 21920 MiB" in msg and "GPU1 11920 MiB" in msg


def test_bookings_not_yet_visible_reduce_free_memory():
    devs = devices((0, 81920))
    # a booking of 50 GiB whose engine NVML does not show yet counts in full
    views = gpu_views(devs, [("e1", 0, "G0", 51200)], {"e1": {123}})
    assert views[0].available_mib == 81920 - 51200
    with pytest.raises(Conflict):
        choose_gpus(views, 40960, 1)
    # once NVML shows the engine's process using the memory, only used memory counts
    devs = [GpuDevice(index=0, uuid="G0", name="gpu", total_mib=81920, used_mib=51200,
                      process_mib={123: 51200})]
    views = gpu_views(devs, [("e1", 0, "G0", 51200)], {"e1": {123}})
    assert views[0].available_mib == 81920 - 51200
    assert views[0].booked_mib == 51200


def test_explicit_gpu_ids():
    views = gpu_views(devices((0, 81920), (0, 81920)), [], {})
    assert [v.device.index for v in choose_gpus(views, 1000, 1, gpu_ids=[1])] == [1]
    with pytest.raises(BadRequest, match="unknown GPU"):
        choose_gpus(views, 1000, 1, gpu_ids=[5])
    with pytest.raises(BadRequest, match="tensor_parallel_size"):
        choose_gpus(views, 1000, 1, gpu_ids=[0, 1])


def test_more_gpus_than_the_machine_has():
    views = gpu_views(devices((0, 81920)), [], {})
    with pytest.raises(Conflict, match="needs 2 GPU"):
        choose_gpus(views, 1000, 2)


def test_best_available_and_utilization():
    views = gpu_views(devices((60000, 81920), (0, 81920), (10000, 81920)), [], {})
    assert best_available(views, 1) == 81920
    assert best_available(views, 2) == 71920
    assert best_available(views, 4) == 0
    assert memory_utilization(40960, 81920) == 0.5
    assert memory_utilization(10, 81920) == 0.01


def test_fake_inventory_parsing(tmp_path):
    devs = parse_fake_gpus('[{"name": "A", "total_mib": 1000, "used_mib": 10}, {"total_mib": 2000}]')
    assert devs[0] == {"name": "A", "total_mib": 1000, "used_mib": 10, "uuid": "GPU-fake-0", "processes": []}
    assert devs[1]["used_mib"] == 0 and devs[1]["uuid"] == "GPU-fake-1"
    f = tmp_path / "gpus.json"
    f.write_text('[{"total_mib": 4096, "used_mib": 4096, "uuid": "U"}]')
    assert parse_fake_gpus(str(f))[0]["uuid"] == "U"
    assert parse_fake_gpus(None) is None and parse_fake_gpus("") is None
    inv = GpuInventory(parse_fake_gpus(str(f)))
    assert inv.source == "fake" and inv.devices()[0].free_mib == 0


@pytest.mark.parametrize("bad,msg", [
    ("{", "not valid JSON"), ('{"a": 1}', "JSON list"), ("[1]", "expected an object"),
    ('[{"used_mib": 1}]', "total_mib"), ('[{"total_mib": "x"}]', "integers"),
    ('[{"total_mib": 10, "used_mib": 20}]', "used_mib"), ("/nonexistent/gpus.json", "cannot read"),
])
def test_fake_inventory_bad_input(bad, msg):
    with pytest.raises(BadRequest, match=msg):
        parse_fake_gpus(bad)


def test_no_nvml_is_a_normal_case():
    inv = GpuInventory(None, use_nvml=False)
    assert inv.devices() == [] and inv.source == "none" and "disabled" in inv.error
    # with NVML enabled on a machine without NVIDIA driver every error is caught
    inv = GpuInventory(None)
    assert isinstance(inv.devices(), list)
