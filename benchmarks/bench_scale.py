"""#6 Control-plane scale: 1,000 registry records; listing, backends and one routing decision,
against bare SQLite reads of the same rows, plus the REST listing against a trivial Jupyter route."""

from __future__ import annotations

import json
import sqlite3
import uuid

from sage_nb.controlplane import ControlPlane
from sage_nb.controlplane.routing.router import Router
from sage_nb.controlplane.store.registry import Engine

from .common import Figure, Settings, interleave, median, per_call
from .jserver import JServer

N = 1000
STATES = ["ready"] * 6 + ["stopped", "stopped", "failed", "starting"]


def populate(cp: ControlPlane) -> list[Engine]:
    """1,000 records in transactions of 100: 60 % ready (llm and embedding), the rest in other states."""
    engines = []
    for i in range(N):
        kind = "embedding" if i % 4 == 0 else "llm"
        engines.append(Engine(
            id=uuid.uuid4().hex[:12], name=f"engine-{i}", model=f"/models/org/model-{i % 50}",
            served_model_name=f"model-{i % 50}", kind=kind, state=STATES[i % len(STATES)], pid=100000 + i,
            create_time=1.7e9 + i, port=20000 + i, api_key=uuid.uuid4().hex, max_model_len=4096,
            extra_args=["--enforce-eager"], log_path=f"/tmp/logs/{i}.log", ready_at=1.7e9 + i))
    for start in range(0, N, 100):
        with cp.registry.transaction() as txn:
            for e in engines[start:start + 100]:
                txn.insert(e)
                txn.lease_port(e.port, e.id)
    return engines


def run(s: Settings) -> dict:
    state = s.workdir / "scale" / "state"
    cp = ControlPlane(state_dir=state, monitor=False, use_nvml=False)
    try:
        engines = populate(cp)
        raw = measure(s, cp, engines)
        raw.update(measure_rest(s, state))
    finally:
        cp.close()
    return {"figures": figures(raw), "raw": raw}


def measure(s: Settings, cp: ControlPlane, engines: list[Engine]) -> dict:
    bare = sqlite3.connect(cp.registry.path, isolation_level=None)
    router = Router(cp.registry)
    target = next(e for e in engines if e.state == "ready" and e.kind == "llm")
    some_id = engines[N // 2].id
    n_list, n_pick = s.pick(40, 15), s.pick(5000, 1000)

    def select_loads():
        return [json.loads(r[0]) for r in bare.execute("SELECT data FROM engines ORDER BY rowid").fetchall()]

    def pick_after_change():
        cp.registry.update(target.id, note=uuid.uuid4().hex)  # any commit invalidates the router's view
        return router.pick("llm", target.served_model_name)

    cases = {
        "select+json.loads": lambda: per_call(select_loads, n_list),
        "engines()": lambda: per_call(cp.engines, n_list),
        "backends()": lambda: per_call(cp.backends, n_list),
        "bare SELECT one row": lambda: per_call(
            lambda: bare.execute("SELECT data FROM engines WHERE id = ?", (some_id,)).fetchone(), n_pick),
        "pick(llm, model)": lambda: per_call(lambda: router.pick("llm", target.served_model_name), n_pick),
        "pick(embedding)": lambda: per_call(lambda: router.pick("embedding"), n_pick),
        "pick after a registry change": lambda: per_call(pick_after_change, n_list),
    }
    cycles = interleave(s.cycles, cases)
    bare.close()
    return {"cycles_s": cycles, "median_s": {k: median(v) for k, v in cycles.items()}}


def measure_rest(s: Settings, state) -> dict:
    """``GET sage_nb/api/engines`` (1,000 records) against Jupyter's own ``api/status``."""
    import time

    from .common import http_get
    from .jserver import TOKEN

    with JServer(s.workdir / "scale" / "server", state) as server:
        server.wait_up()
        auth = {"Authorization": f"token {TOKEN}"}

        def timed(path: str, n: int) -> float:
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                code, _ = http_get(server.url + path, auth, timeout=30)
                times.append(time.perf_counter() - t0)
                assert code == 200, (path, code)
            return median(times)

        n = s.pick(30, 10)
        cycles = interleave(s.cycles, {"GET api/status": lambda: timed("api/status", n),
                                       "GET sage_nb/api/engines": lambda: timed("sage_nb/api/engines", n),
                                       "GET sage_nb/api/backends": lambda: timed("sage_nb/api/backends", n)})
    return {"rest_cycles_s": cycles, "rest_median_s": {k: median(v) for k, v in cycles.items()}}


def figures(raw: dict) -> list[Figure]:
    m = {k: v * 1000 for k, v in raw["median_s"].items()}  # ms
    r = {k: v * 1000 for k, v in raw.get("rest_median_s", {}).items()}
    figs = [Figure("ControlPlane.engines(), 1,000 records", m["engines()"], m["select+json.loads"], "ms", "ratio",
                   "SELECT + json.loads of the rows", "value < 20 ms", m["engines()"] < 20),
            Figure("ControlPlane.backends(), 1,000 records", m["backends()"], m["select+json.loads"], "ms",
                   "ratio", "SELECT + json.loads of the rows", "value < 20 ms", m["backends()"] < 20)]
    for case in ("pick(llm, model)", "pick(embedding)"):
        us = m[case] * 1000
        figs.append(Figure(f"Router.{case}, 600 ready of 1,000", us, m["bare SELECT one row"] * 1000, "µs",
                           "ratio", "bare SELECT of one row", "value < 50 µs", us < 50))
    figs.append(Figure("Router.pick right after a registry change (view reloaded)", m["pick after a registry change"],
                       m["select+json.loads"], "ms", "ratio", "SELECT + json.loads of the rows",
                       note="includes the commit that changes the registry"))
    if r:
        for route in ("engines", "backends"):
            figs.append(Figure(f"GET sage_nb/api/{route} over REST, 1,000 records", r[f"GET sage_nb/api/{route}"],
                               r["GET api/status"], "ms", "diff", "GET api/status (Jupyter's own)"))
    return figs
