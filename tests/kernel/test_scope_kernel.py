"""Who started it, from the kernel: ``--scope`` parsing, the kernel's id (its connection file's name)
and notebook (``JPY_SESSION_NAME``) filled into every start, the embedded control plane knowing its
own kernel, and ``%llm engines`` showing them (embedded, over stub engines)."""

import pytest
from IPython.core.error import UsageError

from sage_nb import client as default_client
from sage_nb.controlplane import BadRequest
from sage_nb.kernel import client as client_module
from sage_nb.kernel import connection, transport, views
from sage_nb.kernel.client import Client
from sage_nb.kernel.magics import SageNBError
from sage_nb.kernel.parsing import parse_line

from ..conftest import STUB_PATH, shutdown

KID = "5f0c7e0e-3a5d-4a31-9b8e-0e4c2f1d9a77"


def test_scope_parsing():
    assert parse_line("start org/m").args.scope is None  # the control plane's default: server
    assert parse_line("start org/m --scope kernel").args.scope == "kernel"
    assert parse_line("start org/m --scope server --no-wait").args.scope == "server"
    with pytest.raises(UsageError, match="invalid choice: 'notebook'"):
        parse_line("start org/m --scope notebook")


@pytest.mark.parametrize("file,kernel_id", [
    (f"/run/user/0/jupyter/kernel-{KID}.json", KID), ("/tmp/kernel-abc.json", "abc"),
    ("/tmp/my-connection.json", None), ("/tmp/kernel-a b.json", None),
])
def test_this_kernel_from_the_connection_file_and_session(monkeypatch, file, kernel_id):
    import ipykernel.connect

    monkeypatch.setattr(ipykernel.connect, "get_connection_file", lambda: file)
    monkeypatch.setenv("JPY_SESSION_NAME", "/home/u/work/nb.ipynb")
    assert connection.this_kernel() == (kernel_id, "/home/u/work/nb.ipynb")


def test_outside_a_kernel_there_is_no_kernel(monkeypatch):
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    assert connection.this_kernel() == (None, None)  # pytest is no kernel: get_connection_file raises


class StartRecorder:
    mode, server, control_plane, why_embedded = "fake", None, None, ""

    def __init__(self):
        self.requests = []

    def start(self, req):
        self.requests.append(req)
        return {"id": "e1"}


def test_the_client_sends_who_starts_it(monkeypatch):
    monkeypatch.setattr(client_module, "this_kernel", lambda: (KID, "work/nb.ipynb"))
    recorder = StartRecorder()
    cl = Client(transport=recorder)
    cl.start("org/m", wait=False, scope="kernel")
    cl.start("org/m", wait=False, kernel_id="k2", notebook=None)  # given: kept as given
    assert [(r.kernel_id, r.notebook, r.scope) for r in recorder.requests] == [
        (KID, "work/nb.ipynb", "kernel"), ("k2", None, "server")]
    monkeypatch.setattr(client_module, "this_kernel", lambda: (None, None))
    with pytest.raises(BadRequest, match="scope 'kernel' needs the kernel_id"):
        cl.start("org/m", wait=False, scope="kernel")
    assert len(recorder.requests) == 2


def test_started_by_column():
    rows = views.engines_table([
        {"id": "a", "name": "a", "kind": "llm", "state": "ready", "gpu_ids": [], "port": 1, "served_model_name": "a",
         "notebook": "/home/u/work/nb.ipynb", "kernel_id": KID, "scope": "kernel"},
        {"id": "b", "name": "b", "kind": "llm", "state": "ready", "gpu_ids": [], "port": 2, "served_model_name": "b",
         "kernel_id": KID, "scope": "server"},
        {"id": "c", "name": "c", "kind": "llm", "state": "ready", "gpu_ids": [], "port": 3, "served_model_name": "c"},
    ])
    column = rows.columns.index("started by")
    assert [r[column] for r in rows.rows] == ["nb.ipynb (kernel scope)", KID[:8], ""]


def test_kernel_scope_magics_in_an_embedded_kernel(monkeypatch, state_dir, model_dir):
    """As in a kernel with no server: the embedded control plane knows its own kernel."""
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.delenv("JPY_PARENT_PID", raising=False)
    monkeypatch.delenv("SAGE_NB_SERVER_URL", raising=False)
    for module in (client_module, transport):
        monkeypatch.setattr(module, "this_kernel", lambda: (KID, "work/nb.ipynb"))
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "sage_nb")
    cl = Client(state_dir=state_dir, engine_env={"PYTHONPATH": STUB_PATH}, port_range=(18300, 18399),
                adopt_unrecorded=False, health_interval=0.2)
    assert cl.mode == "embedded" and cl.control_plane.supervisor.scope.host.knows(KID)
    default_client.set_client(cl)
    sh.magics_manager.registry["LLMMagics"]._client = None
    try:
        sh.run_line_magic("llm", f"start {model_dir(1)} --name tied --scope kernel")
        sh.run_line_magic("llm", f"start {model_dir(1)} --name free --no-wait")
        tied, free = cl.engine("tied"), cl.engine("free")
        assert (tied["kernel_id"], tied["notebook"], tied["scope"]) == (KID, "work/nb.ipynb", "kernel")
        assert (free["kernel_id"], free["scope"]) == (KID, "server")
        text = repr(sh.run_line_magic("llm", "engines"))
        assert "nb.ipynb (kernel scope)" in text
        cl.control_plane.supervisor.scope.stop_own()  # what the kernel's exit runs (atexit)
        tied, free = cl.engine("tied"), cl.engine("free")
        assert tied["state"] == "stopped" and tied["note"] == f"stopped: its kernel {KID} shut down"
        assert free["state"] in ("starting", "ready")
        monkeypatch.setattr(client_module, "this_kernel", lambda: (None, None))
        with pytest.raises(SageNBError, match="needs the kernel_id"):
            sh.run_line_magic("llm", f"start {model_dir(1)} --scope kernel")
    finally:
        shutdown(cl)
        default_client.set_client(None)
