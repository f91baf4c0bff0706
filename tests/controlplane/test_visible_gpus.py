"""The GPUs a server may use: its own CUDA_VISIBLE_DEVICES read as CUDA reads it (indices, GPU-/MIG-
UUIDs and their unique prefixes, the first bad entry ending the list), narrowed by the ``gpus``
setting; engines get their devices by UUID and adoption maps a process's UUIDs back. Fake inventory."""

import pytest

from sage_nb.controlplane import BadRequest, Conflict, ControlPlane, Settings
from sage_nb.controlplane.gpus.inventory import GpuInventory
from sage_nb.controlplane.gpus.visible import parse_gpus

from ..conftest import leases
from .test_reconcile import hand_started

A100 = "NVIDIA A100-SXM4-80GB"
UUIDS = ["GPU-aaaa0000-1111-2222-3333-444455556666", "GPU-bbbb0000-1111-2222-3333-444455556666",
         "GPU-cccc2222-1111-2222-3333-444455556666", "GPU-cccc3333-1111-2222-3333-444455556666"]
FOUR = [{"name": A100, "total_mib": 81920, "used_mib": 0, "uuid": u} for u in UUIDS]


def indices(inventory_or_cp) -> list[int]:
    if isinstance(inventory_or_cp, ControlPlane):
        return [g["index"] for g in inventory_or_cp.gpus()]
    return [d.index for d in inventory_or_cp.devices()]


def inventory(cuda=None, order=None, allowed=None, fake=FOUR) -> GpuInventory:
    env = {k: v for k, v in (("CUDA_VISIBLE_DEVICES", cuda), ("CUDA_DEVICE_ORDER", order)) if v is not None}
    return GpuInventory(Settings(fake_gpus=fake).fake_gpus, allowed=allowed, environ=env)


@pytest.mark.parametrize("cuda, expected", [
    (None, [0, 1, 2, 3]),                      # unset: every GPU
    ("", []),                                  # empty: none
    (f"{UUIDS[2]},3", [2, 3]),                 # a UUID and an index
    ("3,1", [1, 3]),                           # CUDA's order is its own; sage_nb keeps the machine's
    ("GPU-bbbb", [1]),                         # a unique prefix
    ("0,2,-1,1", [0, 2]),                      # CUDA's documented example: -1 ends the list
    ("0,GPU-cccc,1", [0]),                     # an ambiguous prefix names nothing: the list ends
    ("7", []),                                 # no such GPU
    (" 1 , 2,2", [1, 2]),                      # spaces, a repeated entry
    ("MIG-nothing,1", []),                     # no MIG device here
])
def test_cuda_visible_devices_as_cuda_reads_it(cuda, expected):
    inv = inventory(cuda)
    assert indices(inv) == expected
    assert [d.index for d in inv.all_devices()] == [0, 1, 2, 3]  # the indices stay the machine's
    if cuda in ("0,2,-1,1", "0,GPU-cccc,1"):
        assert "CUDA ignores it and every entry after it (1)" in inv.warning
    if cuda == "":
        assert "CUDA_VISIBLE_DEVICES='' leaves it none of this machine's 4" in inv.error


def test_indices_on_a_box_of_mixed_models_are_ambiguous_without_pci_order():
    mixed = [dict(FOUR[0], name="NVIDIA H100 80GB HBM3"), *FOUR[1:]]
    inv = inventory("1", fake=mixed)
    assert indices(inv) == [1] and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in inv.warning
    assert inventory("1", "PCI_BUS_ID", fake=mixed).warning is None  # PCI order is NVML's
    assert inventory(UUIDS[1], fake=mixed).warning is None  # UUIDs are never ambiguous
    assert inventory("1").warning is None  # one model: fastest-first is PCI order


def test_gpus_setting_narrows_further():
    assert indices(inventory(allowed=[3, 1])) == [1, 3]
    narrowed = inventory(f"{UUIDS[2]},3", allowed=["GPU-cccc3333", 0])
    assert indices(narrowed) == [3]
    assert narrowed.warning == ("the gpus setting names GPU device(s) [0], which this server's "
                                f"CUDA_VISIBLE_DEVICES='{UUIDS[2]},3' does not give it")
    none = inventory("0", allowed=[1])
    assert indices(none) == [] and "the gpus setting [1] leaves this server none" in none.error
    unknown = inventory(allowed=[9, "GPU-ffff"])
    assert indices(unknown) == []
    assert "names 9, which is no GPU device" in unknown.warning and "'GPU-ffff'" in unknown.warning


@pytest.mark.parametrize("value, parsed", [
    (None, None), ("", None), ("0,2", [0, 2]), ("1, GPU-ab", [1, "GPU-ab"]), ([2, "MIG-x", 2], [2, "MIG-x"]),
    ('[0, "GPU-ab"]', [0, "GPU-ab"]), ([], []),
])
def test_gpus_setting_values(value, parsed):
    assert parse_gpus(value) == parsed


@pytest.mark.parametrize("bad", ["-1", "zero", "0,,1", [True], [1.5], "GPU-", {"a": 1}, "[0,"])
def test_bad_gpus_setting_is_a_configuration_error(bad, monkeypatch):
    with pytest.raises(BadRequest, match="gpus"):
        Settings(gpus=bad)
    if isinstance(bad, str):
        monkeypatch.setenv("SAGE_NB_GPUS", bad)
        with pytest.raises(BadRequest, match="SAGE_NB_GPUS|gpus"):
            Settings()


def test_gpus_setting_from_the_environment(monkeypatch):
    monkeypatch.setenv("SAGE_NB_GPUS", "1,GPU-cccc3333")
    assert Settings().gpus == [1, "GPU-cccc3333"]


def test_server_places_only_on_its_visible_gpus_and_engines_get_uuids(stub_cp, model_dir, monkeypatch):
    """The server was given GPUs 2 and 3 (one by UUID); ``gpus`` narrows that to 2 and 3 still; GPU 3
    is the tighter fit, and the engine is told its GPU by UUID."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{UUIDS[2]},3")
    box = [dict(FOUR[0]), dict(FOUR[1]), dict(FOUR[2]), dict(FOUR[3], used_mib=40960)]
    cp = stub_cp(fake_gpus=box, gpus=[1, 2, 3])  # 1 is not the server's: ignored, with a warning
    assert indices(cp) == [2, 3]
    report = cp.gpu_report()
    assert [d["uuid"] for d in report["devices"]] == UUIDS[2:]
    assert "the gpus setting names GPU device(s) [1], which this server's" in report["warning"]
    e = cp.start_engine(str(model_dir(8)), name="placed")
    assert e["gpu_ids"] == [3]
    env = _environ(e["pid"])
    assert env["CUDA_VISIBLE_DEVICES"] == UUIDS[3] and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert [b[2] for b in leases(cp)[1]] == [UUIDS[3]]
    with pytest.raises(BadRequest, match=r"unknown GPU id\(s\) \[0\]; this server may use \[2, 3\]"):
        cp.plan(str(model_dir(1)), gpu_ids=[0])
    tp = cp.start_engine(str(model_dir(1)), name="tp", tensor_parallel_size=2)
    assert tp["gpu_ids"] == [2, 3] and _environ(tp["pid"])["CUDA_VISIBLE_DEVICES"] == ",".join(UUIDS[2:])


def test_a_server_given_no_gpu_starts_nothing_on_cpu(stub_cp, model_dir, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cp = stub_cp(fake_gpus=FOUR)
    assert cp.gpus() == [] and "leaves it none of this machine's 4" in cp.gpu_report()["error"]
    with pytest.raises(Conflict, match="no GPU for model .*CUDA_VISIBLE_DEVICES=''"):
        cp.start_engine(str(model_dir(1)), name="nowhere")
    assert cp.engines() == []


def test_adoption_maps_a_uuid_back_to_the_device(stub_cp, monkeypatch):
    """A vLLM server started by hand on GPU 2 by UUID, another on a MIG device of a MIG GPU."""
    mig = [*FOUR[:3], dict(FOUR[3], mig=[{"uuid": "MIG-dddd0000-aaaa", "total_mib": 40192},
                                         {"uuid": "MIG-dddd1111-bbbb", "total_mib": 40192}])]
    with hand_started(18492, "--model", "on-gpu2", env={"CUDA_VISIBLE_DEVICES": "GPU-cccc2222"}), \
            hand_started(18493, "--model", "on-mig", env={"CUDA_VISIBLE_DEVICES": "MIG-dddd1111-bbbb"}):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # the server's own limit does not matter here
        cp = stub_cp(fake_gpus=mig, adopt_unrecorded=True)
        adopted = set(cp.discover()["adopted"])
        # only these two: another vLLM server of this user (a developer's, by hand) may be adopted too
        by_model = {e["model"]: e for e in cp.engines() if e["id"] in adopted and e["port"] in (18492, 18493)}
        assert sorted(by_model) == ["on-gpu2", "on-mig"]
        assert by_model["on-gpu2"]["gpu_ids"] == [2] and by_model["on-gpu2"]["device"] == "cuda"
        assert by_model["on-mig"]["gpu_ids"] == [5]  # GPUs 0-3, then GPU 3's MIG devices: 4, 5
        cp.stop_all()


def _environ(pid: int) -> dict:
    import psutil

    return psutil.Process(pid).environ()


def test_gpus_table_says_why_there_is_none_and_warns(stub_cp, monkeypatch):
    from sage_nb.kernel import views

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    text = repr(views.gpus_table(stub_cp(fake_gpus=FOUR).gpu_report()))
    assert "no GPU device this server may use: this server's CUDA_VISIBLE_DEVICES=''" in text
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,x,2")
    text = repr(views.gpus_table(stub_cp(fake_gpus=FOUR).gpu_report()))
    assert "warning: CUDA_VISIBLE_DEVICES entry 'x' names no GPU device" in text and "(2)" in text
