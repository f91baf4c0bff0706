"""The jupyter-server extension: hosts the control plane, its REST API and the gateway."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
from collections.abc import Callable
from pathlib import Path

from jupyter_server.extension.application import ExtensionApp
from traitlets import Bool, Dict, Float, HasTraits, Int, List, TraitType, Tuple, Unicode, Union

from sage_nb.controlplane import ControlPlane, ControlPlaneError, Settings
from sage_nb.controlplane.adapters.uploads import AdapterUploads
from sage_nb.controlplane.engines.scope import KernelHost
from sage_nb.controlplane.routing.router import Router
from sage_nb.controlplane.settings import ENV_PREFIX, GpuList

from .adapters.handlers import ADAPTER_HANDLERS
from .box.link import BoxLink
from .box.routes import SHARE_HANDLERS
from .box.service import BoxPolicy, salt_secret
from .box.share import ShareGate
from .doctor.handlers import DOCTOR_HANDLERS
from .gateway import GATEWAY_HANDLERS, Watchdog
from .handlers import REST_HANDLERS, NoRouteHandler
from .metrics.exporter import GatewayStats, registry_for
from .metrics.handlers import METRICS_HANDLERS
from .upstream import Upstream
from .waker import Waker


def gpu_list_trait(**kw) -> TraitType:
    """``c.SageNBApp.gpus = [0, "GPU-8932f937"]`` (or the string ``"0,GPU-8932f937"``)."""
    return Union([List(Union([Int(), Unicode()])), Unicode()], **kw)


TRAIT_TYPES: dict[type, Callable[..., TraitType]] = {float: Float, int: Int, bool: Bool, str: Unicode, Path: Unicode,
                                                     dict: Dict, list: Unicode, GpuList: gpu_list_trait}


def setting_trait(f: dataclasses.Field) -> TraitType:
    """The ``c.SageNBApp`` trait of one control-plane setting. Its value is ``None`` until configured,
    so an unset trait leaves the setting to its environment variable and default."""
    meta = f.metadata
    default = meta["default"]
    shown = "computed" if callable(default) else repr(default)
    help_text = f"{meta['help']} Default: {shown}; environment: {ENV_PREFIX}{f.name.upper()}."
    if meta["type"] is tuple:
        trait = Tuple(Int(), Int(), default_value=None, allow_none=True, help=help_text)
    else:
        trait = TRAIT_TYPES[meta["type"]](default_value=None, allow_none=True, help=help_text)
    return trait.tag(config=True)


# Every control-plane setting as a trait, derived from its one declaration in ``Settings``.
SettingTraits = type("SettingTraits", (HasTraits,),
                     {f.name: setting_trait(f) for f in dataclasses.fields(Settings)})


class SageNBApp(ExtensionApp, SettingTraits):
    """sage_nb's server extension (configure as ``c.SageNBApp.<trait>``; every control-plane setting
    is one, see :class:`sage_nb.controlplane.Settings`)."""

    name = "sage_nb"
    load_other_extensions = True

    request_timeout = Float(600.0, help="Seconds the gateway waits for an engine's answer.").tag(config=True)
    open_tokenizer = Bool(
        False, help="Serve sage_nb/tokenize and sage_nb/detokenize without the Jupyter token, as vLLM "
                    "serves its own (its --api-key guards /v1 only). `vllm bench serve` sends no key "
                    "when it aligns its prompts through them; anyone who can reach the server can "
                    "then tokenize text on its engines and learn their served names.").tag(config=True)
    freeze_gc = Bool(
        True, help="Once the server has started, move every object it holds out of reach of Python's "
                   "full garbage collections (gc.freeze). A full collection of a Jupyter server scans "
                   "some 230,000 long-lived objects and stalls every request and stream for 0.2-0.3 s, "
                   "several times a minute under gateway load.").tag(config=True)
    box_mode = Bool(
        False, help="This server is the box service (python -m sage_nb.service sets it): its engines are "
                    "shared with every user of the box, each request is its caller's (docs/shared-server.md)."
    ).tag(config=True)
    box_publishers = Unicode(
        "", help="On the box service: the group (a JupyterHub group or a Unix group) whose members may publish, "
                 "stop, sleep and read the logs of shared engines, besides admins.").tag(config=True)
    box_user_adapters = Bool(
        True, help="On the box service: users may load their own LoRA adapters onto shared engines (their "
                   "server sends the files; they are kept under the user's name, usable by them and whom they "
                   "share them with). False: publishers only.").tag(config=True)
    share_limits = Unicode(
        "", help="On the box service: the limits file (TOML; default limits.toml in its state folder), re-read "
                 "when it changes: requests at once, tokens per day and GPU memory per user or group, the queue "
                 "limit (docs/shared-server.md).").tag(config=True)
    stop_engines_on_shutdown = Bool(
        False, help="Stop every engine when the server stops (default: they keep running and "
                    "are re-attached at the next start).").tag(config=True)

    def control_plane_settings(self) -> Settings:
        """The control plane's settings: the configured traits; the rest from the environment and
        the defaults."""
        names = [f.name for f in dataclasses.fields(Settings)]
        return Settings(**{name: getattr(self, name) for name in names if getattr(self, name) is not None})

    def initialize_settings(self) -> None:
        try:
            cp = ControlPlane(self.control_plane_settings())
        except ControlPlaneError as e:
            raise SystemExit(f"sage_nb: bad configuration: {e.message}") from None
        self.control_plane = cp
        cp.set_kernel_host(kernel_host(self.serverapp.kernel_manager))
        router = Router(cp.registry, cp.usage)
        self.watchdog = Watchdog(router)
        waker, stats = Waker(cp), GatewayStats()
        self.settings.update({
            "sage_nb_control_plane": cp,
            "sage_nb_router": router,
            "sage_nb_waker": waker,
            "sage_nb_stats": stats,
            "sage_nb_prometheus": registry_for(cp, stats, waker),
            "sage_nb_watchdog": self.watchdog,
            "sage_nb_upstream": Upstream(),
            "sage_nb_request_timeout": self.request_timeout,
            "sage_nb_open_tokenizer": self.open_tokenizer,
        })
        if self.box_mode:
            self.settings["sage_nb_box"] = BoxPolicy(self.box_publishers, salt_secret(cp.settings.state_dir),
                                                     self.box_user_adapters)
            uploads = AdapterUploads(cp.settings.state_dir / "adapters")
            uploads.prune({a["path"] for a in cp.adapters()})  # their engines were stopped while it was down
            self.settings["sage_nb_uploads"] = uploads
            try:
                self.settings["sage_nb_share"] = ShareGate(cp.settings.state_dir, self.share_limits or None,
                                                           cp.registry.ledger)
            except ControlPlaneError as e:
                raise SystemExit(f"sage_nb service: bad limits: {e.message}") from None
        elif cp.settings.box_service:
            self.settings["sage_nb_link"] = BoxLink(cp.settings.box_service, cp.settings.box_key_file)
        cp.start_metrics()  # its own thread: the event loop never waits for an engine's /metrics
        self.discovery: asyncio.Future | None = None
        self.frozen = 0  # objects exempted from garbage collection once the server was up
        for logger in {self.log, self.serverapp.log, logging.getLogger("tornado")}:
            drop_unseen_records(logger)

    async def _start_jupyter_server_extension(self, serverapp) -> None:
        """Discovery runs off the event loop as soon as the server's loop runs."""
        route_first(serverapp.web_app, {h[1] for h in self.handlers})
        if self.settings.get("sage_nb_share") is not None:
            self.settings["sage_nb_share"].start()
        self.discovery = asyncio.get_running_loop().run_in_executor(None, self.control_plane.discover)
        asyncio.ensure_future(self._report_discovery())

    async def _report_discovery(self) -> None:
        try:
            report = await self.discovery
        except Exception:
            self.log.exception("sage_nb: discovery failed")
            return
        finally:
            if self.freeze_gc:  # the server is up by now: what it holds lives as long as it does
                self.frozen = freeze_long_lived()
        self.log.info("sage_nb: registry %s; discovery %s", self.control_plane.settings.db_path,
                      json.dumps({k: len(v) for k, v in report.items()}))
        if report["orphans"]:
            self.log.warning("sage_nb: orphaned vLLM processes hold resources: %s", report["orphans"])

    def initialize_handlers(self) -> None:
        self.handlers.extend(REST_HANDLERS + ADAPTER_HANDLERS + DOCTOR_HANDLERS + SHARE_HANDLERS + METRICS_HANDLERS
                             + GATEWAY_HANDLERS + [(r"/sage_nb/.*", NoRouteHandler)])

    async def stop_extension(self) -> None:
        if getattr(self, "watchdog", None) is not None:
            self.watchdog.stop()
            await self.settings["sage_nb_upstream"].close()
        if self.settings.get("sage_nb_link") is not None:
            await self.settings["sage_nb_link"].close()
        if self.settings.get("sage_nb_share") is not None:
            self.settings["sage_nb_share"].close()
        cp = getattr(self, "control_plane", None)
        if cp is None:
            return
        if self.stop_engines_on_shutdown:
            report = await asyncio.get_running_loop().run_in_executor(None, cp.stop_all)
            self.log.info("sage_nb: stopped %d engine(s) at shutdown%s", len(report["stopped"]),
                          f"; could not stop: {report['failed']}" if report["failed"] else "")
        cp.close()


def kernel_host(kernel_manager) -> KernelHost:
    """The control plane's view of this server's kernels (for engines of scope ``kernel``): which
    kernel ids run, and each one's process where it is local (jupyter_client's LocalProvisioner).
    Called from the control plane's threads: both only read the kernel manager's tables."""

    def pid_of(kernel_id: str) -> int | None:
        try:
            kernel = kernel_manager.get_kernel(kernel_id)
        except KeyError:
            return None
        pid = getattr(getattr(kernel, "provisioner", None), "pid", None)
        return pid if isinstance(pid, int) and not isinstance(pid, bool) else None

    return KernelHost(knows=lambda kernel_id: kernel_id in kernel_manager, pid_of=pid_of, server=True)


def freeze_long_lived() -> int:
    """Collect once, then exempt every surviving object from later collections (``gc.freeze``).
    Returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def route_first(web_app, handler_classes: set[type]) -> None:
    """Put the rule group holding sage_nb's handlers first in the server's router.

    tornado tries each extension's group in the order they were added, and each group's patterns
    one by one: a gateway request used to be matched against every Jupyter and JupyterLab route
    first (6% of the server's time under load). Every sage_nb pattern lies under ``sage_nb/``, so
    going first shadows nothing; any other path falls through to the groups after it.
    """
    rules = web_app.default_router.rules
    for rule in list(rules):
        inner = getattr(rule.target, "rules", None)
        if inner and any(r.target in handler_classes for r in inner):
            rules.remove(rule)
            rules.insert(0, rule)


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
