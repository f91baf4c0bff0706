"""The live dashboard: GPU memory bars, the engine table and actions, in ipywidgets, and the plots of
what each engine and GPU did over the last minutes (:mod:`.plots`).

Refreshed by an asyncio task on the kernel's own loop (ipykernel 7 drops widget
updates made from other threads); data is fetched in a worker thread and widgets
change only when the data changed.
"""

from __future__ import annotations

import asyncio
import html
import json
import os

import ipywidgets as w
import psutil

from sage_nb.controlplane.errors import ControlPlaneError
from sage_nb.controlplane.state import DORMANT, STOPPABLE, EngineState, is_routable

from .client import LOADING, Client, get_client
from .gpubar import by_node, gpu_bar_html, gpu_rows_html, node_label  # noqa: F401 (gpu_bar_html re-exported)
from .plots import MetricsPlots, kernel_loop
from .views import holders, idle_text, one_line, uptime

STATE_COLORS = {EngineState.READY: "#2e7d32", EngineState.STARTING: "#f9a825", EngineState.STOPPING: "#6d4c41",
                EngineState.FAILED: "#c62828", EngineState.STOPPED: "#757575", EngineState.SLEEPING: "#5c6bc0",
                EngineState.WAKING: "#f9a825", EngineState.UNLOADED: "#90a4ae"}


def cpu_html(note: str, host: dict) -> str:
    return (f"<div class='sage-nb-cpu'><b>no NVIDIA GPU</b> — {html.escape(note)}; engines run on CPU.<br>"
            f"CPU {host.get('cpu', 0)}% of {host.get('cores', '?')} cores · RAM "
            f"{host.get('ram_used', 0)} of {host.get('ram_total', 0)} MiB used</div>")


def adapter_list(engine: dict) -> str:
    """The engine's LoRA adapters by name (a failed one marked), ``""`` without."""
    return ", ".join(a["name"] + (" (failed)" if a.get("error") else "") for a in engine.get("adapters") or ())


def adapters_html(engine: dict) -> str:
    names = adapter_list(engine)
    return f"<br><small>LoRA: {html.escape(names)}</small>" if names else ""


class Dashboard(w.VBox):
    """GPUs, engines, actions and plots over the last ``window`` s; ``%llm dashboard`` shows one.
    Refreshes every ``interval`` s."""

    def __init__(self, client: Client | None = None, interval: float = 2.0, autostart: bool = True,
                 window: float = 600.0) -> None:
        self.client = client or get_client()
        self.interval, self.window = interval, window
        self.snapshot: dict = {}
        self.status = w.HTML(layout=w.Layout(min_height="1.2em"))
        self.gpu_box = w.VBox()
        self.engine_box = w.VBox()
        self.logs = w.Output(layout=w.Layout(max_height="20em", overflow="auto"))
        self.pause_button = w.ToggleButton(description="pause", icon="pause", value=False)
        self.pause_button.observe(lambda change: self.pause(change["new"]), "value")
        # the dashboard lists every engine of the user: its prune removes every ended one it shows
        prune = w.Button(description="prune", icon="trash",
                         tooltip="remove every stopped and failed engine listed, whoever started it")
        prune.on_click(lambda _: self._act(self.client.prune))
        self.model = w.Text(placeholder="model id or path", description="model")
        self.kind = w.Dropdown(options=["llm", "embedding"], value="llm", description="kind")
        self.tp = w.BoundedIntText(value=1, min=1, max=64, description="TP GPUs",
                                   tooltip="tensor parallel: GPUs per engine")  # shown where there are GPUs
        start = w.Button(description="start", icon="play", button_style="success")
        start.on_click(lambda _: self._start())
        form = w.HBox([self.model, self.kind, self.tp, start])
        self.plots = MetricsPlots()
        super().__init__([w.HTML("<h4>sage_nb</h4>"), self.gpu_box, self.engine_box,
                          w.HBox([prune, self.pause_button]), form, self.status, self.plots, self.logs])
        self._task: asyncio.Task | None = None
        self._clock: list[tuple[dict, w.HTML, w.HTML]] = []  # each row's engine, uptime and idle cells
        self.refresh()
        if autostart:
            self.start_refresh()

    # ------------------------------------------------------------------ data
    def fetch(self) -> dict:
        """Everything the dashboard shows (blocking: called in a worker thread)."""
        engines = [{**e, "phase": self._phase(e)} if e["state"] in LOADING else e
                   for e in self.client.engines()]  # a starting engine: what its log says it does
        if any(e.get("shared") for e in engines):  # the box's shared engines: who used each today
            try:
                shares = self.client.usage(1)["shares"]
            except Exception:  # an older box service, or none reachable: the rows show no shares
                shares = {}
            engines = [{**e, "share_of_work": shares.get(e["name"], {})} if e.get("shared") else e for e in engines]
        data = {"gpus": self.client.gpus(), "engines": engines, "mode": self.client.mode}
        try:  # what the engines and GPUs did over the window (an older server has no metrics routes)
            data["metrics"] = self.client.metrics(window=self.window, points=True)["engines"]
            data["gpu_metrics"] = self.client.gpu_metrics(self.window) if data["gpus"]["devices"] else None
        except Exception:  # the plots say there are none; the rest of the dashboard stands
            data["metrics"] = data["gpu_metrics"] = None
        if not data["gpus"]["devices"]:
            mem = psutil.virtual_memory()
            data["host"] = {"cpu": round(psutil.cpu_percent(interval=None)), "cores": psutil.cpu_count(),
                            "ram_used": (mem.total - mem.available) // 2**20, "ram_total": mem.total // 2**20}
        return data

    def _phase(self, engine: dict) -> str | None:
        try:
            return self.client.phase(engine)
        except Exception:  # gone meanwhile, log unreadable: the row shows its state alone
            return None

    def refresh(self, data: dict | None = None) -> bool:
        """Update the widgets from ``data`` (fetched now if None); False when nothing shown changed.
        Widgets are rebuilt only when the data changed; the uptime and idle cells, which change with
        the time alone, advance on every refresh."""
        try:
            data = data or self.fetch()
        except Exception as e:
            self.status.value = f"<span style='color:#c62828'>refresh failed: {html.escape(str(e))}</span>"
            return False
        changed = data != self.snapshot
        if data["gpus"] != self.snapshot.get("gpus") or data.get("host") != self.snapshot.get("host"):
            self._show_gpus(data["gpus"], data.get("host"))
        if data["engines"] != self.snapshot.get("engines"):
            self._show_engines(data["engines"])
        if "metrics" in data and (data["metrics"], data["gpu_metrics"]) != (self.snapshot.get("metrics"),
                                                                           self.snapshot.get("gpu_metrics")):
            self.plots.update(data["metrics"], data["gpu_metrics"])
        self.snapshot = data
        return self._tick() or changed

    def _tick(self) -> bool:
        """Set each row's uptime and idle cells to what they are now; True if one changed."""
        changed = False
        for engine, *cells in self._clock:
            for cell, value in zip(cells, (clock_html("uptime", uptime(engine)), clock_html("idle", idle_text(engine))),
                                   strict=True):
                if cell.value != value:
                    cell.value, changed = value, True
        return changed

    def _show_gpus(self, report: dict, host: dict | None) -> None:
        if report["devices"]:
            rows = gpu_rows_html(report)
        else:
            rows = [cpu_html(report.get("error") or "none found", host or {})]
        self.gpu_box.children = [w.HTML(r) for r in rows]
        self.tp.layout.display = None if report["devices"] else "none"  # no GPU: no tensor parallel to ask for
        if not report["devices"]:
            self.tp.value = 1

    def _show_engines(self, engines: list[dict]) -> None:
        header = ["name", "model", "kind", "state", "GPUs", "port", "uptime", "idle", "health", "started by"]
        buttons = [("stop", "stop", lambda e: e["state"] not in STOPPABLE, self.client.stop),
                   ("sleep", "moon-o", lambda e: e["state"] != EngineState.READY, self.client.sleep),
                   ("wake", "sun-o", lambda e: e["state"] not in DORMANT, self._wake),
                   ("logs", "file-text", lambda e: False, None)]
        cells = [w.HTML(f"<b>{h}</b>") for h in header] + [w.HTML("")] * len(buttons)
        self._clock = []
        for e in engines:
            color = STATE_COLORS.get(e["state"], "#000")
            health = health_of(e)
            values = [html.escape(e["name"]), html.escape(e["served_model_name"]) + adapters_html(e), e["kind"],
                      f"<span style='color:{color}'>{e['state']}</span>{phase_html(e)}",
                      ",".join(map(str, e["gpu_ids"])) or "cpu", e["port"]]
            row = [w.HTML(f"<span class='sage-nb-cell'>{v}</span>") for v in values]
            row += [w.HTML(clock_html("uptime", uptime(e))), w.HTML(clock_html("idle", idle_text(e)))]
            row += [w.HTML(f"<span class='sage-nb-cell'>{v}</span>") for v in (html.escape(health), started_by_html(e))]
            self._clock.append((e, row[6], row[7]))
            cells += row
            for name, icon, disabled, action in buttons:
                button = w.Button(description=name, icon=icon, layout=w.Layout(width="auto"), disabled=disabled(e))
                if action is None:
                    button.on_click(lambda _, i=e["id"]: self.show_logs(i))
                else:
                    button.on_click(lambda _, i=e["id"], fn=action: self._act(fn, i))
                cells.append(button)
        if not engines:
            self.engine_box.children = [w.HTML("<i>no engines — start one below or with %llm start</i>")]
            return
        columns = len(header) + len(buttons)
        grid = w.GridBox(cells, layout=w.Layout(grid_template_columns=f"repeat({columns}, auto)",
                                                grid_gap="2px 12px"))
        self.engine_box.children = [grid]

    # ------------------------------------------------------------------ actions
    def _act(self, fn, *args) -> None:
        try:
            result = fn(*args)
            self.status.value = html.escape(f"done: {json.dumps(result)[:200]}")
        except Exception as e:  # one line: a failed engine's cause, not its log tail
            text = one_line(e) if isinstance(e, ControlPlaneError) else str(e).split("\n")[0]
            self.status.value = f"<span style='color:#c62828'>{html.escape(text)}</span>"
        self.refresh()

    def _wake(self, engine_id: str) -> dict:
        return self.client.wake(engine_id, wait=False)  # the refresh shows it become ready

    def _start(self) -> None:
        model = self.model.value.strip()
        if not model:
            self.status.value = "<span style='color:#c62828'>enter a model id or path</span>"
            return
        self._act(lambda: self.client.start(model, self.kind.value, wait=False,
                                            tensor_parallel_size=self.tp.value)["name"])

    def show_logs(self, engine_id: str, lines: int = 60) -> None:
        self.logs.clear_output()
        try:
            text = self.client.logs(engine_id, lines)
        except Exception as e:
            text = str(e)
        self.logs.append_stdout(text or "(empty log)\n")

    # ------------------------------------------------------------------ refresh task
    def start_refresh(self) -> None:
        """Refresh every ``interval`` seconds on the kernel's event loop (no threads touch widgets)."""
        loop = kernel_loop()
        if loop is None:
            return
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            try:
                data = await loop.run_in_executor(None, self.fetch)
            except Exception as e:
                self.status.value = f"<span style='color:#c62828'>refresh failed: {html.escape(str(e))}</span>"
                continue
            self.refresh(data)

    def pause(self, paused: bool = True) -> None:
        """Stop (or resume) the periodic refresh."""
        if paused and self._task is not None:
            self._task.cancel()
            self._task = None
        elif not paused:
            self.start_refresh()
        if self.pause_button.value != paused:
            self.pause_button.value = paused

    def close(self) -> None:
        self.pause(True)
        super().close()

    # ------------------------------------------------------------------ text
    def __repr__(self) -> str:
        data = self.snapshot or {"gpus": {"devices": [], "source": "none"}, "engines": [], "mode": "?"}
        lines = [f"sage_nb dashboard ({data['mode']} mode)"]
        cluster = any(g.get("node") for g in data["gpus"]["devices"])
        for node, group in by_node(data["gpus"]["devices"]):  # on a cluster under a line per node
            if cluster:
                lines.append(f"  {node_label(node, data['gpus'].get('nodes'))}:")
            lines += [gpu_line(g, "    " if cluster else "  ") for g in group]
        if not data["gpus"]["devices"]:
            lines.append(f"  no NVIDIA GPU ({data['gpus'].get('error') or 'none found'}): engines run on CPU")
        for e in data["engines"]:
            idle, up = idle_text(e), uptime(e)
            lines.append(f"  {e['name']:<20} {e['kind']:<9} {e['state']:<8}{phase_text(e)} port {e['port']} "
                         f"gpus {','.join(map(str, e['gpu_ids'])) or 'cpu'} {e['served_model_name']}"
                         f" ({health_of(e)}){f' up {up}' if up else ''}{f' idle: {idle}' if idle else ''}"
                         f"{f' started by {who}' if (who := started_by(e)) else ''}"
                         f"{f' adapters: {names}' if (names := adapter_list(e)) else ''}")
        if not data["engines"]:
            lines.append("  no engines")
        return "\n".join(lines)

    def _repr_mimebundle_(self, **kwargs):
        bundle = super()._repr_mimebundle_(**kwargs)
        if isinstance(bundle, dict):
            bundle["text/plain"] = repr(self)
        return bundle


def clock_html(what: str, text: str) -> str:
    """An engine's ``uptime`` or ``idle`` cell (``sage-nb-uptime``, ``sage-nb-idle``)."""
    return f"<span class='sage-nb-cell sage-nb-{what}'>{html.escape(text)}</span>"


def gpu_line(g: dict, indent: str) -> str:
    """One GPU's line of the dashboard's text."""
    return (f"{indent}GPU{g['index']} {g['name']}: used {g['used_mib']} / booked {g['booked_mib']} / "
            f"free {g['free_mib']} of {g['total_mib']} MiB"
            f"{f'; held by (MiB): {held}' if (held := holders(g.get('parts'))) else ''}")


def phase_text(engine: dict) -> str:
    """`` (downloading weights: model-00001-of-00004.safetensors)`` for a loading engine, else ""."""
    return f" ({engine['phase']})" if engine.get("phase") and engine["phase"] != engine["state"] else ""


def phase_html(engine: dict) -> str:
    text = phase_text(engine)
    return f"<br><small>{html.escape(text.strip()[1:-1])}</small>" if text else ""


def started_by(engine: dict) -> str:
    """Which notebook (its file name) or kernel started the engine, and whether it is tied to that
    kernel: ``analysis.ipynb (kernel-scoped)``; ``shared by alice`` for the box service's shared engines;
    "" for engines started otherwise (REST, older servers)."""
    if engine.get("shared"):
        return f"shared by {engine.get('publisher') or '?'}"
    who = os.path.basename(engine.get("notebook") or "")
    if not who and engine.get("kernel_id"):
        who = f"kernel {engine['kernel_id'][:8]}"
    scoped = engine.get("scope") == "kernel"
    return f"{who} (kernel-scoped)".strip() if scoped else who


def started_by_html(engine: dict) -> str:
    text = started_by(engine)
    tip = engine.get("notebook") or engine.get("kernel_id") or ""
    if engine.get("shared"):
        tip = "a shared engine of the box service: every user of the box can use it"
    elif engine.get("scope") == "kernel":
        tip += " — stopped when that kernel shuts down"
    shares = engine.get("share_of_work")
    work = ("<br><small title='share of its tokens today (UTC), by user'>today: "
            + html.escape(" · ".join(f"{u} {f:.0%}" for u, f in sorted(shares.items(), key=lambda x: -x[1])))
            + "</small>") if shares else ""
    return f"<span title='{html.escape(tip, quote=True)}'>{html.escape(text)}</span>{work}" if text else ""


def health_of(engine: dict) -> str:
    """``ok``, the failed probes of a ready engine that is not routed to, or the first line of its error."""
    if is_routable(engine):
        return "ok"
    if engine["state"] == EngineState.READY:
        return f"unhealthy: {engine.get('health_failures') or 0} failed probe(s), not routed to"
    return (engine.get("error") or "").split("\n")[0][:60]
