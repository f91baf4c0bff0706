"""The dashboard widget over stub engines: what it shows, when it changes, its refresh task."""

import asyncio

import pytest

from sage_nb.kernel.client import Client
from sage_nb.kernel.dashboard import Dashboard, gpu_bar_html

from ..conftest import BUSY_BOX, STUB_PATH, shutdown


@pytest.fixture
def client(state_dir, monkeypatch):
    monkeypatch.delenv("JPY_PARENT_PID", raising=False)
    monkeypatch.delenv("SAGE_NB_SERVER_URL", raising=False)
    cl = Client(embedded=True, state_dir=state_dir, engine_env={"PYTHONPATH": STUB_PATH}, adopt_unrecorded=False,
                port_range=(18600, 18649), fake_gpus=BUSY_BOX, health_interval=0.2)
    yield cl
    shutdown(cl)


def html_of(box) -> str:
    out = []
    for child in box.children:
        out.append(getattr(child, "value", "") or "")
        if hasattr(child, "children"):
            out.append(html_of(child))
    return "".join(out)


def buttons(board, name: str) -> list:
    """The engine rows' buttons called ``name``, row by row."""
    grid = board.engine_box.children[0]
    return [c for c in grid.children if getattr(c, "description", None) == name]


def test_gpu_bars_and_engine_rows(client, model_dir):
    board = Dashboard(client=client, autostart=False)
    bars = html_of(board.gpu_box)
    assert bars.count("sage-nb-gpu") == 2 and "59392 MiB others" in bars and "sage-nb-booked" not in bars
    assert "no engines" in html_of(board.engine_box)
    engine = client.start(str(model_dir(30)), name="big")
    assert board.refresh() is True
    bars = html_of(board.gpu_box)
    assert f"{engine['booked_mib']} MiB booked" in bars and bars.count("sage-nb-booked") == 1
    rows = html_of(board.engine_box)
    assert "big" in rows and "ready" in rows and "llm" in rows and ">1<" in rows  # GPU1
    assert "big" in repr(board) and "GPU0" in repr(board)
    bundle = board._repr_mimebundle_()
    assert bundle["text/plain"] == repr(board) and "application/vnd.jupyter.widget-view+json" in bundle
    assert "(ok)" in repr(board)
    board._show_engines([{**client.engine("big"), "health_failures": 1}])  # as after a failed probe
    assert "unhealthy: 1 failed probe(s), not routed to" in html_of(board.engine_box)


def test_widgets_change_only_when_data_changes(client, model_dir):
    board = Dashboard(client=client, autostart=False)
    before = board.engine_box.children
    assert board.refresh() is False and board.engine_box.children is before
    client.start(str(model_dir(1)), name="one")
    assert board.refresh() is True and board.engine_box.children is not before


def test_actions_stop_logs_prune_and_start_form(client, model_dir):
    board = Dashboard(client=client, autostart=False)
    board.model.value = str(model_dir(1))
    board._start()
    engine = client.wait_ready(client.engines()[0]["id"], timeout=20)
    board.show_logs(engine["id"])
    assert "stub engine" in "".join(o.get("text", "") for o in board.logs.outputs)
    board._act(client.stop, engine["id"])
    assert client.engine(engine["id"])["state"] == "stopped"
    board._act(client.prune)
    assert client.engines() == [] and "no engines" in html_of(board.engine_box)


def test_no_gpu_shows_cpu_and_ram(state_dir, monkeypatch):
    monkeypatch.delenv("JPY_PARENT_PID", raising=False)
    cl = Client(embedded=True, state_dir=state_dir, use_nvml=False, adopt_unrecorded=False)
    try:
        board = Dashboard(client=cl, autostart=False)
        text = html_of(board.gpu_box)
        assert "no NVIDIA GPU" in text and "RAM" in text and "CPU" in text
        assert "no NVIDIA GPU" in repr(board)
    finally:
        cl.control_plane.close()


def test_refresh_task_runs_on_the_event_loop_and_pauses(client, model_dir):
    async def scenario():
        board = Dashboard(client=client, interval=0.1)
        assert board._task is not None and not board._task.done()
        client.start(str(model_dir(1)), name="late")
        for _ in range(50):
            await asyncio.sleep(0.1)
            if any(e["name"] == "late" for e in board.snapshot["engines"]):
                break
        assert any(e["name"] == "late" for e in board.snapshot["engines"])
        board.pause()
        assert board._task is None and board.pause_button.value is True
        board.pause(False)
        assert board._task is not None
        board.close()
        await asyncio.sleep(0)

    asyncio.run(scenario())


def test_bar_proportions():
    html = gpu_bar_html({"index": 0, "name": "g", "total_mib": 1000, "used_mib": 250, "booked_mib": 250,
                         "free_mib": 750, "available_mib": 500, "utilization": 7, "source": "fake"})
    assert "width:25.00%" in html and "width:50.00%" in html and "util 7%" in html


@pytest.mark.parametrize("state,sleep,wake,stop", [
    ("ready", True, False, True), ("sleeping", False, True, True), ("unloaded", False, True, True),
    ("waking", False, False, True), ("starting", False, False, True), ("stopped", False, False, False),
])
def test_sleep_and_wake_buttons_by_state(state, sleep, wake, stop):
    from .test_idle_views import RecordingTransport

    board = Dashboard(client=Client(transport=RecordingTransport(state, sleep_level=1)), autostart=False)
    enabled = {name: not buttons(board, name)[0].disabled for name in ("sleep", "wake", "stop", "logs")}
    assert enabled == {"sleep": sleep, "wake": wake, "stop": stop, "logs": True}


def test_sleep_and_wake_buttons_act_and_show_idle_text(monkeypatch):
    from .test_idle_views import RecordingTransport

    monkeypatch.setattr("sage_nb.kernel.views.time.time", lambda: 1000.0)
    transport = RecordingTransport("ready")
    board = Dashboard(client=Client(transport=transport), autostart=False)
    assert "in 4m10s" in html_of(board.engine_box) and "idle: in 4m10s" in repr(board)
    buttons(board, "sleep")[0].click()
    assert transport.calls == [("sleep", "e1", "auto")] and "done:" in board.status.value
    assert "sleeping L1" in html_of(board.engine_box) and "idle: sleeping L1" in repr(board)  # _act refreshed
    assert buttons(board, "sleep")[0].disabled and not buttons(board, "wake")[0].disabled
    transport.states = ["waking", "waking", "ready"]  # the answer to wake, the refresh after it, later
    buttons(board, "wake")[0].click()
    assert transport.calls[-1] == ("wake", "e1")  # wait=False: no polling in the kernel's loop
    assert "waking" in html_of(board.engine_box)
    board.refresh()
    assert "in 4m10s" in html_of(board.engine_box)
