"""MIG devices as placement units: the fake inventory describes them, an engine lands on the
best-fitting one with ``CUDA_VISIBLE_DEVICES=MIG-<uuid>``, tensor parallel across them is refused,
and the NVML reading code turns a GPU in MIG mode into its MIG devices (a fake ``pynvml``: no
NVIDIA GPU exists here)."""

from types import SimpleNamespace

import pytest

from sage_nb.controlplane import BadRequest, Settings
from sage_nb.controlplane.gpus.inventory import MIB, GpuInventory

from ..conftest import leases

A100 = "NVIDIA A100-SXM4-80GB"
SLICES = [  # GPU 1's MIG devices: sage_nb numbers them 2, 3, 4
    {"uuid": "MIG-3g-0000", "name": f"{A100} MIG 3g.40gb", "total_mib": 40192, "used_mib": 0},
    {"uuid": "MIG-2g-1111", "name": f"{A100} MIG 2g.20gb", "total_mib": 19968, "used_mib": 0,
     "processes": [{"pid": 4242, "used_mib": 512}]},
    {"uuid": "MIG-1g-2222", "name": f"{A100} MIG 1g.10gb", "total_mib": 9856, "used_mib": 0},
]
BOX = [{"name": A100, "total_mib": 81920, "used_mib": 0, "uuid": "GPU-whole-0"},
       {"name": A100, "total_mib": 81920, "used_mib": 0, "uuid": "GPU-mig-1", "mig": SLICES}]


def test_a_mig_gpu_lists_its_mig_devices(stub_cp):
    cp = stub_cp(fake_gpus=BOX)
    gpus = cp.gpus()
    assert [(g["index"], g["uuid"], g["mig"], g["parent_uuid"]) for g in gpus] == [
        (0, "GPU-whole-0", False, None), (2, "MIG-3g-0000", True, "GPU-mig-1"),
        (3, "MIG-2g-1111", True, "GPU-mig-1"), (4, "MIG-1g-2222", True, "GPU-mig-1")]
    assert [g["total_mib"] for g in gpus] == [81920, 40192, 19968, 9856]
    assert gpus[2]["name"] == f"{A100} MIG 2g.20gb"
    assert cp.inventory.all_devices()[2].process_mib == {4242: 512}


def test_an_engine_goes_to_the_best_fitting_mig_device(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=BOX)
    model = str(model_dir(12, max_pos=4096))
    plan = cp.plan(model)
    assert 9856 < plan["booked_mib"] <= 19968, plan  # fits the 2g.20gb device, not the 1g.10gb one
    e = cp.start_engine(model, name="on-slice")
    assert e["gpu_ids"] == [3]
    import psutil

    env = psutil.Process(e["pid"]).environ()
    assert env["CUDA_VISIBLE_DEVICES"] == "MIG-2g-1111" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert [(b[1], b[2]) for b in leases(cp)[1]] == [(3, "MIG-2g-1111")]
    # the utilization is a share of the MIG device's memory, which is what vLLM sees as the GPU's
    assert e["gpu_memory_utilization"] == pytest.approx((e["booked_mib"] - 512) / 19968, abs=1e-3)
    # the next one no longer fits there: the 3g.40gb device is the tightest fit now
    assert cp.start_engine(model, name="next")["gpu_ids"] == [2]


def test_tensor_parallel_across_mig_devices_is_refused(stub_cp, model_dir):
    cp = stub_cp(fake_gpus=BOX)
    model = str(model_dir(1))
    with pytest.raises(BadRequest, match="gpu_ids \\[2, 3\\] name MIG devices: tensor parallel across MIG"):
        cp.plan(model, gpu_ids=[2, 3])
    with pytest.raises(BadRequest, match="1 whole GPU\\(s\\) besides its MIG devices; tensor parallel across MIG"):
        cp.plan(model, tensor_parallel_size=2)
    assert cp.engines() == []
    # whole GPUs still take tensor parallel; MIG devices never join them
    two = stub_cp(fake_gpus=[BOX[0], dict(BOX[0], uuid="GPU-whole-2"), BOX[1]])
    assert two.plan(model, tensor_parallel_size=2)["gpu_ids"] == [0, 1]


def test_visible_devices_name_mig_devices(stub_cp, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1g")  # a spawner gave this server one MIG device
    assert [g["index"] for g in stub_cp(fake_gpus=BOX).gpus()] == [4]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")  # its GPU: all of its MIG devices
    assert [g["index"] for g in stub_cp(fake_gpus=BOX, gpus=[0, 2, "MIG-2g"]).gpus()] == [2, 3]


def test_fake_mig_inventory_is_validated():
    with pytest.raises(BadRequest, match="fake GPU 0 MIG device 1: 'total_mib' is required"):
        Settings(fake_gpus=[{"total_mib": 100, "mig": [{"total_mib": 50}, {"used_mib": 1}]}])
    with pytest.raises(BadRequest, match="mig must be a list"):
        Settings(fake_gpus=[{"total_mib": 100, "mig": {"total_mib": 50}}])
    fake = Settings(fake_gpus=[{"total_mib": 100, "name": "G", "mig": [{"total_mib": 50}]},
                               {"total_mib": 10}]).fake_gpus
    assert fake[0]["mig"][0]["uuid"] == "MIG-fake-0-0" and fake[0]["mig"][0]["name"] == "G MIG slice 0"
    assert "mig" not in fake[1]
    empty = GpuInventory(Settings(fake_gpus=[{"total_mib": 100, "mig": []}]).fake_gpus, environ={})
    assert empty.devices() == [] and "MIG mode without MIG devices" in empty.error


class FakeNVMLError(Exception):
    pass


def fake_nvml() -> SimpleNamespace:
    """GPU 0: an H100 without MIG support errors; GPU 1: an A100 in MIG mode with MIG devices at
    indices 0 and 2 of 7 (a gap where one was destroyed); GPU 2: MIG-capable, MIG mode off."""
    def handle(uuid, name, total, used, procs=(), mig=None, util=7):
        return SimpleNamespace(uuid=uuid, name=name, total=total * MIB, used=used * MIB, mig=mig,
                               procs=[SimpleNamespace(pid=p, usedGpuMemory=m * MIB) for p, m in procs], util=util)

    slices = {0: handle("MIG-aaa", f"{A100} MIG 3g.40gb", 40192, 1024, [(11, 1000)], util=None),
              2: handle("MIG-ccc", f"{A100} MIG 1g.10gb", 9856, 0, util=None)}
    gpus = [handle("GPU-h100", "NVIDIA H100 80GB HBM3", 81559, 500, [(10, 400), (10, 100)]),
            handle(b"GPU-a100", A100.encode(), 81920, 1024, mig=slices),
            handle("GPU-off", A100, 81920, 0, mig={})]

    def mig_mode(h):
        if h.mig is None:
            raise FakeNVMLError("Not Supported")
        return [1 if h.mig else 0, 0]

    def mig_handle(h, k):
        if k not in h.mig:
            raise FakeNVMLError("Not Found")
        return h.mig[k]

    def utilization(h):
        if h.util is None:
            raise FakeNVMLError("Not Supported")
        return SimpleNamespace(gpu=h.util)

    return SimpleNamespace(
        NVMLError=FakeNVMLError, NVML_DEVICE_MIG_ENABLE=1, nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: len(gpus), nvmlDeviceGetHandleByIndex=lambda i: gpus[i],
        nvmlDeviceGetUUID=lambda h: h.uuid, nvmlDeviceGetName=lambda h: h.name,
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=h.total, used=h.used, free=h.total - h.used),
        nvmlDeviceGetUtilizationRates=utilization, nvmlDeviceGetComputeRunningProcesses=lambda h: h.procs,
        nvmlDeviceGetMigMode=mig_mode, nvmlDeviceGetMaxMigDeviceCount=lambda h: 7 if h.mig is not None else 0,
        nvmlDeviceGetMigDeviceHandleByIndex=mig_handle)


def test_nvml_reading_replaces_a_mig_gpu_by_its_mig_devices(monkeypatch):
    inv = GpuInventory(environ={})
    monkeypatch.setattr(inv, "_nvml", fake_nvml())
    assert inv.source == "nvml"
    units = inv.devices()
    assert [(d.index, d.uuid, d.gpu_index, d.parent_uuid, d.total_mib, d.used_mib) for d in units] == [
        (0, "GPU-h100", 0, None, 81559, 500), (2, "GPU-off", 2, None, 81920, 0),
        (3, "MIG-aaa", 1, "GPU-a100", 40192, 1024), (4, "MIG-ccc", 1, "GPU-a100", 9856, 0)]
    assert units[0].process_mib == {10: 500} and units[0].utilization == 7
    assert units[2].process_mib == {11: 1000} and units[2].utilization is None and units[2].mig
    assert units[2].name == f"{A100} MIG 3g.40gb"
    # the server's own CUDA_VISIBLE_DEVICES names the MIG GPU by index or UUID prefix: its MIG devices
    inv.environ = {"CUDA_VISIBLE_DEVICES": "GPU-a1,2", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert [d.index for d in inv.devices()] == [2, 3, 4]
    assert [d.index for d in inv.resolve("MIG-ccc")] == [4]


def test_nvml_failure_means_no_gpus(monkeypatch):
    nvml = fake_nvml()

    def broken():
        raise FakeNVMLError("GPU is lost")

    nvml.nvmlDeviceGetCount = broken
    inv = GpuInventory(environ={})
    monkeypatch.setattr(inv, "_nvml", nvml)
    assert inv.devices() == [] and "GPU is lost" in inv.error
