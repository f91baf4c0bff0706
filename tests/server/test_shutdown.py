"""A server stopped with ``stop_engines_on_shutdown`` stops every live engine through the
Supervisor's one ``stop_all``; without it, engines outlive the server and are re-attached."""

import signal

from sage_nb.controlplane import ControlPlane
from sage_nb.controlplane.engines.process import group_members

from ..conftest import leases
from ..serverproc import running_server, stub_model, wait_ready


def start_two(srv, root) -> list[dict]:
    engines = []
    for name in ("one", "two"):
        code, e = srv.request("POST", "sage_nb/api/engines", {"model": stub_model(root), "name": name})
        assert code == 202, e
        engines.append(e)
    return [wait_ready(srv, e["id"], timeout=30) for e in engines]


def stop_gracefully(srv) -> None:
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(timeout=60) is not None


def test_shutdown_stops_every_engine_when_asked(tmp_path):
    with running_server(tmp_path, (18920, 18929), stub_engines=True,
                        extra_args=["--SageNBApp.stop_engines_on_shutdown=True"]) as srv:
        engines = start_two(srv, tmp_path)
        stop_gracefully(srv)
        assert "stopped 2 engine(s) at shutdown" in srv.log_text()
    cp = ControlPlane(state_dir=srv.state_dir, monitor=False)
    try:
        assert cp.engines() == [] and leases(cp) == ({}, [])  # stopped, released and pruned
        assert not any(group_members(e["pid"]) for e in engines)
    finally:
        cp.close()


def test_engines_outlive_a_server_by_default(tmp_path):
    with running_server(tmp_path, (18930, 18939), stub_engines=True) as srv:
        engines = start_two(srv, tmp_path)
        stop_gracefully(srv)
        assert all(group_members(e["pid"]) for e in engines)
        srv.start()
        listed = {e["id"]: e["state"] for e in srv.get("sage_nb/api/engines")[1]}
        assert listed == {e["id"]: "ready" for e in engines}
