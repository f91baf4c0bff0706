"""The dashboard in a real browser: JupyterLab in headless Chromium runs ``%llm dashboard`` with a
real engine on a (fake) busy two-GPU box; the rendered widget must show the GPU bars and the row."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nbformat
import pytest

from sage_nb.controlplane.process import group_members

from ..conftest import BUSY_BOX
from ..serverproc import TOKEN, Server, free_port, wait_ready

pytestmark = pytest.mark.vllm
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture
def lab(tmp_path, tiny_llama):
    server = Server(tmp_path, tmp_path / "state", free_port(), port_range=(18750, 18799),
                    extra_args=[f"--SageNBApp.fake_gpus={json.dumps(BUSY_BOX)}",
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


def test_dashboard_renders_in_jupyterlab(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    server, engine = lab
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
            assert "59392 MiB others" in bars.nth(0).inner_text()  # GPU0: 58 GiB used by another user
            assert f"{engine['booked_mib']} MiB booked" in bars.nth(0).inner_text()  # tiny's booking
            assert page.locator(".jp-OutputArea .sage-nb-booked").count() == 1
            cells = page.locator(".jp-OutputArea .sage-nb-cell")
            cells.filter(has_text="tiny").first.wait_for(timeout=30_000)
            row_text = " ".join(cells.all_inner_texts())
            assert "tiny" in row_text and "ready" in row_text and "llm" in row_text
            assert page.locator(".jp-OutputArea button", has_text="stop").count() >= 1
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
