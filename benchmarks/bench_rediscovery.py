"""#5 Rediscovery: N fast stub engines (vLLM's command line) are running; time from launching the
jupyter server until ``sage_nb/api/backends`` lists all N — adopted into an empty registry, and
re-attached from the registry the previous server left — against the same server with no engines."""

from __future__ import annotations

import secrets
import shutil

from .common import Figure, Settings, free_port, interleave, kill_group, median, start_stub, wait_healthy
from .jserver import JServer


def run(s: Settings) -> dict:
    sizes = s.pick([8, 32], [32])
    work = s.workdir / "rediscovery"
    procs, names, states = [], {}, {}
    try:
        for n in sizes:
            states[n] = (work / f"state-{n}").resolve()
            names[n] = {f"stub{n}-{i}" for i in range(n)}
            registry = str(states[n] / "registry.sqlite3")  # only this size's server may adopt them
            for name in sorted(names[n]):
                port = free_port()
                procs.append((port, start_stub(port, name, work / "stubs" / f"{name}.log",
                                               key=secrets.token_urlsafe(8), registry=registry)))
        for port, _ in procs:
            wait_healthy(port)

        def empty() -> float:
            shutil.rmtree(work / "empty", ignore_errors=True)
            with JServer(work / "server", work / "empty") as server:
                return server.wait_up()

        def engines(n: int) -> tuple[float, float]:
            shutil.rmtree(states[n], ignore_errors=True)  # a fresh registry: every stub is adopted
            with JServer(work / "server", states[n]) as server:
                adopt = server.wait_backends(names[n])
            with JServer(work / "server", states[n]) as server:  # a restart: all are recorded
                return adopt, server.wait_backends(names[n])

        cases = {"no engines": empty} | {f"N={n}": (lambda n=n: engines(n)) for n in sizes}
        cycles = interleave(s.cycles, cases)
    finally:
        for _, proc in procs:
            kill_group(proc, grace=3)
    base = median(cycles["no engines"])
    figs = []
    for n in sizes:
        adopt = median([a for a, _ in cycles[f"N={n}"]])
        again = median([r for _, r in cycles[f"N={n}"]])
        goal = n == 32
        figs += [Figure(f"server start until {n} stub engines are backends (adopted, empty registry)", adopt, base,
                        "s", "diff", "server start, no engines", "value <= 2 s" if goal else "",
                        adopt <= 2.0 if goal else None),
                 Figure(f"server start until {n} stub engines are backends (re-attached after a restart)", again,
                        base, "s", "diff", "server start, no engines", "value <= 2 s" if goal else "",
                        again <= 2.0 if goal else None)]
    return {"figures": figs, "raw": {"cycles_s": cycles}}
