"""Results of the magics: tables with an HTML repr for notebooks and aligned text for terminals."""

from __future__ import annotations

import html
import math
import re
import time

from sage_nb.controlplane.errors import ControlPlaneError, EngineFailed, NotFound
from sage_nb.controlplane.state import EngineState

from .integrations import jupyter_ai_lines

FAILED_ENGINE = re.compile(r"engine '(?P<name>[^']+)' ")


class Table:
    """Rows under a title; ``_repr_html_`` in notebooks, aligned columns as text."""

    def __init__(self, title: str, columns: list[str], rows: list[list], empty: str = "none",
                 footer: str | None = None) -> None:
        self.title, self.columns, self.empty, self.footer = title, columns, empty, footer
        self.rows = [["" if v is None else str(v) for v in row] for row in rows]

    def __repr__(self) -> str:
        lines = [self.title]
        if not self.rows:
            lines.append(f"  ({self.empty})")
        else:
            widths = [max(len(c), *(len(r[i]) for r in self.rows)) for i, c in enumerate(self.columns)]
            lines.append("  ".join(c.ljust(w) for c, w in zip(self.columns, widths, strict=True)).rstrip())
            lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in self.rows]
        if self.footer:
            lines.append(self.footer)
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        head = "".join(f"<th style='text-align:left'>{html.escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{html.escape(v)}</td>" for v in r)
                       + "</tr>" for r in self.rows)
        if not self.rows:
            body = f"<tr><td colspan='{len(self.columns)}'><i>{html.escape(self.empty)}</i></td></tr>"
        foot = f"<div style='white-space:pre-wrap'>{html.escape(self.footer)}</div>" if self.footer else ""
        return (f"<div class='sage-nb-table'><b>{html.escape(self.title)}</b><table><thead><tr>{head}</tr>"
                f"</thead><tbody>{body}</tbody></table>{foot}</div>")


def uptime(engine: dict) -> str:
    if engine.get("state") != EngineState.READY or not engine.get("ready_at"):
        return ""
    seconds = int(time.time() - engine["ready_at"])
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def span(seconds: float | None) -> str:
    """Seconds as a duration the way ``keep_alive`` takes them (``4m10s``, ``1h30m``, ``2d``), rounded
    up to a whole second; ``None`` is ``forever``."""
    if seconds is None:
        return "forever"
    left, parts = max(0, math.ceil(seconds)), []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if left >= size:
            parts.append(f"{left // size}{unit}")
            left %= size
    return "".join(parts) or "0s"


def idle_text(engine: dict, now: float | None = None) -> str:
    """When a ready engine gives its memory back (``in 4m10s``, ``now``, ``never``), or its idle state."""
    state = engine.get("state")
    if state == EngineState.READY:
        if engine.get("keep_alive") is None:
            return "never"
        if engine.get("idle_at") is None:
            return ""
        left = engine["idle_at"] - (time.time() if now is None else now)
        return f"in {span(left)}" if left > 0 else "now"
    if state == EngineState.SLEEPING:
        return f"sleeping L{engine['sleep_level']}" if engine.get("sleep_level") else "sleeping"
    if state in (EngineState.UNLOADED, EngineState.WAKING):
        return str(state)
    return ""


def started_by(engine: dict) -> str:
    """Which notebook (else kernel) started the engine, and ``(kernel scope)`` when it ends with it; a
    shared engine of the box service: ``shared by <publisher>``."""
    if engine.get("shared"):
        return f"shared by {engine.get('publisher') or '?'}"
    who = (engine.get("notebook") or "").replace("\\", "/").rsplit("/", 1)[-1] or (engine.get("kernel_id") or "")[:8]
    return f"{who} (kernel scope)" if engine.get("scope") == "kernel" else who


def engines_table(engines: list[dict], title: str = "sage_nb engines") -> Table:
    rows = [[e["id"], e["name"], e["kind"], e["state"], ",".join(map(str, e["gpu_ids"])) or e.get("device", "cpu"),
             e["port"], uptime(e), idle_text(e), e["served_model_name"], started_by(e)] for e in engines]
    columns = ["id", "name", "kind", "state", "gpus", "port", "uptime", "idle", "model", "started by"]
    if any(e.get("node") for e in engines):  # a cluster: which node each engine runs on
        columns.insert(4, "node")
        for row, e in zip(rows, engines, strict=True):
            row.insert(4, e.get("node") or "")
    return Table(title, columns, rows, empty="no engines — start one with %llm start <model>")


def backends_table(backends: dict, gateway_url: str | None = None) -> Table:
    """The ready backends; with the gateway's URL (server mode), the lines to use each LLM from jupyter-ai."""
    rows = []
    for b in backends["llm_backends"] + backends["embedding_backends"]:
        rows.append([b["kind"], b["served_model_name"], b["name"], b["id"],
                     f"shared by {b.get('publisher') or '?'} (box service)" if b.get("shared") else b["base_url"]])
        rows += [["  adapter", a["name"], b["name"], b["id"], f"LoRA on {b['served_model_name']}"]
                 for a in b.get("adapters") or () if not a.get("error")]
    hint = jupyter_ai_lines(gateway_url, backends["llm_backends"]) if gateway_url else []
    box = backends.get("box")
    if box and box.get("state") == "unavailable":
        hint.insert(0, f"shared engines unavailable: {box.get('reason')}")
    return Table("sage_nb backends", ["kind", "model", "engine", "id", "engine url"], rows,
                 empty="no ready backends — start one with %llm start <model>", footer="\n".join(hint) or None)


def adapters_table(adapters: list[dict], title: str = "sage_nb adapters") -> Table:
    """LoRA adapters with their engine: name, base, rank, state (loaded, waiting for its engine, or the
    error of its last load), path."""
    def state(a: dict) -> str:
        if a.get("error"):
            return f"failed: {a['error']}"
        return "loaded" if a.get("loaded_at") and a.get("engine_state", "ready") == "ready" else \
            f"loads when {a.get('engine')} is ready"
    def who(a: dict) -> str:  # on the box service's shared engines: whose, and whom it is shared with
        if not a.get("shared") and "usable" not in a:
            return ""
        users = ", ".join(a.get("users") or [])
        return (a.get("owner") or "box") + (f" (with {users})" if users else "") + \
            ("" if a.get("usable", True) else "; not yours to use")
    rows = [[a["name"], a.get("engine", ""), a.get("parent", ""), a.get("rank", ""), state(a), who(a),
             "" if a.get("shared") else a.get("path", "")] for a in adapters]
    return Table(title, ["adapter", "engine", "base model", "rank", "state", "owner", "path"], rows,
                 empty="no adapters — %llm adapter load NAME PATH (on an engine started with --lora)")


def holders(parts: dict | None) -> str:
    """Who holds a GPU's memory, in MiB: ``chat 5761; bob/embed 1627; alice/python 20480; ? 1024``
    (this user's engines by name, other users' by user/engine, other processes by user/command, then
    what nothing accounts for)."""
    if not parts:
        return ""
    items = [f"{e['name']} {max(e['booked_mib'], e['used_mib'])}" for e in parts["mine"]]
    items += [f"{e['user']}/{e['name']} {max(e['booked_mib'], e['used_mib'])}" for e in parts["others"]]
    items += [f"{p['user']}/{p['command']} {p['used_mib']}" for p in parts["processes"]]
    if parts["unaccounted_mib"]:
        items.append(f"? {parts['unaccounted_mib']}")
    return "; ".join(items)


def gpus_table(report: dict) -> Table:
    """The GPUs; on a cluster grouped by node, under a node column."""
    devices = report["devices"]
    rows = [[d["index"], d["name"], d["total_mib"], d["used_mib"], d["booked_mib"], d["available_mib"],
             "" if d.get("utilization") is None else f"{d['utilization']}%", holders(d.get("parts"))]
            for d in devices]
    columns = ["gpu", "name", "total MiB", "used MiB", "booked MiB", "available MiB", "util", "held by (MiB)"]
    if any(d.get("node") for d in devices):
        nodes = list(dict.fromkeys(d.get("node") for d in devices))  # in the order they first appear
        order = sorted(range(len(devices)), key=lambda i: nodes.index(devices[i].get("node")))
        rows = [[devices[i].get("node") or "(this machine)", *rows[i]] for i in order]
        columns.insert(0, "node")
    empty = f"no NVIDIA GPU ({report.get('error') or 'none found'}): engines run on CPU"
    if report["source"] != "none" and report.get("error"):  # the machine has GPUs, none for this server
        empty = f"no GPU device this server may use: {report['error']}"
    warning = report.get("warning")
    return Table(f"GPUs ({report['source']})", columns, rows, empty=empty,
                 footer=f"warning: {warning}" if warning else None)


class Logs:
    """An engine's log tail, shown as preformatted text."""

    def __init__(self, engine: str, text: str) -> None:
        self.engine, self.text = engine, text

    def __repr__(self) -> str:
        return self.text.rstrip("\n") or f"(the log of {self.engine} is empty)"

    def _repr_html_(self) -> str:
        return f"<pre style='max-height:30em;overflow:auto'>{html.escape(repr(self))}</pre>"


class Note:
    """A line of Markdown that also reads well as plain text (terminals, nbval)."""

    def __init__(self, markdown: str, plain: str | None = None) -> None:
        self.markdown = markdown
        self.plain = plain if plain is not None else markdown.replace("**", "")

    def __repr__(self) -> str:
        return self.plain

    def _repr_markdown_(self) -> str:
        return self.markdown


def one_line(error: ControlPlaneError) -> str:
    """A control-plane error as the notebook shows it: a failed engine's first line (its cause; the
    lines after it are the log tail) and where its log is; a missing engine with where to list them."""
    message = error.message
    if isinstance(error, NotFound) and message.startswith("no engine with id or name"):
        return f"{message}; see %llm engines"
    if isinstance(error, EngineFailed):
        first = message.split("\n")[0].rstrip()
        match = FAILED_ENGINE.match(message)
        return f"{first} (the engine's log: %llm logs {match['name']})" if match else first
    return message


def shares_line(shares: dict[str, dict[str, float]]) -> str:
    """``engine: alice 62% · bob 38%`` per shared engine (its tokens by user)."""
    return "; ".join(f"{engine}: " + " · ".join(f"{u} {f:.0%}" for u, f in sorted(by.items(), key=lambda x: -x[1]))
                     for engine, by in sorted(shares.items()))


def usage_table(report: dict) -> Table:
    """``%llm usage``: rows by day, user and engine; each engine's share by user; the caller's limits."""
    rows = [[r["day"], r["user"], r["engine"], r["requests"], f"{r['prompt_tokens']:,}",
             f"{r['completion_tokens']:,}", f"{r['queued_s']:.1f}"] for r in report["rows"]]
    limits = report.get("limits") or {}
    daily = limits.get("tokens_per_day")
    lines = [f"share of work by user: {shares_line(report['shares'])}"] if report.get("shares") else []
    lines.append(f"{report['user']}: {report['tokens_today']:,} tokens today (UTC)"
                 + (f" of {daily:,} a day" if daily is not None else ", no daily limit")
                 + (f"; at most {limits['concurrent']} requests at once" if limits.get("concurrent") else "")
                 + (f"; own engines up to {limits['gpu_mib']:,} MiB of GPU memory" if limits.get("gpu_mib") else ""))
    who = "everyone's" if report.get("admin") else "your"
    span = "today" if report["days"] == 1 else f"the last {report['days']} days"
    return Table(f"sage_nb: {who} use of the shared engines, {span}",
                 ["day", "user", "engine", "requests", "prompt tokens", "completion tokens", "queued s"], rows,
                 empty="no requests to shared engines", footer="\n".join(lines))


def _fmt(value, spec: str = "g", suffix: str = "") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def top_table(report: dict) -> Table:
    """``%llm top``: each engine's requests running and waiting, KV cache in use, token rates and latency
    over the window, as its own ``/metrics`` say (an engine with none says why)."""
    rows, notes = [], []
    for r in report["engines"]:
        name = r["name"] + (" (shared)" if r.get("shared") else "")
        if r["status"] != "ok":
            rows.append([name, r["state"], "", "", "", "", "", "", ""])
            notes.append(f"{r['name']}: {r['reason']}")
            continue
        rows.append([name, r["state"], _fmt(r["running"], ".0f"), _fmt(r["waiting"], ".0f"),
                     _fmt(r["kv_cache_pct"], ".1f", "%"), _fmt(r["prompt_tps"], ".0f"),
                     _fmt(r["generation_tps"], ".0f"),
                     "" if r["ttft_p50_ms"] is None else f"{r['ttft_p50_ms']:.0f} / {r['ttft_p95_ms']:.0f}",
                     "" if r["itl_p50_ms"] is None else f"{r['itl_p50_ms']:.1f} / {r['itl_p95_ms']:.1f}"])
    if not report.get("collecting"):
        notes.append("metrics collection is off (metrics_interval = 0)")
    return Table(f"sage_nb top: the last {span(report['window_s'])}, read every {report['interval_s']:g} s",
                 ["engine", "state", "running", "waiting", "KV cache", "prompt tok/s", "gen tok/s",
                  "TTFT p50/p95 ms", "ITL p50/p95 ms"], rows, empty="no engines", footer="\n".join(notes) or None)
