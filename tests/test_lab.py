"""``./dev.sh run``'s JupyterLab (``python -m sage_nb.lab``) serves a working copy of the tutorials:
running and saving them leaves the checkout as it was, and a later run keeps the user's copies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from sage_nb.lab import CHECKOUT, prepare_tutorials

from .serverproc import free_port

TUTORIALS = CHECKOUT / "notebooks"


def test_the_working_copy_is_made_once_and_then_kept(tmp_path):
    work = tmp_path / "work"
    names = sorted(p.name for p in TUTORIALS.glob("*.ipynb"))
    assert prepare_tutorials(TUTORIALS, work) == names and len(names) >= 4
    (work / names[0]).write_text("my own edits")
    (work / names[1]).unlink()
    assert prepare_tutorials(TUTORIALS, work) == [names[1]]  # a tutorial it lacks comes back
    assert (work / names[0]).read_text() == "my own edits"  # the user's copy is never overwritten


def test_the_default_working_copy_and_checkpoints_are_ignored_by_git():
    for path in ("my-tutorials/01-quickstart.ipynb", "notebooks/.ipynb_checkpoints/01-quickstart-checkpoint.ipynb"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=CHECKOUT).returncode == 0, path


def git_state() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--ignored=no"], cwd=CHECKOUT, capture_output=True,
                          text=True, check=True).stdout


def test_running_and_saving_a_tutorial_leaves_the_checkout_clean(tmp_path):
    before = git_state()
    tracked = {p.name: p.read_bytes() for p in TUTORIALS.glob("*.ipynb")}
    port, token, work = free_port(), "lab-test-token", tmp_path / "work"
    env = {**os.environ, "JUPYTER_TOKEN": token, "JUPYTER_CONFIG_DIR": str(tmp_path / "cfg"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    log = open(tmp_path / "lab.log", "wb")  # noqa: SIM115
    lab = subprocess.Popen([sys.executable, "-m", "sage_nb.lab", f"--port={port}", f"--workdir={work}"],
                           env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    base = f"http://127.0.0.1:{port}/api/contents/01-quickstart.ipynb"

    def call(method: str, url: str, body=None):
        req = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(), method=method,
                                     headers={"Authorization": f"token {token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                model = call("GET", base)
                break
            except OSError:
                assert lab.poll() is None and time.monotonic() < deadline, (tmp_path / "lab.log").read_text()
                time.sleep(0.5)
        # what JupyterLab does when a user runs a cell and saves: a checkpoint, then the notebook
        call("POST", base + "/checkpoints")
        model["content"]["cells"].append({"cell_type": "code", "source": "1 + 1", "metadata": {}, "outputs": [],
                                          "execution_count": 1})
        call("PUT", base, {"type": "notebook", "format": "json", "content": model["content"]})
    finally:
        lab.send_signal(signal.SIGTERM)
        lab.wait(30)
    saved = json.loads((work / "01-quickstart.ipynb").read_text())
    assert "".join(saved["cells"][-1]["source"]) == "1 + 1" and (work / ".ipynb_checkpoints").is_dir()
    assert {p.name: p.read_bytes() for p in TUTORIALS.glob("*.ipynb")} == tracked
    assert git_state() == before
