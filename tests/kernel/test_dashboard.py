"""The dashboard widget over stub engines: what it shows, when it changes, its refresh task."""

import asyncio
import re
import subprocess
import sys

import psutil
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
    assert bars.count("sage-nb-gpu") == 2 and "59392 MiB others" in bars and "sage-nb-mine" not in bars
    assert "unaccounted 59392 MiB" in bars  # the fake box lists no process for GPU0's used memory
    assert "no engines" in html_of(board.engine_box)
    engine = client.start(str(model_dir(30)), name="big")
    assert board.refresh() is True
    bars = html_of(board.gpu_box)
    # a fake inventory shows no engine process: the whole booking is booked-not-yet-used, hatched
    assert f"{engine['booked_mib']} MiB your engines" in bars and bars.count("sage-nb-mine-unused") == 1
    assert f"big 0 MiB used + {engine['booked_mib']} booked" in bars
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


def test_bar_proportions_without_parts():  # an older server: no attribution, the three old parts
    html = gpu_bar_html({"index": 0, "name": "g", "total_mib": 1000, "used_mib": 250, "booked_mib": 250,
                         "free_mib": 750, "available_mib": 500, "utilization": 7, "source": "fake"})
    assert "width:25.00%" in html and "width:50.00%" in html and "util 7%" in html
    assert "250 MiB others, 250 MiB booked, 500 MiB free of 1000 MiB" in html and "sage-nb-legend" not in html


def segments(html: str) -> list[tuple[str, int, str, float]]:
    """(class, MiB, tooltip, width %) of each segment of a bar."""
    return [(cls, int(mib), title, float(width)) for cls, mib, title, width in re.findall(
        r"class='sage-nb-seg sage-nb-([^']*)' data-mib='(\d+)' title='([^']*)' style='width:([\d.]+)%", html)]


def legend(html: str) -> str:
    """The legend's text, tags removed."""
    return re.sub(r"<[^>]+>", "", html.split("class='sage-nb-legend'", 1)[1])


def attributed(parts: dict, total: int = 10000) -> str:
    return gpu_bar_html({"index": 1, "name": "H100", "total_mib": total, "used_mib": 0, "booked_mib": 0,
                         "free_mib": 0, "available_mib": 0, "utilization": None, "source": "nvml",
                         "parts": {"mine": [], "others": [], "processes": [], "unaccounted_mib": 0,
                                   "booked_unused_mib": 0, "free_mib": 0, **parts}})


def test_attributed_bar_has_a_segment_per_holder_in_proportion_and_a_legend():
    html = attributed({
        "mine": [{"name": "chat", "engine_id": "e1", "booked_mib": 3000, "used_mib": 2000},
                 {"name": "embed", "engine_id": "e2", "booked_mib": 500, "used_mib": 500}],
        "others": [{"user": "bob", "name": "coder", "engine_id": "e3", "booked_mib": 1000, "used_mib": 0}],
        "processes": [{"pid": 4242, "user": "alice", "command": "python", "used_mib": 1500}],
        "unaccounted_mib": 500, "booked_unused_mib": 2000, "free_mib": 2000})
    assert segments(html) == [
        ("mine", 2000, "chat (in use): 2000 MiB", 20.0),
        ("mine-unused sage-nb-unused", 1000, "chat (booked, not yet used): 1000 MiB", 10.0),
        ("mine", 500, "embed (in use): 500 MiB", 5.0),
        ("others-unused sage-nb-unused", 1000, "bob: coder (booked, not yet used): 1000 MiB", 10.0),
        ("process", 1500, "alice: python (pid 4242): 1500 MiB", 15.0),
        ("unaccounted", 500, "used, accounted for by nothing listed: 500 MiB", 5.0),
        ("free", 2000, "free: 2000 MiB", 20.0)]
    assert "3500 MiB your engines, 3000 MiB others, 2000 MiB free of 10000 MiB" in html
    colours = re.findall(r"class='sage-nb-seg sage-nb-(mine|others-unused sage-nb-unused|process|unaccounted"
                         r"|free)'[^>]*background:(?:repeating-linear-gradient\(135deg,)?(#\w+)", html)
    assert len({c for _, c in colours}) == len(colours) == 6  # chat, embed, bob, alice, ?, free all differ
    assert "background:repeating-linear-gradient(135deg,#1f77b4" in html  # chat's booking, hatched in its colour
    text = legend(html)
    for entry in ("your engines", "chat 2000 MiB used + 1000 booked", "embed 500 MiB used",
                  "other sage_nb users", "bob: coder 0 MiB used + 1000 booked", "other processes",
                  "alice: python 1500 MiB", "unaccounted 500 MiB", "booked, not yet used 2000 MiB", "free 2000 MiB"):
        assert entry in text, entry
    assert text.index("your engines") < text.index("other sage_nb users") < text.index("other processes")


def test_attributed_bar_never_overflows_and_shows_bookings_of_no_listed_engine():
    html = attributed({"mine": [{"name": "a", "engine_id": "e1", "booked_mib": 8000, "used_mib": 0}],
                       "booked_unused_mib": 12000, "free_mib": 4000}, total=10000)  # over-booked
    segs = segments(html)
    assert [(cls, mib) for cls, mib, _, _ in segs] == [
        ("mine-unused sage-nb-unused", 8000), ("unused", 4000), ("free", 4000)]
    assert [w for *_, w in segs] == [50.0, 25.0, 25.0]  # scaled to the sum, not past 100%
    assert "sage-nb-legend-group" in html and "other processes" not in legend(html)  # empty groups left out


def test_attributed_bar_escapes_every_name():
    evil = "<script>alert('x')</script>"
    html = attributed({"mine": [{"name": evil, "engine_id": "e1", "booked_mib": 10, "used_mib": 10}],
                       "others": [{"user": evil, "name": evil, "engine_id": "e2", "booked_mib": 10, "used_mib": 10}],
                       "processes": [{"pid": 1, "user": evil, "command": f"{evil}'\"", "used_mib": 10}],
                       "free_mib": 10})
    assert "<script>" not in html and "alert('x')" not in html
    assert html.count("&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;") == 10  # 5 in tooltips, 5 in the legend
    assert len(segments(html)) == 4  # no quote broke out of a title attribute


def test_dashboard_attributes_a_foreign_process(state_dir, monkeypatch):
    """A process the (fake) NVML lists on GPU1 shows by its user and command, the rest as unaccounted."""
    monkeypatch.delenv("JPY_PARENT_PID", raising=False)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    box = [BUSY_BOX[0], {**BUSY_BOX[1], "used_mib": 24576, "processes": [{"pid": sleeper.pid, "used_mib": 20480}]}]
    cl = Client(embedded=True, state_dir=state_dir, fake_gpus=box, adopt_unrecorded=False)
    try:
        board = Dashboard(client=cl, autostart=False)
        bar = [c.value for c in board.gpu_box.children][1]
        user, command = psutil.Process(sleeper.pid).username(), psutil.Process(sleeper.pid).name()
        assert ("process", 20480, f"{user}: {command} (pid {sleeper.pid}): 20480 MiB", 25.0) \
            in segments(bar)
        assert ("unaccounted", 4096, "used, accounted for by nothing listed: 4096 MiB", 5.0) in segments(bar)
        assert f"{user}: {command} 20480 MiB" in legend(bar)
        assert f"held by (MiB): {user}/{command} 20480; ? 4096" in repr(board)
    finally:
        sleeper.kill()
        sleeper.wait()
        cl.control_plane.close()


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


def test_engine_rows_say_who_started_them():
    from .test_idle_views import RecordingTransport

    board = Dashboard(client=Client(transport=RecordingTransport(
        "ready", notebook="work/<b>x</b>/analysis.ipynb", kernel_id="0123456789abcdef", scope="kernel")),
        autostart=False)
    rows = html_of(board.engine_box)
    assert "<b>started by</b>" in rows and "analysis.ipynb (kernel-scoped)" in rows and "<b>x</b>" not in rows
    assert "work/&lt;b&gt;x&lt;/b&gt;/analysis.ipynb — stopped when that kernel shuts down" in rows
    assert "started by analysis.ipynb (kernel-scoped)" in repr(board)
    board._show_engines([{**board.snapshot["engines"][0], "notebook": None, "scope": "server"}])
    assert "kernel 01234567" in html_of(board.engine_box) and "kernel-scoped" not in html_of(board.engine_box)
    old = Dashboard(client=Client(transport=RecordingTransport("ready")), autostart=False)  # an older server
    assert "kernel-scoped" not in html_of(old.engine_box) and "started by" not in repr(old)


def test_a_starting_engine_shows_its_loading_phase(state_dir, monkeypatch, model_dir):
    """The row of a starting engine says what its log says it does: downloading which weight file."""
    monkeypatch.delenv("JPY_PARENT_PID", raising=False)
    cl = Client(embedded=True, state_dir=state_dir, adopt_unrecorded=False, port_range=(18650, 18659),
                fake_gpus=BUSY_BOX, engine_env={"PYTHONPATH": STUB_PATH, "STUB_STARTUP_DELAY": "30"})
    try:
        engine = cl.start(str(model_dir(1)), name="first", wait=False)
        board = Dashboard(client=cl, autostart=False)
        assert "(launching)" in repr(board)
        with open(cl.control_plane.registry.find("first").log_path, "a") as log:
            log.write("INFO 05-01 12:00:00 [cpu_model_runner.py:68] Starting to load model org/big...\n"
                      "Downloading 'model-00002-of-00004.safetensors' to '/h/hub/models--org--big/blobs/"
                      "3f2a.1b2c3d4e.incomplete'\n")
        assert board.refresh() is True
        assert "downloading weights: model-00002-of-00004.safetensors" in html_of(board.engine_box)
        assert "first" in repr(board) and "starting (downloading weights: model-00002-of-00004" in repr(board)
        assert cl.phase(cl.engine(engine["id"])) == "downloading weights: model-00002-of-00004.safetensors"
    finally:
        shutdown(cl)


def test_gpus_grouped_by_node_on_a_cluster(client):
    """On a Ray cluster (devices carry ``node``) each node's bars come under a heading with its short
    id and address, in the text too; on one machine no heading shows and the bars are as before."""
    board = Dashboard(client=client, autostart=False)
    local = board.snapshot
    bars, text = html_of(board.gpu_box), repr(board)
    assert "sage-nb-node" not in bars and "node " not in text and "\n  GPU0 " in text
    assert bars == "".join(gpu_bar_html({**g, "source": local["gpus"]["source"]}) for g in local["gpus"]["devices"])
    g0, g1 = local["gpus"]["devices"]
    n1, n2 = "a1b2c3d4" + "0" * 48, "ffee0011" + "1" * 48
    gpus = {**local["gpus"], "devices": [{**g0, "node": n1}, {**g1, "node": n2}, {**g1, "index": 2, "node": n2}],
            "nodes": {n1: {"address": "127.0.0.1", "hostname": "h"}, n2: {"address": "10.0.0.2", "hostname": "h"}}}
    assert board.refresh({**local, "gpus": gpus}) is True
    bars = html_of(board.gpu_box)
    assert bars.count("sage-nb-node") == 2 and bars.count("sage-nb-gpu") == 3
    heading1 = bars.index("node a1b2c3d4 (127.0.0.1) — 1 GPU<")
    heading2 = bars.index("node ffee0011 (10.0.0.2) — 2 GPUs")
    assert heading1 < bars.index("<b>GPU0</b>") < heading2 < bars.index("<b>GPU1</b>") < bars.index("<b>GPU2</b>")
    text = repr(board)
    assert "  node a1b2c3d4 (127.0.0.1):\n    GPU0 " in text and "  node ffee0011 (10.0.0.2):\n    GPU1 " in text
    assert "\n    GPU2 " in text


def test_uptime_and_idle_advance_on_every_refresh_without_a_rebuild(monkeypatch):
    """The engine's record does not change while it runs; its uptime and idle cells still do (they
    stood still while the CPU line refreshed when only changed data updated the rows)."""
    from .test_idle_views import RecordingTransport

    now = [1000.0]
    monkeypatch.setattr("sage_nb.kernel.views.time.time", lambda: now[0])
    board = Dashboard(client=Client(transport=RecordingTransport("ready", ready_at=919.0)), autostart=False)
    grid = board.engine_box.children[0]

    def clock() -> list[str]:  # the texts of the uptime and idle cells
        values = [getattr(c, "value", "") for c in grid.children]
        return [re.sub("<[^>]+>", "", v) for v in values if "sage-nb-uptime" in v or "sage-nb-idle" in v]

    assert clock() == ["1m21s", "in 4m10s"] and "up 1m21s" in repr(board)
    now[0] = 1012.0
    assert board.refresh() is True and board.engine_box.children[0] is grid  # the same row widgets, updated
    assert clock() == ["1m33s", "in 3m58s"] and "up 1m33s" in repr(board)
    monkeypatch.setattr(board, "fetch", lambda: board.snapshot)  # nothing changed, not even the time
    assert board.refresh() is False


def test_start_form_offers_tensor_parallel_only_with_gpus(client):
    from .test_idle_views import RecordingTransport

    assert Dashboard(client=client, autostart=False).tp.layout.display is None  # the fake two-GPU box
    cpu = Dashboard(client=Client(transport=RecordingTransport("ready")), autostart=False)  # no GPU
    assert cpu.tp.layout.display == "none" and cpu.tp.value == 1


def test_action_errors_are_one_line():
    from sage_nb.controlplane import EngineFailed

    from .test_idle_views import RecordingTransport

    board = Dashboard(client=Client(transport=RecordingTransport("ready")), autostart=False)

    def fails():
        raise EngineFailed("engine 'chat' failed: the cause\n--- last lines ---\nTraceback (most recent call last):")

    board._act(fails)
    assert "the cause (the engine&#x27;s log: %llm logs chat)" in board.status.value
    assert "Traceback" not in board.status.value and "last lines" not in board.status.value
