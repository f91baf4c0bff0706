"""Fair share, limits and usage on the box service, with real Unix users (standalone keys), each through
their own jupyter server: 429s with the right headers and bodies (requests at once, tokens per day, the
queue limit), the next free slot going to the user who has none, a client that hangs up while queued
leaving the queue at once, the GPU memory cap on a user's private engines, who sees which usage, limits
changed while everything runs, and usage rows that survive a SIGKILL of the service. Engines are the
stand-in, streaming slowly enough to hold a slot (the real engine: test_box's tiny vLLM test)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from ..conftest import GIB, make_model_dir
from ..serverproc import TOKEN, wait_ready
from .test_box import Service, admin, box, call, key, user_server  # noqa: F401 (box: the module's fixture)

ROOT = type("U", (), {"name": "root"})  # the admin's key (made by the share fixture)
PARTS, GAP_MS = 4, 250  # a stream holds its slot about a second
SLOW = {"STUB_STREAM_PARTS": str(PARTS), "STUB_STREAM_GAP_MS": str(GAP_MS)}


def post(url: str, body: dict, timeout: float = 30) -> tuple[int, dict, bytes]:
    """(status, headers, raw body) of one POST with the users' server token."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def chat(server, model: str = "one-at-a-time", stream: bool = False, timeout: float = 30, **extra):
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "stream": stream, **extra}
    return post(server.url + "sage_nb/v1/chat/completions", body, timeout)


def in_thread(fn, *args, **kw) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        out["reply"] = fn(*args, **kw)
        out["done_at"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


@pytest.fixture(scope="module")
def share(box):  # noqa: F811
    """The box's service restarted with slow streams; the limits file; alice's and bob's servers; an engine
    that runs one request at a time (--max-num-seqs 1) published by alice."""
    box["service"].kill()
    service = Service(box, engine_env=SLOW)
    service.start()
    box["service"] = service
    done = admin("add-key", "root", "--service-dir", str(box["state"]),
                 "--key-file", str(box["root"] / "keys" / "root"))
    assert done.returncode == 0, done.stderr
    with user_server(box, box["alice"], "srv", (18540, 18559)) as a, \
            user_server(box, box["bob"], "srv", (18560, 18579)) as b:
        model = make_model_dir(box["root"] / "model-4g", 4 * GIB)
        subprocess.run(["chmod", "-R", "a+rX", str(model)], check=True)
        code, engine = a.request("POST", "sage_nb/api/engines", {
            "model": str(model), "name": "one-at-a-time", "max_model_len": 1024, "shared": True,
            "extra_args": ["--max-num-seqs", "1"]})
        assert code == 202, engine
        wait_ready(a, engine["id"], timeout=60)
        yield {"box": box, "alice": a, "bob": b, "model": model, "root_key": key(box, ROOT)}
    service.kill()


def set_limits(bx, text: str) -> None:
    """Write the service's limits file as its admin would, then wait until the service has taken it (it
    reads the file within a second; a fixed sleep lost that race on a busy CI machine)."""
    def taken() -> tuple:
        code, state = call(bx["service"].url + "sage_nb/api/box/limits", credential=key(bx, ROOT))
        assert code == 200, state
        return state["loaded_at"], state["error"]

    before = taken()
    path = bx["state"] / "limits.toml"
    path.write_text(text)
    user = bx["service_user"]
    os.chown(path, user.uid, user.gid)
    deadline = time.monotonic() + 15
    while taken() == before:
        assert time.monotonic() < deadline, f"the service did not take the new limits file: {text!r}"
        time.sleep(0.1)


def usage(share, who: str = "bob", query: str = "") -> dict:
    code, reply = share[who].request("GET", f"sage_nb/api/box/usage{query}")
    assert code == 200, reply
    return reply


def admission(share) -> dict:
    """The shared engine's admission state, as the service's admin sees it."""
    code, state = call(share["box"]["service"].url + "sage_nb/api/box/limits", credential=share["root_key"])
    assert code == 200, state
    return next((e for e in state["engines"] if e["capacity"] == 1), {})


def error_of(raw: bytes) -> dict:
    return json.loads(raw)["error"]


def test_over_the_requests_at_once_limit_is_a_429_with_retry_after_and_words(share):
    set_limits(share["box"], f"[users.{share['box']['bob'].name}]\nconcurrent = 1\n")
    bob = share["bob"]
    thread, first = in_thread(chat, bob, stream=True)
    time.sleep(0.4)  # the stream holds bob's one request
    status, headers, raw = chat(bob)
    thread.join()
    assert first["reply"][0] == 200
    assert status == 429 and headers["Retry-After"] == "1", raw
    error = error_of(raw)
    assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded"
    assert "1 request(s) in flight or queued" in error["message"] and "(1, user limit)" in error["message"]
    assert chat(bob)[0] == 200  # the stream is over: room again
    set_limits(share["box"], "")  # changed while the engine runs: no limit any more
    threads = [in_thread(chat, bob, stream=True) for _ in range(2)]
    for thread, out in threads:
        thread.join()
        assert out["reply"][0] == 200


def test_the_next_free_slot_goes_to_the_user_with_none_not_to_the_earliest_request(share):
    alice, bob = share["alice"], share["bob"]
    first = in_thread(chat, alice, stream=True)
    time.sleep(0.3)
    queued = [in_thread(chat, alice, stream=True) for _ in range(2)]  # alice's next two wait
    time.sleep(0.3)
    light = in_thread(chat, bob)  # bob's one request comes last
    expected = {share["box"]["alice"].name: 2, share["box"]["bob"].name: 1}
    deadline = time.monotonic() + 0.6
    while True:
        engine = admission(share)
        if engine.get("queued") == expected or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert engine["window"] == 1 and engine["queued"] == expected, engine
    for thread, _ in [first, *queued, light]:
        thread.join()
    assert all(out["reply"][0] == 200 for _, out in [first, *queued, light])
    # first come, first served would answer both of alice's before bob's
    assert light[1]["done_at"] < min(out["done_at"] for _, out in queued)


def test_a_client_that_hangs_up_while_queued_leaves_the_queue_at_once_and_a_long_wait_is_a_429(share):
    alice, bob, bx = share["alice"], share["bob"], share["box"]
    holder = in_thread(chat, alice, stream=True)
    time.sleep(0.3)
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        chat(bob, timeout=0.3)  # bob's client gives up while his request waits
    time.sleep(0.2)
    assert bx["bob"].name not in admission(share)["queued"]
    holder[0].join()
    set_limits(bx, "queue_timeout_s = 0.4\n")
    holder = in_thread(chat, alice, stream=True)
    time.sleep(0.3)
    t0 = time.monotonic()
    status, headers, raw = chat(bob)
    waited = time.monotonic() - t0
    holder[0].join()
    set_limits(bx, "")
    assert status == 429 and int(headers["Retry-After"]) >= 1 and 0.3 < waited < 3, raw
    error = error_of(raw)
    assert "waited 0.4 s" in error["message"] and error["type"] == "requests"


def test_usage_rows_are_the_engines_own_counts_and_each_user_sees_their_own(share):
    alice, bob, bx = share["alice"], share["bob"], share["box"]
    before = usage(share)
    assert before["rows"] == [] or all(r["user"] == bx["bob"].name for r in before["rows"])
    base = {r["engine"]: r for r in before["rows"]}.get("one-at-a-time", {"requests": 0, "prompt_tokens": 0,
                                                                          "completion_tokens": 0})
    assert chat(bob)[0] == 200  # plain: the stub's usage is 4 prompt + 1 completion tokens
    status, _, raw = chat(bob, stream=True)  # a stream that did not ask for usage sees no usage event
    assert status == 200 and b'"usage"' not in raw and raw.rstrip().endswith(b"data: [DONE]")
    status, _, raw = chat(bob, stream=True, stream_options={"include_usage": True})  # one that asked sees it
    assert status == 200 and b'"choices":[],"usage":{"prompt_tokens":4' in raw
    after = {r["engine"]: r for r in usage(share)["rows"]}["one-at-a-time"]
    assert after["requests"] - base["requests"] == 3
    assert after["prompt_tokens"] - base["prompt_tokens"] == 12
    assert after["completion_tokens"] - base["completion_tokens"] == 1 + PARTS + PARTS
    assert chat(alice)[0] == 200
    mine = usage(share)
    assert {r["user"] for r in mine["rows"]} == {bx["bob"].name} and not mine["admin"]
    shares = mine["shares"]["one-at-a-time"]  # who uses what: everyone sees each engine's split
    assert set(shares) >= {bx["alice"].name, bx["bob"].name} and abs(sum(shares.values()) - 1) < 1e-9
    code, reply = bob.request("GET", f"sage_nb/api/box/usage?user={bx['alice'].name}")
    assert code == 403 and "own usage only" in reply["message"]
    assert bob.request("GET", "sage_nb/api/box/usage?days=0")[0] == 400
    code, everyone = call(bx["service"].url + "sage_nb/api/box/usage", credential=share["root_key"])
    assert everyone["admin"] and {r["user"] for r in everyone["rows"]} >= {bx["alice"].name, bx["bob"].name}


def test_over_the_daily_tokens_is_a_429_until_midnight(share):
    bx, bob = share["box"], share["bob"]
    assert chat(bob)[0] == 200
    used = usage(share)["tokens_today"]
    assert used > 0
    set_limits(bx, f"[default]\ntokens_per_day = {used}\n")
    status, headers, raw = chat(bob)
    set_limits(bx, "")
    assert status == 429, raw
    error = error_of(raw)
    assert error["type"] == "tokens" and f"used {used:,} tokens today" in error["message"]
    assert "resets at 00:00 UTC" in error["message"] and 0 < int(headers["Retry-After"]) <= 86401


def test_a_private_start_over_the_users_memory_cap_is_a_409_with_the_numbers(share):
    bx, bob = share["box"], share["bob"]
    set_limits(bx, f"[users.{bx['bob'].name}]\ngpu_mib = 3000\n")
    code, reply = bob.request("POST", "sage_nb/api/engines", {"model": str(share["model"]), "name": "mine",
                                                             "max_model_len": 1024})
    set_limits(bx, "")
    assert code == 409, reply
    assert "may book 3,000 MiB" in reply["message"] and "user limit" in reply["message"]
    assert bob.request("GET", "sage_nb/api/engines")[1] == [] or all(
        e["name"] != "mine" for e in bob.request("GET", "sage_nb/api/engines")[1])
    code, limits = bob.request("GET", "sage_nb/api/box/limits")
    assert code == 200 and limits["limits"]["gpu_mib"] is None and limits["error"] is None


def test_a_bad_limits_edit_keeps_the_last_good_limits_and_says_why(share):
    bx, bob = share["box"], share["bob"]
    set_limits(bx, "[default]\nconcurrent = 0\n")
    code, limits = bob.request("GET", "sage_nb/api/box/limits")
    set_limits(bx, "")
    assert code == 200 and "concurrent must be a whole number >= 1" in limits["error"]
    assert chat(bob)[0] == 200


def test_a_killed_service_keeps_every_answered_requests_row(share):
    bx, bob = share["box"], share["bob"]
    rows = {r["engine"]: r["requests"] for r in usage(share)["rows"]}.get("one-at-a-time", 0)
    answered, stop = [], threading.Event()

    def run():
        while not stop.is_set():
            try:
                if chat(bob, timeout=5)[0] == 200:
                    answered.append(1)
            except OSError:
                return

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(1.5)
    bx["service"].kill()  # SIGKILL in the middle of the run
    stop.set()
    thread.join()
    assert len(answered) > 3
    bx["service"].start()
    after = {r["engine"]: r["requests"] for r in usage(share)["rows"]}["one-at-a-time"]
    assert rows + len(answered) <= after <= rows + len(answered) + 1




def test_llm_usage_shows_a_users_own_rows_the_engines_shares_and_their_limits(share):
    from sage_nb.kernel.magics import LLMMagics, SageNBError

    bx, bob = share["box"], share["bob"]
    assert chat(share["alice"])[0] == 200 and chat(bob)[0] == 200
    magics = LLMMagics(shell=None, server_url=bob.url, token=TOKEN)
    text = repr(magics.llm("usage --days 2"))
    assert text.startswith("sage_nb: your use of the shared engines, the last 2 days"), text
    assert bx["bob"].name in text and f"{bx['alice'].name}  one-at-a-time" not in text  # no one else's rows
    assert "share of work by user: one-at-a-time: " in text and bx["alice"].name in text.split("share of work")[1]
    assert "tokens today (UTC), no daily limit" in text
    with pytest.raises(SageNBError) as e:
        magics.llm(f"usage --user {bx['alice'].name}")
    assert "own usage only" in str(e.value)


def test_the_dashboard_shows_each_shared_engines_share_of_work_by_user(share):
    from sage_nb.kernel.client import Client
    from sage_nb.kernel.dashboard import Dashboard, started_by_html

    bx = share["box"]
    assert chat(share["alice"])[0] == 200 and chat(share["bob"])[0] == 200
    board = Dashboard(client=Client(url=share["bob"].url, token=TOKEN), autostart=False)
    (engine,) = [e for e in board.snapshot["engines"] if e["name"] == "one-at-a-time"]
    assert engine["shared"] and set(engine["share_of_work"]) >= {bx["alice"].name, bx["bob"].name}
    cell = started_by_html(engine)
    assert "today: " in cell and bx["alice"].name in cell and "%" in cell
    board.close()


def test_a_shared_engines_metrics_through_a_users_server_count_each_users_requests(share):
    """Issue 23's per-user counts: bob's server passes the series request on to the box service, whose
    reply has each user's requests today and their requests in the engine (or queued) right now."""
    alice, bob, bx = share["alice"], share["bob"], share["box"]
    rows = {r["user"]: r for r in call(bx["service"].url + "sage_nb/api/box/usage",
                                       credential=share["root_key"])[1]["rows"] if r["engine"] == "one-at-a-time"}
    before = {u: rows.get(bx[u].name, {}).get("requests", 0) for u in ("alice", "bob")}
    assert chat(alice)[0] == 200 and chat(bob)[0] == 200 and chat(bob)[0] == 200
    holder = in_thread(chat, alice, stream=True)  # alice's stream holds the engine's one slot
    time.sleep(0.3)
    code, series = bob.request("GET", "sage_nb/api/metrics/engines/one-at-a-time?window=60")
    holder[0].join()
    assert code == 200, series
    assert series["name"] == "one-at-a-time" and series["window_s"] == 60
    users = series["users"]
    assert users[bx["bob"].name]["requests"] - before["bob"] == 2
    assert users[bx["alice"].name]["requests"] - before["alice"] == 1  # her stream is not done yet
    assert users[bx["alice"].name]["in_flight"] == 1 and users[bx["bob"].name]["in_flight"] == 0
    assert users[bx["bob"].name]["prompt_tokens"] >= 8  # the stub's usage: 4 prompt tokens a request
    code, overview = bob.request("GET", "sage_nb/api/metrics?window=60")
    assert code == 200 and any(e["name"] == "one-at-a-time" and e["shared"] for e in overview["engines"])


def test_users_own_adapters_on_a_shared_engine_are_theirs_and_whom_they_share_them_with(share, tmp_path):
    """Issue 24 on the box: bob's server reads his adapter from his home (closed to the service) and sends
    it; the service keeps it under his name; only he may use it until he shares it; his requests to it
    count in his usage; alice's own adapter is hers to unload; his unload deletes the service's copy."""
    from ..adapterfiles import fake_adapter

    alice, bob, bx = share["alice"], share["bob"], share["box"]
    set_limits(bx, "")  # none of the earlier tests' limits
    code, engine = alice.request("POST", "sage_nb/api/engines", {
        "model": str(share["model"]), "name": "team-lora", "max_model_len": 1024, "shared": True, "lora": True})
    assert code == 202, engine
    wait_ready(alice, engine["id"], timeout=60)
    adapters = {}
    for who, name in (("bob", "bobs"), ("alice", "alices")):
        user = bx[who]
        folder = fake_adapter(user.home / "lora" / name)
        subprocess.run(["chown", "-R", f"{user.uid}:{user.gid}", str(user.home / "lora")], check=True)
        os.chmod(user.home / "lora", 0o700)  # the service cannot read it: the files must travel
        code, adapters[who] = share[who].request("POST", "sage_nb/api/adapters",
                                                 {"name": name, "path": str(folder), "engine": "team-lora"})
        assert code == 201, adapters[who]
        assert adapters[who]["owner"] == user.name and adapters[who]["users"] == [], adapters[who]
    stored = adapters["bob"]["path"]
    assert stored.startswith(str(bx["state"] / "adapters" / bx["bob"].name / "bobs-")), stored

    models = {m["id"]: m for m in bob.request("GET", "sage_nb/v1/models")[1]["data"]}
    assert models["bobs"]["parent"] == "team-lora" and models["bobs"]["owned_by"] == bx["bob"].name
    assert "alices" not in models  # listed as hers in the engines list, not a model he may ask for
    (listed,) = [e for e in bob.request("GET", "sage_nb/api/engines")[1] if e["name"] == "team-lora"]
    assert {a["name"]: a["usable"] for a in listed["adapters"]} == {"bobs": True, "alices": False}
    code, listing = bob.request("GET", "sage_nb/api/adapters")  # %llm adapters: the box's, with their owners
    assert code == 200 and {(a["name"], a["owner"], a["shared"], a["usable"]) for a in listing} == {
        ("bobs", bx["bob"].name, True, True), ("alices", bx["alice"].name, True, False)}, listing

    before = sum(r["requests"] for r in usage(share)["rows"] if r["engine"] == "team-lora")
    code, _, raw = chat(bob, "bobs")
    assert code == 200 and json.loads(raw)["model"] == "bobs", raw  # the adapter's name reached the engine
    assert sum(r["requests"] for r in usage(share)["rows"] if r["engine"] == "team-lora") == before + 1
    code, _, raw = chat(alice, "bobs")
    assert code == 403 and "not shared with" in error_of(raw)["message"], raw
    code, reply = bob.request("DELETE", "sage_nb/api/adapters/alices")
    assert code == 403 and "only they (or a publisher)" in reply["message"], reply

    code, again = bob.request("POST", "sage_nb/api/adapters", {"name": "bobs", "path": str(
        bx["bob"].home / "lora" / "bobs"), "engine": "team-lora", "share": [bx["alice"].name]})
    assert code == 201 and again["users"] == [bx["alice"].name] and again["path"] == stored, again
    assert chat(alice, "bobs")[0] == 200  # shared with her now
    empty = bx["bob"].home / "lora" / "empty"
    empty.mkdir()
    os.chown(empty, bx["bob"].uid, bx["bob"].gid)
    code, bad = bob.request("POST", "sage_nb/api/adapters", {"name": "bobs", "path": str(empty),
                                                             "engine": "team-lora"})
    assert code == 400 and "has no adapter_config.json" in bad["message"], bad  # refused on his own server
    code, bad = bob.request("POST", "sage_nb/api/adapters", {"name": "bobs", "path": str(tmp_path),
                                                             "engine": "team-lora"})
    assert code == 400 and "cannot read adapter path" in bad["message"], bad  # root's folder, closed to him

    code, removed = bob.request("DELETE", "sage_nb/api/adapters/bobs")
    assert code == 200 and [a["name"] for a in removed["removed"]] == ["bobs"], removed
    assert not os.path.exists(stored)
    code, _, raw = chat(bob, "bobs")
    assert code == 503 and "No LLM backend" in error_of(raw)["message"], raw  # bob has no engine of his own
    code, removed = alice.request("DELETE", "sage_nb/api/adapters/alices")  # a publisher manages any
    assert code == 200 and removed["removed"][0]["owner"] == bx["alice"].name
    assert alice.request("DELETE", f"sage_nb/api/engines/{engine['id']}")[0] in (200, 202)
