"""Live plots of what the engines do, drawn with bqplot: per engine, prompt and generated tokens/s and
its KV cache in use and waiting requests over time; per GPU, memory over time by owner.

bqplot draws SVG in the browser from arrays it receives as binary buffers, so an update is one message
per mark with the new arrays (``hold_sync``), not an image rendered in the kernel (ipympl) nor a
JSON trace validated by a plotting library's Python side (plotly's FigureWidget). The series come
from the server's metrics collector (:meth:`Client.metrics`); nothing here reads an engine.
"""

from __future__ import annotations

import math

import bqplot as bq
import ipywidgets as w
import numpy as np

COLORS = ["#1565c0", "#2e7d32", "#c62828", "#6a1b9a", "#ef6c00", "#00838f", "#5d4037", "#9e9d24"]
HEIGHT = "160px"


def times(points: list[dict]) -> np.ndarray:
    """Epoch seconds as the datetimes a DateScale takes."""
    return (np.array([p["t"] for p in points], dtype="float64") * 1000).astype("datetime64[ms]")


def column(points: list[dict], key: str) -> np.ndarray:
    return np.array([math.nan if p.get(key) is None else p[key] for p in points], dtype="float64")


def drawable(points: list[dict]) -> list[dict]:
    """A line needs two points (and bqplot squeezes a one-point array to a scalar it refuses)."""
    return points if len(points) >= 2 else []


def _figure(title: str, marks: list, axes: list) -> bq.Figure:
    return bq.Figure(title=title, marks=marks, axes=axes, legend_location="top-left",
                     fig_margin={"top": 30, "bottom": 30, "left": 50, "right": 50},
                     layout=w.Layout(height=HEIGHT, width="100%"), title_style={"font-size": "13px"})


class EnginePlot(w.HBox):
    """One engine: tokens/s (prompt, generated) beside KV cache % and waiting requests."""

    def __init__(self, name: str) -> None:
        self.name = name
        x = bq.DateScale()
        rate, pct, queue = bq.LinearScale(min=0), bq.LinearScale(min=0, max=100), bq.LinearScale(min=0, max=1)
        self.queue_scale = queue
        self.tokens = bq.Lines(x=times([]), y=[[], []], scales={"x": x, "y": rate}, colors=COLORS[:2],
                               labels=["prompt tok/s", "generated tok/s"], display_legend=True)
        self.cache = bq.Lines(x=times([]), y=[], scales={"x": x, "y": pct}, colors=[COLORS[3]],
                              labels=["KV cache %"], display_legend=True)
        self.queue = bq.Lines(x=times([]), y=[], scales={"x": x, "y": queue}, colors=[COLORS[4]],
                              labels=["waiting"], display_legend=True, line_style="dashed")
        axis = bq.Axis(scale=x, num_ticks=4)
        super().__init__([
            _figure(f"{name}: tokens/s", [self.tokens],
                    [axis, bq.Axis(scale=rate, side="left", tick_format="0.0f")]),
            _figure(f"{name}: KV cache and queue", [self.cache, self.queue],
                    [bq.Axis(scale=x, num_ticks=4), bq.Axis(scale=pct, side="left", label="%"),
                     bq.Axis(scale=queue, side="right", tick_format="0.0f")]),
        ], layout=w.Layout(width="100%"))

    def update(self, points: list[dict]) -> None:
        points = drawable(points)
        x = times(points)
        with self.tokens.hold_sync():
            self.tokens.x = x
            self.tokens.y = np.vstack([column(points, "prompt_tps"), column(points, "generation_tps")])
        with self.cache.hold_sync():
            self.cache.x, self.cache.y = x, column(points, "kv_cache_pct")
        waiting = column(points, "waiting")
        self.queue_scale.max = float(max(1.0, np.nanmax(waiting, initial=0.0)))  # an empty queue: 0 of 1, not mid-air
        with self.queue.hold_sync():
            self.queue.x, self.queue.y = x, waiting


class GpuPlot(w.VBox):
    """One GPU's memory over time, stacked by owner (MiB)."""

    def __init__(self, gpu: dict) -> None:
        self.uuid = gpu["uuid"]
        x, y = bq.DateScale(), bq.LinearScale(min=0, max=float(gpu["total_mib"] or 1))
        self.area = bq.Lines(x=times([]), y=[], scales={"x": x, "y": y}, fill="bottom", fill_opacities=[0.8],
                             display_legend=True, stroke_width=1)
        super().__init__([_figure(f"GPU{gpu['index']} {gpu['name']}: memory by owner (MiB)", [self.area],
                                  [bq.Axis(scale=x, num_ticks=4),
                                   bq.Axis(scale=y, side="left", tick_format="0.0f")])])

    def update(self, gpu: dict) -> None:
        points = drawable(gpu["points"])
        owners = sorted({o for p in points for o in p["by"]})
        if owners:
            stacked = np.cumsum([[p["by"].get(o, 0) for p in points] for o in owners], axis=0, dtype="float64")
        else:  # nobody holds memory there (or no reading yet): what is used, as one band
            owners, stacked = ["used"], np.array([[float(p["used_mib"] or 0) for p in points]], dtype="float64")
        with self.area.hold_sync():  # tallest first, each drawn to the bottom: the bands of a stack
            self.area.x = times(points)
            self.area.y = stacked[::-1]
            self.area.labels = owners[::-1]
            self.area.colors = [COLORS[i % len(COLORS)] for i in range(len(owners))][::-1]
            self.area.fill_colors = self.area.colors
            self.area.fill_opacities = [0.8] * len(owners)


class MetricsPlots(w.VBox):
    """Every engine's and GPU's plot, added and removed as engines and GPUs come and go."""

    def __init__(self) -> None:
        self.engines: dict[str, EnginePlot] = {}
        self.gpus: dict[str, GpuPlot] = {}
        self.note = w.HTML()
        super().__init__([self.note])

    def update(self, engines: list[dict] | None, gpus: dict | None) -> None:
        """``engines``: overview rows with ``points`` (:meth:`Client.metrics` with ``points=True``);
        ``gpus``: :meth:`Client.gpu_metrics`; None: not available (the note says so)."""
        notes = []
        shown = {}
        for row in engines or []:
            if row.get("points"):
                plot = self.engines.get(row["name"]) or EnginePlot(row["name"])
                plot.update(row["points"])
                shown[row["name"]] = plot
            elif row.get("status") != "ok":
                notes.append(f"{row['name']}: {row.get('reason')}")
        gpu_plots = {}
        for gpu in (gpus or {}).get("gpus", []):
            plot = self.gpus.get(gpu["uuid"]) or GpuPlot(gpu)
            plot.update(gpu)
            gpu_plots[gpu["uuid"]] = plot
        if engines is None:
            notes.append("no metrics from the server (an older sage_nb?)")
        self.note.value = "<br>".join(f"<span style='color:#757575'>{n}</span>" for n in notes)
        if list(shown.values()) != list(self.engines.values()) or list(gpu_plots.values()) != list(self.gpus.values()):
            self.children = [*shown.values(), *gpu_plots.values(), self.note]
        self.engines, self.gpus = shown, gpu_plots


def kernel_loop():
    """The kernel's running event loop (None outside one: no live refresh, the view is drawn once)."""
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        try:
            return asyncio.get_event_loop()
        except RuntimeError:
            return None


class EngineView(w.VBox):
    """``%llm metrics NAME``: one engine's plots and the window's latencies, refreshed every ``interval``
    s on the kernel's loop (fetched in a worker thread) until closed."""

    def __init__(self, client, name: str, window: float = 600.0, interval: float = 2.0) -> None:
        self.client, self.name, self.window, self.interval = client, name, window, interval
        series = client.metrics(name, window=window)  # an unknown engine fails here, with words
        self.plot = EnginePlot(series["name"])
        self.summary = w.HTML()
        super().__init__([self.plot, self.summary])
        self.show(series)
        loop = kernel_loop()
        self._task = loop.create_task(self._run()) if loop is not None else None

    def show(self, series: dict) -> None:
        self.plot.update(series["points"])
        self.summary.value = summary_html(series)

    async def _run(self) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.show(await loop.run_in_executor(None, lambda: self.client.metrics(self.name, window=self.window)))
            except Exception as e:  # gone, or the server restarting: say so, keep trying
                self.summary.value = f"<span style='color:#c62828'>{type(e).__name__}: {e}</span>"

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        super().close()


def summary_html(series: dict) -> str:
    """The window's figures under an engine's plots."""
    if series["status"] != "ok":
        return f"<span style='color:#757575'>{series['reason']}</span>"
    s = series["summary"]

    def ms(key: str) -> str:
        return "–" if s.get(key) is None else f"{s[key]:.0f}"

    finished = ", ".join(f"{n} {r}" for r, n in sorted((s.get("finished") or {}).items())) or "none"
    hit = "–" if s.get("prefix_hit_rate") is None else f"{s['prefix_hit_rate']:.0%}"
    return (f"last {s['seconds']:.0f} s: TTFT p50 {ms('ttft_p50_ms')} / p95 {ms('ttft_p95_ms')} ms · inter-token "
            f"p50 {ms('itl_p50_ms')} / p95 {ms('itl_p95_ms')} ms · prefix-cache hits {hit} · finished: {finished}")
