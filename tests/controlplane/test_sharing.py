"""The sharing package alone: the limits file (parse, resolve, reload, memory caps through a real ledger),
fair admission (who gets the next slot, a disconnect while queued, the queue limit, the engine's own
queue narrowing the window), the stream usage tap and the usage file."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import sqlite3
import time

import pytest

from sage_nb.controlplane import ControlPlane
from sage_nb.controlplane.errors import Conflict
from sage_nb.controlplane.sharing.fairshare import FairShare, QueueTimeout
from sage_nb.controlplane.sharing.limits import LimitsError, LimitsFile, parse
from sage_nb.controlplane.sharing.sse import UsageTap, reply_usage, stream_options
from sage_nb.controlplane.sharing.usage import UsageBook, seconds_to_midnight
from sage_nb.controlplane.store.ledger import SharedLedger

from ..conftest import GIB, STUB_PATH, make_model_dir

LIMITS = """
queue_timeout_s = 5
window = 4
[default]
concurrent = 8
tokens_per_day = 1000
[groups.students]
concurrent = 2
gpu_mib = 6000
[groups.staff]
concurrent = 32
[users.alice]
tokens_per_day = 5000
"""


def test_a_users_limit_is_their_own_else_their_most_generous_groups_else_the_default():
    limits = parse(LIMITS)
    assert (limits.queue_timeout_s, limits.window) == (5.0, 4)
    alice = limits.for_user("alice", ("students",))
    assert (alice.concurrent, alice.tokens_per_day, alice.gpu_mib) == (2, 5000, 6000)
    assert alice.source == {"concurrent": "group students", "tokens_per_day": "user", "gpu_mib": "group students"}
    both = limits.for_user("bob", ("students", "staff"))
    assert both.concurrent == 32 and both.source["concurrent"] == "group staff"
    nobody = limits.for_user("carol", ())
    assert (nobody.concurrent, nobody.tokens_per_day, nobody.gpu_mib) == (8, 1000, None)
    assert parse("").for_user("x").to_model()["concurrent"] is None  # no file: no limits


@pytest.mark.parametrize("text, words", [
    ("[default]\nconcurrent = 0", "concurrent must be a whole number >= 1"),
    ("[default]\ntokens_per_day = -1", "tokens_per_day must be a whole number >= 0"),
    ("[default]\nconcurent = 3", "unknown limit 'concurent'"),
    ("[users.bob]\ngpu_mib = 'lots'", "[users.bob]: gpu_mib must be a whole number"),
    ("queue_timeout_s = 0", "queue_timeout_s must be a number of seconds > 0"),
    ("window = -2", "window must be a whole number >= 0"),
    ("colour = 'red'", "unknown setting(s) ['colour']"),
    ("fair_share = 'yes'", "fair_share must be true or false"),
    ("[default\nconcurrent = 1", "not valid TOML"),
])
def test_a_bad_limits_file_is_refused_with_words(text, words):
    with pytest.raises(LimitsError) as e:
        parse(text, "limits.toml")
    assert words in e.value.message and e.value.status == 400


def test_the_file_is_reread_when_it_changes_and_a_bad_edit_keeps_the_last_good_limits(tmp_path):
    path = tmp_path / "limits.toml"
    path.write_text("[default]\nconcurrent = 3\n")
    file = LimitsFile(path)
    assert file.current().for_user("x").concurrent == 3
    path.write_text("[default]\nconcurrent = 5\n")
    file._checked = 0  # skip the once-a-second wait
    assert file.current().for_user("x").concurrent == 5
    path.write_text("[default]\nconcurrent = nope\n")
    file._checked = 0
    assert file.current().for_user("x").concurrent == 5 and "not valid TOML" in file.error
    path.unlink()
    file._checked = 0
    assert file.current().for_user("x").concurrent is None and file.error is None
    path.write_text("[default]\nconcurrent = 0\n")
    with pytest.raises(LimitsError):
        LimitsFile(path)  # at start, a bad file stops the service instead of running without limits


def test_a_start_over_the_users_memory_cap_is_a_409_with_the_numbers_and_books_nothing(tmp_path):
    ledger_dir = tmp_path / "ledger"
    ledger_dir.mkdir()
    os.chmod(ledger_dir, 0o2770)
    ledger = SharedLedger(ledger_dir)
    me = pwd.getpwuid(os.getuid()).pw_name
    with ledger.transaction() as conn:  # the box service (another user) publishes: 7000 MiB for me
        parse(f"[users.{me}]\ngpu_mib = 7000\n").publish_caps(conn, exempt="sage-llm")
    box = [{"name": "NVIDIA L4", "total_mib": 24576, "used_mib": 0, "uuid": "GPU-cap-0"}]
    cp = ControlPlane(state_dir=tmp_path / "me", shared_ledger=str(ledger_dir), fake_gpus=box,
                      port_range=(18900, 18919), engine_env={"PYTHONPATH": STUB_PATH}, adopt_unrecorded=False)
    model = make_model_dir(tmp_path / "model-4g", 4 * GIB)
    try:
        first = cp.start_engine(str(model), name="first", max_model_len=1024, wait=False)
        assert first["booked_mib"] <= 7000
        with pytest.raises(Conflict) as e:
            cp.start_engine(str(model), name="second", max_model_len=1024, wait=False)
        held = first["booked_mib"]
        assert "may book 7,000 MiB" in e.value.message and f"they hold {held:,} MiB" in e.value.message
        assert "user limit" in e.value.message
        assert [e["name"] for e in cp.engines()] == ["first"]  # nothing of the refused start is left
        assert [r["engine_name"] for r in ledger.bookings()] == ["first"]
        with ledger.transaction() as conn:  # the service's own user is exempt; no cap: no limit
            parse("").publish_caps(conn, exempt=me)
        cp.start_engine(str(model), name="second", max_model_len=1024, wait=False)
    finally:
        cp.stop_all()
        cp.close()


async def _admitted(fair, user, engine="e", capacity=2, timeout=5.0):
    return await fair.admit(user, engine, capacity, timeout)


def test_a_light_user_gets_the_next_free_slot_however_many_a_heavy_user_queued():
    async def run():
        fair = FairShare()
        heavy = [await _admitted(fair, "heavy") for _ in range(4)]  # alone: twice the capacity (2)
        queued = [asyncio.ensure_future(_admitted(fair, "heavy")) for _ in range(5)]
        await asyncio.sleep(0.01)
        light = asyncio.ensure_future(_admitted(fair, "light"))
        await asyncio.sleep(0.01)
        assert fair.engines["e"].to_model(0)["queued"] == {"heavy": 5, "light": 1}
        assert fair.engines["e"].window(0) == 2  # shared now: the capacity
        fair.release(heavy[0])
        fair.release(heavy[1])
        await asyncio.sleep(0.01)
        assert not light.done()  # still 2 in the engine
        fair.release(heavy[2])
        await asyncio.sleep(0.01)
        assert light.done() and not any(q.done() for q in queued)  # light first, though it came last
        assert fair.load("heavy") == 6 and fair.load("light") == 1
        fair.release(light.result())
        fair.release(heavy[3])
        await asyncio.sleep(0.01)
        assert sum(q.done() for q in queued) == 1  # one, its equal share; the other slot is kept for light
        fair.engines["e"].last_admitted["light"] -= 10  # light has gone: no slot kept for them
        fair.release(next(q for q in queued if q.done()).result())
        await asyncio.sleep(0.01)
        assert sum(q.done() for q in queued) == 5  # alone again: 4 in the engine (twice the capacity)
        for q in queued:
            q.cancel()
        await asyncio.sleep(0.01)
        assert fair.load("heavy") == 4 and not fair.engines["e"].queues  # in the engine; none waits

    asyncio.run(run())


def test_a_request_cancelled_while_queued_leaves_the_queue_at_once_and_a_full_wait_is_a_queue_timeout():
    async def run():
        fair = FairShare()
        held = [await _admitted(fair, "a", capacity=1) for _ in range(2)]  # alone: twice the capacity
        waiting = asyncio.ensure_future(_admitted(fair, "b", capacity=1))
        await asyncio.sleep(0.01)
        assert fair.load("b") == 1
        waiting.cancel()  # the client went away
        await asyncio.sleep(0.01)
        assert fair.load("b") == 0 and not fair.engines["e"].queues
        t0 = time.monotonic()
        with pytest.raises(QueueTimeout) as e:
            await _admitted(fair, "b", capacity=1, timeout=0.2)
        assert 0.2 <= time.monotonic() - t0 < 1 and e.value.status == 429 and e.value.retry_after >= 1
        assert "waited 0.2 s" in e.value.message and fair.load("b") == 0
        for t in held:
            fair.release(t)
        assert (await _admitted(fair, "b", capacity=1)).queued_s < 0.1  # free again: straight on

    asyncio.run(run())


def test_one_user_alone_gets_twice_the_engines_capacity_and_the_admin_window_binds_only_when_shared():
    async def run():
        fair = FairShare()
        fair.admin_window = 2
        alone = [await _admitted(fair, "a", capacity=8, timeout=0.1) for _ in range(16)]  # all straight on
        assert fair.engines["e"].total == 16
        with pytest.raises(QueueTimeout):  # not a 17th
            await _admitted(fair, "a", capacity=8, timeout=0.1)
        for t in alone[:15]:
            fair.release(t)
        b = await _admitted(fair, "b", capacity=8, timeout=1)  # two users: at most 2 at once
        with pytest.raises(QueueTimeout):
            await _admitted(fair, "a", capacity=8, timeout=0.1)
        fair.release(b)
        fair.release(alone[15])
        fair.enabled = False  # off: straight on, whatever the window
        many = [await _admitted(fair, u, capacity=1, timeout=0.1) for u in "abab"]
        assert fair.engines["e"].total == 4 and fair.load("a") == 2
        for t in many:
            fair.release(t)

    asyncio.run(run())


def test_requests_waiting_inside_the_engine_narrow_the_window_and_none_widen_it():
    fair = FairShare()
    share = fair.engine("e", 16)
    for _ in range(3):
        fair.observe("e", running=15, waiting=1)  # full: the one waiting has just arrived
    assert share.window(0) == 32  # one user (none yet): twice the capacity
    fair.observe("e", running=6, waiting=3)
    assert share.window(0) == 32  # one probe is not enough
    fair.observe("e", running=6, waiting=3)
    assert share.window(0) == 7  # what it runs, and one to take the next free slot
    fair.observe("e", running=6, waiting=0)
    assert share.window(0) == 8
    for _ in range(10):
        fair.observe("e", running=6, waiting=0)
    assert share.window(0) == 32 and share.narrowed is None


def events(*bodies) -> list[bytes]:
    return [b"data: " + json.dumps(b, separators=(",", ":")).encode() + b"\n\n" for b in bodies]


CHUNKS = events({"choices": [{"delta": {"content": "hi \"usage\":{"}}]}, {"choices": [{"delta": {}}]},
                {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}})
STREAM = b"".join(CHUNKS) + b"data: [DONE]\n\n"


@pytest.mark.parametrize("cut", [1, 7, 40, 77, len(STREAM) - 20, len(STREAM) - 3])
def test_the_usage_event_is_read_and_dropped_for_a_client_that_did_not_ask_wherever_reads_split(cut):
    for asked in (False, True):
        tap = UsageTap(pass_usage=asked)
        out = tap.feed(STREAM[:cut]) + tap.feed(STREAM[cut:]) + tap.flush()
        assert tap.usage == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
        expected = STREAM if asked else CHUNKS[0] + CHUNKS[1] + b"data: [DONE]\n\n"
        assert out == expected


def test_stream_options_and_plain_reply_usage():
    body, asked = stream_options({"stream": True})
    assert body["stream_options"] == {"include_usage": True} and not asked
    body, asked = stream_options({"stream": True, "stream_options": {"include_usage": True}})
    assert asked
    body, _ = stream_options({"stream": True, "stream_options": {"continuous_usage_stats": False}})
    assert body["stream_options"] == {"continuous_usage_stats": False, "include_usage": True}
    assert reply_usage(b'{"usage": {"prompt_tokens": 3, "completion_tokens": 1}}')["prompt_tokens"] == 3
    assert reply_usage(b'{"id": 1}') is None and reply_usage(b"not json \"usage\":{") is None


def test_usage_rows_add_up_survive_a_reopen_and_feed_today_and_the_shares(tmp_path):
    book = UsageBook(tmp_path / "usage.sqlite3")
    book.add("alice", "llm", 10, 5, 0.5)
    book.add("alice", "llm", 10, 5, 0.25)
    book.add("bob", "llm", 20, 10, 0.0)
    book.add("bob", "emb", 8, 0, 0.0)
    book.close()  # a killed service: every add was committed
    assert oct(os.stat(tmp_path / "usage.sqlite3").st_mode & 0o777) == "0o600"
    book = UsageBook(tmp_path / "usage.sqlite3")
    assert book.tokens_today("alice") == 30 and book.tokens_today("bob") == 38 and book.tokens_today("c") == 0
    (alice,) = book.rows(user="alice")
    assert [alice[k] for k in ("requests", "prompt_tokens", "completion_tokens", "queued_s")] == [2, 20, 10, 0.75]
    assert len(book.rows()) == 3
    assert book.shares() == {"emb": {"bob": 1.0}, "llm": {"alice": 0.5, "bob": 0.5}}
    assert 0 < seconds_to_midnight() <= 86400
    rows = sqlite3.connect(tmp_path / "usage.sqlite3").execute("SELECT COUNT(*) FROM usage").fetchone()
    assert rows == (3,)


def test_among_users_with_nothing_in_flight_the_one_served_longest_ago_goes_next():
    async def run():
        fair = FairShare()
        held = [await _admitted(fair, "a", capacity=1) for _ in range(2)]  # alone: twice the capacity
        a2 = asyncio.ensure_future(_admitted(fair, "a", capacity=1))
        await asyncio.sleep(0.01)
        b1 = asyncio.ensure_future(_admitted(fair, "b", capacity=1))  # later, but b was never served
        await asyncio.sleep(0.01)
        for t in held:
            fair.release(t)
        await asyncio.sleep(0.01)
        assert b1.done() and not a2.done()
        fair.release(b1.result())
        await asyncio.sleep(0.01)
        assert a2.done()
        fair.release(a2.result())

    asyncio.run(run())


def test_the_admin_window_holds_between_a_light_users_requests():
    async def run():
        fair = FairShare()
        fair.admin_window = 2
        light = await _admitted(fair, "light", capacity=8)
        fair.release(light)  # done; the light user will send the next in a moment
        heavy = [await _admitted(fair, "heavy", capacity=8, timeout=0.05)]
        with pytest.raises(QueueTimeout):  # not a second: the other slot of 2 is kept for the light user
            await _admitted(fair, "heavy", capacity=8, timeout=0.05)
        light = await _admitted(fair, "light", capacity=8, timeout=0.05)
        assert light.queued_s < 0.01  # ... whose next request goes straight on
        fair.release(light)
        fair.engines["e"].last_admitted["light"] -= 10  # long gone: heavy has the whole engine again
        more = [await _admitted(fair, "heavy", capacity=8, timeout=0.05) for _ in range(15)]
        for t in heavy + more:
            fair.release(t)

    asyncio.run(run())


def test_a_slot_kept_for_a_user_between_requests_never_holds_another_below_an_equal_share():
    async def run():
        fair = FairShare()
        fair.release(await _admitted(fair, "light", capacity=1))  # light is between two requests
        heavy = await _admitted(fair, "heavy", capacity=1, timeout=0.05)  # the only slot: its equal share
        assert fair.engines["e"].kept_free("heavy") == 1 and fair.engines["e"].kept_free("light") == 0
        queued = asyncio.ensure_future(_admitted(fair, "light", capacity=1))
        await asyncio.sleep(0.01)
        fair.release(heavy)
        await asyncio.sleep(0.01)
        assert queued.done()
        fair.release(queued.result())

    asyncio.run(run())
