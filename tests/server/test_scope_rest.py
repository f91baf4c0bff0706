"""Kernel-scoped engines over REST (pytest-jupyter, stub engines, a fake GPU so there is a booking):
the server knows its kernels through its kernel manager; a start tied to a kernel it does not know is
a 400; a restart or a shutdown of the kernel through ``/api/kernels`` stops the engine and frees its
booking. The same with a real vLLM engine and a real kernel running ``%llm start``:
test_scope_vllm.py."""

import json

import pytest

from sage_nb.controlplane import ControlPlane

from ..conftest import BUSY_BOX
from .test_rest import call, error, wait_state

pytestmark = pytest.mark.usefixtures("cleanup_engines")
on_box = pytest.mark.parametrize("fake_gpus", [json.dumps(BUSY_BOX)], ids=["box"])


async def booked(jp_fetch) -> int:
    return sum(d["booked_mib"] for d in (await call(jp_fetch, "api", "gpus"))[1]["devices"])


async def tied_engine(jp_fetch, model_dir, kernel_id: str, name: str) -> dict:
    code, e = await call(jp_fetch, "api", "engines", method="POST", body={
        "model": str(model_dir(1)), "name": name, "scope": "kernel", "kernel_id": kernel_id,
        "notebook": "work/nb.ipynb"})
    assert code == 202 and (e["scope"], e["kernel_id"], e["notebook"]) == ("kernel", kernel_id, "work/nb.ipynb")
    return await wait_state(jp_fetch, e["id"])


@on_box
async def test_kernel_scope_over_rest(jp_fetch, model_dir, fake_gpus, state_dir):
    code, message = await error(jp_fetch, "api", "engines", method="POST", body={
        "model": str(model_dir(1)), "scope": "kernel", "kernel_id": "5f0c7e0e-0000-4000-8000-000000000000"})
    assert code == 400 and "this Jupyter server has no kernel '5f0c7e0e-0000-4000-8000-000000000000'" in message
    code, message = await error(jp_fetch, "api", "engines", method="POST", body={"model": "m", "scope": "kernel"})
    assert code == 400 and "needs the kernel_id" in message
    code, message = await error(jp_fetch, "api", "engines", method="POST", body={"model": "m", "scope": "box"})
    assert code == 400 and "unknown scope 'box'" in message

    resp = await jp_fetch("api", "kernels", method="POST", body=json.dumps({"name": "python3"}))
    kid = json.loads(resp.body)["id"]
    first = await tied_engine(jp_fetch, model_dir, kid, "first")
    assert first["booked_mib"] > 0 and await booked(jp_fetch) == first["booked_mib"]
    listed = (await call(jp_fetch, "api", "engines"))[1]
    assert [(x["kernel_id"], x["notebook"], x["scope"]) for x in listed] == [(kid, "work/nb.ipynb", "kernel")]
    assert "kernel_pid" not in listed[0]

    await jp_fetch("api", "kernels", kid, "restart", method="POST", body=b"")  # a restart counts
    first = await wait_state(jp_fetch, first["id"], "stopped")
    assert first["note"] == f"stopped: its kernel {kid} restarted"
    assert await booked(jp_fetch) == 0

    second = await tied_engine(jp_fetch, model_dir, kid, "second")  # tied to the restarted kernel
    await jp_fetch("api", "kernels", kid, method="DELETE")
    second = await wait_state(jp_fetch, second["id"], "stopped", timeout=20)
    assert second["note"] == f"stopped: its kernel {kid} shut down"
    assert await booked(jp_fetch) == 0
    with ControlPlane(state_dir=state_dir, monitor=False).registry.snapshot() as txn:
        assert txn.leases() == {} and txn.bookings() == []  # port leases and bookings both released


async def test_prune_over_rest_by_kernel_or_notebook(jp_fetch, model_dir):
    """``POST .../prune`` prunes every ended record; with ``{"kernel_id"}`` or ``{"notebook"}`` only
    those that kernel or notebook started; another field is a 400 that prunes nothing."""
    kid, other = "5f0c7e0e-0000-4000-8000-000000000001", "5f0c7e0e-0000-4000-8000-000000000002"
    ids = {}
    for name, kernel_id, notebook in (("mine", kid, "work/a.ipynb"), ("theirs", other, "work/b.ipynb"),
                                      ("rest", None, None)):
        body = {"model": str(model_dir(1)), "name": name, "kernel_id": kernel_id, "notebook": notebook}
        code, e = await call(jp_fetch, "api", "engines", method="POST", body={k: v for k, v in body.items() if v})
        assert code == 202
        ids[name] = (await wait_state(jp_fetch, e["id"]))["id"]
        await call(jp_fetch, "api", "engines", name, method="DELETE")
    code, message = await error(jp_fetch, "api", "engines", "prune", method="POST", body={"kernel": kid})
    assert code == 400 and "unknown field(s): kernel" in message
    code, message = await error(jp_fetch, "api", "engines", "prune", method="POST", body={"kernel_id": "a b"})
    assert code == 400 and "invalid kernel_id" in message
    assert await call(jp_fetch, "api", "engines", "prune", method="POST", body={"kernel_id": kid}) == \
        (200, {"removed": [ids["mine"]]})
    assert await call(jp_fetch, "api", "engines", "prune", method="POST", body={"notebook": "work/b.ipynb"}) == \
        (200, {"removed": [ids["theirs"]]})
    assert await call(jp_fetch, "api", "engines", "prune", method="POST") == (200, {"removed": [ids["rest"]]})
