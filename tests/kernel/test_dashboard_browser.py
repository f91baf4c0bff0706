"""The dashboard in a real browser: JupyterLab in headless Chromium runs ``%llm dashboard`` with a
real engine on a (fake) busy two-GPU box, shared (through a machine-wide ledger) with another
registry's engine, where NVML lists a foreign process; the rendered widget must show the GPU bars
with each holder's segment in proportion, their legend, the engine row with its uptime advancing on
every refresh, and the start form's tensor-parallel field (a GPU box)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import psutil
import pytest

from sage_nb.controlplane import ControlPlane
from sage_nb.controlplane.engines.process import group_members

from ..conftest import BUSY_BOX, STUB_PATH
from ..serverproc import TOKEN, Server, free_port, wait_ready

pytestmark = pytest.mark.vllm
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture
def neighbours(tmp_path, model_dir):
    """A foreign process (a 20 GiB job NVML lists on GPU0) and another registry's engine on GPU1 (NVML
    lists 12 GiB of its booking in use), known through the box's inventory and a shared ledger;
    yields (the box as NVML would show it, ledger, process, engine)."""
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    os.chmod(ledger, 0o2770)
    job = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    box = [{**BUSY_BOX[0], "processes": [{"pid": job.pid, "used_mib": 20480}]}, BUSY_BOX[1]]
    other = ControlPlane(state_dir=tmp_path / "neighbour", shared_ledger=str(ledger), fake_gpus=box,
                         port_range=(18800, 18809), engine_env={"PYTHONPATH": STUB_PATH}, adopt_unrecorded=False)
    try:
        coder = other.start_engine(str(model_dir(12)), name="coder", gpu_ids=[1], max_model_len=4096)
        box[1] = {**box[1], "used_mib": 12288, "processes": [{"pid": coder["pid"], "used_mib": 12288}]}
        yield box, ledger, psutil.Process(job.pid), coder
    finally:
        for e in other.engines():
            if e["state"] in ("starting", "ready"):
                other.stop_engine(e["id"])
        other.close()
        job.kill()
        job.wait()


@pytest.fixture
def lab(tmp_path, tiny_llama, neighbours):
    box, ledger, _, _ = neighbours
    server = Server(tmp_path, tmp_path / "state", free_port(), port_range=(18750, 18799),
                    extra_args=[f"--SageNBApp.fake_gpus={json.dumps(box)}", f"--SageNBApp.shared_ledger={ledger}",
                                "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
                                "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"])
    book = nbformat.v4.new_notebook()
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    book.cells = [nbformat.v4.new_code_cell("%load_ext sage_nb"), nbformat.v4.new_code_cell("%llm dashboard")]
    nbformat.write(book, tmp_path / "dash.ipynb")
    server.start()
    try:
        code, engine = server.request("POST", "sage_nb/api/engines", {"model": str(tiny_llama), "name": "tiny"})
        assert code == 202, engine
        yield server, wait_ready(server, engine["id"])
    finally:
        server.request("DELETE", "sage_nb/api/engines/tiny")
        server.kill()
        for proc in group_members(engine["pid"]) if engine.get("pid") else []:
            proc.kill()


def seconds(uptime: str) -> int:
    """``1m21s`` (or ``1h02m``) as seconds."""
    match = re.fullmatch(r"(\d+)([hm])(\d+)([ms])", uptime.strip())
    assert match, uptime
    big, small = (3600, 60) if match[2] == "h" else (60, 1)
    return int(match[1]) * big + int(match[3]) * small


def share(bar, segment) -> float:
    """The rendered width of a segment as a fraction of its bar's."""
    return segment.bounding_box()["width"] / bar.locator(".sage-nb-bar").bounding_box()["width"]


def pairs(path) -> list[tuple[float, float]]:
    """The points of a rendered bqplot line (its SVG path's coordinates)."""
    d = path.get_attribute("d") or ""
    return [(float(x), float(y)) for x, y in re.findall(r"[ML]\s*(-?[\d.]+)[, ](-?[\d.]+)", d)]


def check_plots(page, server) -> None:
    """The plots under the dashboard: tiny's tokens/s line holds a point per reading the server kept (the
    first has no rate yet), is not flat once chats ran, and grows with each refresh; GPU0's memory is
    stacked by its owners."""
    for n in (8, 16, 32):
        code, _ = server.request("POST", "sage_nb/v1/chat/completions", {
            "model": "tiny", "max_tokens": n, "ignore_eos": True, "messages": [{"role": "user", "content": "hi"}]})
        assert code == 200
    page.wait_for_timeout(5000)  # two readings and a dashboard refresh after the chats
    figure = page.locator(".jp-OutputArea .bqplot.figure", has_text="tiny: tokens/s")
    figure.wait_for(timeout=30_000)
    prompt_line, generated_line = figure.locator("path.line").all()[:2]
    code, series = server.request("GET", "sage_nb/api/metrics/engines/tiny?window=600")
    assert code == 200 and series["status"] == "ok", series
    drawn = pairs(generated_line)
    kept = len(series["points"])
    assert kept - 3 <= len(drawn) <= kept, (len(drawn), kept)  # less the first (no rate) and a refresh's lag
    assert len({y for _, y in drawn}) > 1  # the chats' tokens/s: not a flat line
    assert any(r["generation_tps"] for r in series["points"] if r["generation_tps"] is not None)
    page.wait_for_timeout(4500)
    assert len(pairs(generated_line)) > len(drawn)  # live: new readings drawn
    memory = page.locator(".jp-OutputArea .bqplot.figure", has_text="GPU0")
    assert memory.locator("path.line").count() >= 2  # tiny, the job's user, what no one explains
    assert "tiny" in memory.inner_text()


def test_dashboard_renders_in_jupyterlab(lab, neighbours, tmp_path):
    from playwright.sync_api import sync_playwright

    server, engine = lab
    _, _, job, coder = neighbours
    user, command = job.username(), job.name()
    assert engine["gpu_ids"] == [0]  # best fit: the tiny model fits the busy GPU's 22 GiB
    shot = tmp_path / "dashboard.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
            "--disable-background-networking", "--disable-component-update"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{server.url}lab/tree/dash.ipynb?token={TOKEN}", timeout=120_000)
            page.wait_for_selector(".jp-Notebook", timeout=120_000)
            page.wait_for_function("window.jupyterapp && window.jupyterapp.commands.hasCommand("
                                   "'notebook:run-all-cells')", timeout=120_000)
            page.wait_for_function("(() => { const w = window.jupyterapp.shell.currentWidget;"
                                   " const k = w && w.sessionContext && w.sessionContext.session"
                                   " && w.sessionContext.session.kernel;"
                                   " return k && k.status === 'idle'; })()", timeout=120_000)
            page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
            bars = page.locator(".jp-OutputArea .sage-nb-gpu")
            bars.first.wait_for(timeout=120_000)
            assert bars.count() == 2
            gpu0, gpu1 = bars.nth(0), bars.nth(1)
            assert "59392 MiB others" in gpu0.inner_text()  # GPU0: 58 GiB, 20 of them a listed process
            assert f"{engine['booked_mib']} MiB your engines" in gpu0.inner_text()  # tiny's booking
            # tiny's booking (the fake NVML shows it no memory yet: hatched), the job, the rest, free
            assert gpu0.locator(".sage-nb-mine-unused").count() == 1 and gpu0.locator(".sage-nb-mine").count() == 0
            assert abs(share(gpu0, gpu0.locator(".sage-nb-process")) - 20480 / 81920) < 0.01
            assert abs(share(gpu0, gpu0.locator(".sage-nb-unaccounted")) - (59392 - 20480) / 81920) < 0.01
            assert abs(share(gpu0, gpu0.locator(".sage-nb-mine-unused")) - engine["booked_mib"] / 81920) < 0.01
            legend0 = gpu0.locator(".sage-nb-legend").inner_text()
            assert f"tiny 0 MiB used + {engine['booked_mib']} booked" in legend0
            assert f"{user}: {command} 20480 MiB" in legend0 and "unaccounted 38912 MiB" in legend0
            # coder: 12 GiB in use (solid), the rest of its booking hatched, both in the other user's hue
            assert abs(share(gpu1, gpu1.locator(".sage-nb-others")) - 12288 / 81920) < 0.01
            unused = coder["booked_mib"] - 12288
            assert abs(share(gpu1, gpu1.locator(".sage-nb-others-unused")) - unused / 81920) < 0.01
            legend1 = gpu1.locator(".sage-nb-legend").inner_text()
            assert f"{user}: coder 12288 MiB used + {unused} booked" in legend1
            assert gpu1.locator(".sage-nb-process").count() == 0
            cells = page.locator(".jp-OutputArea .sage-nb-cell")
            cells.filter(has_text="tiny").first.wait_for(timeout=30_000)
            row_text = " ".join(cells.all_inner_texts())
            assert "tiny" in row_text and "ready" in row_text and "llm" in row_text
            assert page.locator(".jp-OutputArea button", has_text="stop").count() >= 1
            # the uptime advances with every refresh (every 2 s) though tiny's record does not change
            uptime = page.locator(".jp-OutputArea .sage-nb-uptime").first
            first = seconds(uptime.inner_text())
            page.wait_for_timeout(4500)
            assert seconds(uptime.inner_text()) >= first + 3, (first, uptime.inner_text())
            assert page.get_by_text("TP GPUs").first.is_visible()  # a GPU box: tensor parallel is offered
            check_plots(page, server)
            news = page.get_by_role("button", name="No", exact=True)  # JupyterLab's news prompt
            if news.count():
                news.first.click()
                page.wait_for_timeout(1000)  # let the toast fade before the screenshot
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("SAGE_NB_UPDATE_DOCS"):
        DOCS.mkdir(exist_ok=True)
        shutil.copy(shot, DOCS / "dashboard.png")
