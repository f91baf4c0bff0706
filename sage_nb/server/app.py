"""The jupyter-server extension: hosts the control plane, its REST API and the gateway."""

from __future__ import annotations

import asyncio
import json
import logging

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Dict, Float, Int, Tuple, Unicode, default

from sage_nb.controlplane import ControlPlane, ControlPlaneError, Settings
from sage_nb.controlplane.router import Router
from sage_nb.controlplane.settings import default_state_dir

from .gateway import GATEWAY_HANDLERS, Watchdog, make_http_clients
from .handlers import REST_HANDLERS, NoRouteHandler


class SageNBApp(ExtensionApp):
    """sage_nb's server extension (configure as ``c.SageNBApp.<trait>``)."""

    name = "sage_nb"
    load_other_extensions = True

    state_dir = Unicode(help="Where the shared registry and engine logs live "
                             "(default: $SAGE_NB_STATE_DIR or <jupyter data dir>/sage_nb).").tag(config=True)
    engine_python = Unicode("", help="Python that runs vLLM (default: this one).").tag(config=True)
    fake_gpus = Unicode("", help="A fake GPU inventory: JSON list (or path to one) of "
                                 "{name, total_mib, used_mib, uuid}; empty means NVML.").tag(config=True)
    engine_env = Dict(help="Extra environment variables for engine processes.").tag(config=True)
    port_range = Tuple(Int(), Int(), default_value=(18000, 18999), help="Ports leased to engines.").tag(
        config=True)
    health_interval = Float(1.0, help="Seconds between health probes of each engine.").tag(config=True)
    health_failures = Int(3, help="Failed probes in a row after which an engine is failed.").tag(config=True)
    work_probe_interval = Float(10.0, help="Seconds between work probes (a 1-token request) of each ready "
                                           "engine, which catch an engine that answers /health but "
                                           "completes nothing; 0 turns them off.").tag(config=True)
    work_probe_timeout = Float(30.0, help="Seconds a work probe may take before it counts as a failed "
                                          "probe (unless the engine made progress meanwhile).").tag(config=True)
    startup_timeout = Float(600.0, help="Seconds an engine may take to become ready.").tag(config=True)
    request_timeout = Float(600.0, help="Seconds the gateway waits for an engine's answer.").tag(config=True)
    adopt_unrecorded = Bool(True, help="Adopt vLLM servers of this user that sage_nb did not start "
                                       "(found by their command line at discovery).").tag(config=True)
    stop_engines_on_shutdown = Bool(
        False, help="Stop every engine when the server stops (default: they keep running and "
                    "are re-attached at the next start).").tag(config=True)

    @default("state_dir")
    def _default_state_dir(self) -> str:
        return str(default_state_dir())

    def control_plane_settings(self) -> Settings:
        kwargs = {"state_dir": self.state_dir or str(default_state_dir()), "engine_env": dict(self.engine_env),
                  "port_range": tuple(self.port_range), "health_interval": self.health_interval,
                  "health_failures": self.health_failures, "startup_timeout": self.startup_timeout,
                  "adopt_unrecorded": self.adopt_unrecorded, "work_probe_interval": self.work_probe_interval,
                  "work_probe_timeout": self.work_probe_timeout}
        if self.engine_python:
            kwargs["engine_python"] = self.engine_python
        if self.fake_gpus:
            kwargs["fake_gpus"] = self.fake_gpus
        return Settings(**kwargs)

    def initialize_settings(self) -> None:
        try:
            cp = ControlPlane(self.control_plane_settings())
        except ControlPlaneError as e:
            raise SystemExit(f"sage_nb: bad configuration: {e.message}") from None
        self.control_plane = cp
        router = Router(cp.registry)
        self.watchdog = Watchdog(router)
        self.settings.update({
            "sage_nb_control_plane": cp,
            "sage_nb_router": router,
            "sage_nb_watchdog": self.watchdog,
            **make_http_clients(),
            "sage_nb_request_timeout": self.request_timeout,
        })
        self.discovery: asyncio.Future | None = None
        for logger in {self.log, self.serverapp.log, logging.getLogger("tornado")}:
            drop_unseen_records(logger)

    async def _start_jupyter_server_extension(self, serverapp) -> None:
        """Discovery runs off the event loop as soon as the server's loop runs."""
        self.discovery = asyncio.get_running_loop().run_in_executor(None, self.control_plane.discover)
        asyncio.ensure_future(self._report_discovery())

    async def _report_discovery(self) -> None:
        try:
            report = await self.discovery
        except Exception:
            self.log.exception("sage_nb: discovery failed")
            return
        self.log.info("sage_nb: registry %s; discovery %s", self.control_plane.settings.db_path,
                      json.dumps({k: len(v) for k, v in report.items()}))
        if report["orphans"]:
            self.log.warning("sage_nb: orphaned vLLM processes hold resources: %s", report["orphans"])

    def initialize_handlers(self) -> None:
        self.handlers.extend(REST_HANDLERS + GATEWAY_HANDLERS + [(r"/sage_nb/.*", NoRouteHandler)])

    async def stop_extension(self) -> None:
        if getattr(self, "watchdog", None) is not None:
            self.watchdog.stop()
        cp = getattr(self, "control_plane", None)
        if cp is None:
            return
        if self.stop_engines_on_shutdown:
            loop = asyncio.get_running_loop()
            for engine in cp.engines():
                if engine["state"] in ("starting", "ready"):
                    await loop.run_in_executor(None, cp.stop_engine, engine["id"])
        cp.close()


def drop_unseen_records(logger: logging.Logger) -> None:
    """Raise ``logger``'s level to the lowest level its handlers emit.

    Jupyter's loggers stay at DEBUG and let their handlers filter, so every request builds
    (and throws away) several debug records — about a tenth of the gateway's time per call.
    Nothing that any handler would show is dropped: with ``--debug`` the level stays DEBUG.
    """
    levels, node = [], logger
    while node is not None:
        levels += [h.level for h in node.handlers]
        node = node.parent if node.propagate else None
    if levels and min(levels) > logger.getEffectiveLevel():
        logger.setLevel(min(levels))
