"""Thin handlers over the control plane's metrics collector (JSON series) and the Prometheus route.

``GET sage_nb/api/metrics``: every engine's latest figures (the box's shared engines too, from the box
service); ``GET sage_nb/api/metrics/engines/<id or name>``: one engine's series (a shared engine's from
the box service, with its users' requests); ``GET sage_nb/api/metrics/gpus``: each GPU's memory by
owner over time; ``?window=SECONDS`` (default 600); ``&points=true``: the overview with each engine's
points too. ``GET sage_nb/metrics``: sage_nb's own metrics in
Prometheus' text format, behind the server's authentication like the rest of the API.
"""

from __future__ import annotations

from jupyter_server.auth.decorator import authorized
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from tornado import web

from ..handlers import ENGINE_ID, ApiError, SageHandler

DEFAULT_WINDOW = 600.0


class MetricsBase(SageHandler):
    _track_activity = False  # dashboards poll these: they must not keep an idle server alive

    @property
    def collector(self):
        return self.cp.metrics

    def window(self) -> float:
        raw = self.get_query_argument("window", str(DEFAULT_WINDOW))
        try:
            seconds = float(raw)
        except ValueError:
            seconds = float("nan")
        horizon = self.cp.settings.metrics_horizon
        if not 0 < seconds <= horizon:
            raise ApiError(400, f"window must be a number of seconds in (0, {horizon:g}] (the metrics_horizon "
                                f"setting), got {raw!r}")
        return seconds

    def off(self) -> dict:
        return {"collecting": self.collector.running, "interval_s": self.cp.settings.metrics_interval,
                "horizon_s": self.cp.settings.metrics_horizon}


class MetricsHandler(MetricsBase):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        window = self.window()
        points = self.get_query_argument("points", "false").lower() in ("1", "true", "yes")
        engines = await self.call(self.collector.overview, window, points)
        if self.link is not None:
            query = f"window={window:g}" + ("&points=true" if points else "")
            status, reply = await self.link.request("GET", f"sage_nb/api/metrics?{query}")
            if status == 200 and isinstance(reply, dict):
                engines += [{**row, "shared": True} for row in reply.get("engines", [])]
        self.reply({**self.off(), "window_s": window, "engines": engines})


class EngineMetricsHandler(MetricsBase):
    @web.authenticated
    @authorized
    async def get(self, engine_id: str) -> None:
        window = self.window()
        if await self.shared(engine_id):
            return
        series = await self.call(self.collector.engine_series, engine_id, window)
        share = self.settings.get("sage_nb_share")
        if share is not None:  # the box service: each user's part of this shared engine
            series["users"] = await self.call(share.users_of, series["engine_id"], series["name"])
        self.reply({**self.off(), **series})


class GpuMetricsHandler(MetricsBase):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        window = self.window()
        self.reply({**self.off(), **await self.call(self.collector.gpu_series, window)})


class PrometheusHandler(SageHandler):
    """sage_nb's own metrics for Prometheus (``sage_nb/metrics``; scrape it with the server's token): an
    API handler (a 403, not a login redirect, without one) that answers Prometheus' text, not JSON."""

    _track_activity = False

    @web.authenticated
    @authorized
    async def get(self) -> None:
        page = await self.call(generate_latest, self.settings["sage_nb_prometheus"])
        self.finish(page, set_content_type=CONTENT_TYPE_LATEST)


METRICS_HANDLERS = [
    (r"/sage_nb/api/metrics/?", MetricsHandler),
    (r"/sage_nb/api/metrics/gpus/?", GpuMetricsHandler),
    (rf"/sage_nb/api/metrics/engines/{ENGINE_ID}/?", EngineMetricsHandler),
    (r"/sage_nb/metrics/?", PrometheusHandler),
]
