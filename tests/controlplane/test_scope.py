"""Who started an engine, and engines tied to their kernel (scope "kernel"): request validation, and
over the stub engine with a fake GPU inventory (so there is a booking) the kernel going away — its
process (embedded, any control plane judges), or its id leaving a server's kernel manager — stops the
engine with its port and booking released; a control plane that cannot judge leaves it alone."""

import subprocess
import sys

import psutil
import pytest

from sage_nb.controlplane import BadRequest, LaunchRequest
from sage_nb.controlplane.engines.scope import KernelHost
from sage_nb.controlplane.store.ports import bindable

from ..conftest import BUSY_BOX, leases, wait_for

KID = "5f0c7e0e-3a5d-4a31-9b8e-0e4c2f1d9a77"


@pytest.mark.parametrize("fields,why", [
    ({"scope": "notebook"}, "unknown scope 'notebook'"), ({"scope": None}, "unknown scope"),
    ({"scope": "kernel"}, "scope 'kernel' needs the kernel_id"),
    ({"kernel_id": "../etc"}, "invalid kernel_id"), ({"kernel_id": 5}, "invalid kernel_id"),
    ({"kernel_id": "a b"}, "invalid kernel_id"), ({"kernel_id": ""}, "invalid kernel_id"),
    ({"kernel_id": "k" * 200}, "invalid kernel_id"), ({"notebook": 3}, "notebook must be a path"),
    ({"notebook": "a\x00b"}, "notebook must be a path"), ({"notebook": "x" * 5000}, "notebook must be a path"),
])
def test_bad_scope_fields_are_bad_requests(fields, why):
    with pytest.raises(BadRequest, match=why):
        LaunchRequest.from_body({"model": "org/m", **fields})


def test_scope_fields_default_and_pass():
    req = LaunchRequest.from_body({"model": "org/m"})
    assert (req.scope, req.kernel_id, req.notebook) == ("server", None, None)
    req = LaunchRequest.from_body({"model": "org/m", "scope": "kernel", "kernel_id": KID, "notebook": "dir/nb.ipynb"})
    assert (req.scope, req.kernel_id, req.notebook) == ("kernel", KID, "dir/nb.ipynb")


@pytest.fixture
def fake_kernel():
    """A process standing in for a kernel (what matters is its pid and start time)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield proc
    proc.kill()
    proc.wait()


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def test_an_embedded_kernels_engine_ends_with_its_process(stub_cp, model_dir, fake_kernel):
    cp = stub_cp(fake_gpus=BUSY_BOX)
    other = stub_cp(fake_gpus=BUSY_BOX)  # another control plane of the user, which knows no kernel
    cp.set_kernel_host(KernelHost(knows=lambda k: k == KID, pid_of=lambda k: fake_kernel.pid))
    with pytest.raises(BadRequest, match="knows no kernel 'nope'"):
        cp.start_engine(str(model_dir(1)), scope="kernel", kernel_id="nope")
    with pytest.raises(BadRequest, match="knows no kernel"):
        other.start_engine(str(model_dir(1)), scope="kernel", kernel_id=KID)
    kept = cp.start_engine(str(model_dir(1)), name="kept", kernel_id=KID, notebook="work/nb.ipynb")
    e = cp.start_engine(str(model_dir(1)), name="tied", scope="kernel", kernel_id=KID, notebook="work/nb.ipynb")
    assert (e["scope"], e["kernel_id"], e["notebook"]) == ("kernel", KID, "work/nb.ipynb")
    assert (kept["scope"], kept["kernel_id"]) == ("server", KID)
    assert not {"kernel_pid", "kernel_started", "kernel_server"} & set(e)  # not in the public model
    assert e["booked_mib"] > 0 and e["id"] in {b[0] for b in leases(cp)[1]}
    procs = tree(e["pid"])
    cp.close()  # only the other control plane watches now: it judges by the kernel's process

    other.check_engines()
    assert other.engine("tied")["state"] == "ready"  # the kernel runs
    fake_kernel.kill()
    fake_kernel.wait()
    other.ensure_monitor()
    stopped = wait_for(lambda: (m := other.engine("tied"))["state"] == "stopped" and m, timeout=20)
    assert f"stopped: its kernel {KID} shut down" in stopped["note"]
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    held = leases(other)
    assert e["port"] not in held[0] and e["id"] not in {b[0] for b in held[1]} and bindable(e["port"])
    assert other.engine("kept")["state"] == "ready"  # scope server: never touched


def test_a_servers_kernel_judged_by_id_and_restart(stub_cp, model_dir, fake_kernel):
    kernels = {KID: None, "k2": fake_kernel.pid}  # KID is not local (no process to watch)
    server = stub_cp(fake_gpus=BUSY_BOX)
    server.set_kernel_host(KernelHost(knows=kernels.__contains__, pid_of=kernels.get, server=True))
    bystander = stub_cp(fake_gpus=BUSY_BOX)  # a kernel's embedded control plane: it knows only its own kernel
    bystander.set_kernel_host(KernelHost.this_process("k9"))
    remote = server.start_engine(str(model_dir(1)), name="remote", scope="kernel", kernel_id=KID, wait=False)
    local = server.start_engine(str(model_dir(1)), name="local", scope="kernel", kernel_id="k2", wait=False)
    with pytest.raises(BadRequest, match="this Jupyter server has no kernel 'k3'"):
        server.start_engine(str(model_dir(1)), scope="kernel", kernel_id="k3")
    server.wait_ready(remote["id"])
    server.wait_ready(local["id"])
    server.close()

    bystander.check_engines()  # neither the server nor a local process of KID: it cannot judge
    assert bystander.engine("remote")["state"] == "ready"
    del kernels[KID]  # shut down: the server's kernel manager no longer lists it
    server.check_engines()
    assert server.engine("remote")["note"] == f"stopped: its kernel {KID} shut down"
    assert remote["id"] not in {b[0] for b in leases(server)[1]}

    fake_kernel.kill()  # k2 restarts: the same id, a new process
    fake_kernel.wait()
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as new:
        kernels["k2"] = new.pid
        server.check_engines()
        new.kill()
    assert server.engine("local")["state"] == "stopped"
    assert server.engine("local")["note"] == "stopped: its kernel k2 restarted"
    assert leases(server) == ({}, [])


def test_prune_by_kernel_or_notebook_removes_only_what_they_started(stub_cp, model_dir):
    """``prune(kernel_id=..., notebook=...)`` removes the ended records that kernel or that notebook
    started (another kernel of the same notebook too), nothing of other notebooks, and never a live
    engine; ``prune()`` still removes every ended record."""
    cp = stub_cp(monitor=False)
    other = "0c1d2e3f-0000-4000-8000-000000000001"
    started = {name: cp.start_engine(str(model_dir(1)), name=name, kernel_id=kid, notebook=nb)["id"]
               for name, kid, nb in (("mine", KID, "work/nb.ipynb"), ("restarted", other, "work/nb.ipynb"),
                                     ("theirs", other, "work/other.ipynb"), ("rest", None, None),
                                     ("running", KID, "work/nb.ipynb"))}
    for name in ("mine", "restarted", "theirs", "rest"):
        cp.stop_engine(name)
    with pytest.raises(BadRequest, match="invalid kernel_id"):
        cp.prune(kernel_id="../x")
    assert sorted(cp.prune(kernel_id=KID, notebook="work/nb.ipynb")) == sorted([started["mine"], started["restarted"]])
    assert {e["name"] for e in cp.engines()} == {"theirs", "rest", "running"}
    assert cp.prune(kernel_id=KID) == [] and cp.prune(notebook="work/nb.ipynb") == []
    assert cp.prune(kernel_id=other) == [started["theirs"]]
    assert cp.prune() == [started["rest"]] and [e["name"] for e in cp.engines()] == ["running"]
