"""Settings of a control plane. Each setting is declared once, here: its default, its help and its
``SAGE_NB_*`` environment variable. Keyword arguments win over the environment, which wins over the
default; the server's ``c.SageNBApp`` traits are derived from these declarations."""

from __future__ import annotations

import copy
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import validation
from .errors import BadRequest
from .gpus.visible import parse_gpus

ENV_PREFIX = "SAGE_NB_"


def default_state_dir() -> Path:
    """``sage_nb/`` in the user's Jupyter data dir (``$JUPYTER_DATA_DIR`` is honoured)."""
    if os.environ.get("JUPYTER_DATA_DIR"):
        return Path(os.environ["JUPYTER_DATA_DIR"]).expanduser() / "sage_nb"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Jupyter" / "sage_nb"
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "jupyter" / "sage_nb"


def parse_fake_gpus(value: str | list | None) -> list[dict] | None:
    """Parse a fake GPU inventory: a JSON list (or a path to a JSON file) of
    ``{"name", "total_mib", "used_mib", "uuid"?, "processes"?, "mig"?, "node"?}``; a GPU in MIG mode has
    ``"mig": [{"name", "total_mib", "used_mib", "uuid"?, "processes"?}, ...]``, its MIG devices
    (``[]``: MIG mode without devices); ``"node"`` names the node the GPU is on (its MIG devices too;
    absent: this machine). ``None``/empty means "use NVML"."""
    if value is None or value == "":
        return None
    raw = value
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith(("[", "{")):
            try:
                text = Path(text).expanduser().read_text()
            except OSError as e:
                raise BadRequest(f"fake GPU inventory: cannot read {value!r}: {e}") from None
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRequest(f"fake GPU inventory is not valid JSON: {e}") from None
    if not isinstance(raw, list):
        raise BadRequest("fake GPU inventory must be a JSON list of devices")
    devices = []
    for i, dev in enumerate(raw):
        device = _fake_device(dev, f"fake GPU {i}", f"Fake GPU {i}", f"GPU-fake-{i}")
        slices = dev.get("mig")
        if slices is not None:
            if not isinstance(slices, list):
                raise BadRequest(f"fake GPU {i}: mig must be a list of MIG devices")
            device["mig"] = [_fake_device(s, f"fake GPU {i} MIG device {k}", f"{device['name']} MIG slice {k}",
                                          f"MIG-fake-{i}-{k}") for k, s in enumerate(slices)]
        node = dev.get("node")
        if node is not None:
            if not isinstance(node, str) or not node.strip():
                raise BadRequest(f"fake GPU {i}: node must be a non-empty string (a node id)")
            device["node"] = node
        devices.append(device)
    return devices


def _fake_device(dev, where: str, name: str, uuid: str) -> dict:
    if not isinstance(dev, dict):
        raise BadRequest(f"{where}: expected an object, got {type(dev).__name__}")
    try:
        total, used = int(dev["total_mib"]), int(dev.get("used_mib", 0))
    except KeyError:
        raise BadRequest(f"{where}: 'total_mib' is required") from None
    except (TypeError, ValueError):
        raise BadRequest(f"{where}: total_mib and used_mib must be integers") from None
    if total <= 0 or used < 0 or used > total:
        raise BadRequest(f"{where}: need 0 <= used_mib ({used}) <= total_mib ({total})")
    processes = dev.get("processes") or []
    if not isinstance(processes, list) or not all(
            isinstance(p, dict) and isinstance(p.get("pid"), int) and isinstance(p.get("used_mib"), int)
            for p in processes):
        raise BadRequest(f"{where}: processes must be a list of {{pid, used_mib}} (integers)")
    return {"name": str(dev.get("name", name)), "total_mib": total, "used_mib": used,
            "uuid": str(dev.get("uuid", uuid)),
            "processes": [{"pid": p["pid"], "used_mib": p["used_mib"]} for p in processes]}


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
        raise ValueError(f"not a boolean: {text!r}")
    return value in ("1", "true", "yes", "on")


def _port_range(text: str) -> tuple[int, int]:
    lo, _, hi = text.replace(",", "-").partition("-")
    return int(lo), int(hi)


class GpuList(list):
    """The type of the ``gpus`` setting: GPU indices and UUIDs (see :func:`.gpus.visible.parse_gpus`)."""


# how a value of each declared type is read from its environment variable
PARSE_ENV: dict[type, Callable[[str], object]] = {
    float: float, int: int, bool: _bool, str: str, Path: Path, dict: json.loads,
    tuple: _port_range, list: parse_fake_gpus, GpuList: parse_gpus}


UNSET = type("Unset", (), {"__repr__": lambda self: "UNSET"})()  # a setting nobody passed


def setting(default, help: str, type_: type | None = None):
    """Declare a setting: ``default`` (a value, or a callable giving one), its help, and the type
    its ``SAGE_NB_<NAME>`` environment variable is read as (default: the default's type)."""
    kind = type_ or type(default)

    def initial(name: str):
        raw = os.environ.get(ENV_PREFIX + name.upper())
        if raw:
            try:
                return PARSE_ENV[kind](raw)
            except (ValueError, TypeError) as e:
                raise BadRequest(f"{ENV_PREFIX + name.upper()}={raw!r}: {e}") from None
        return default() if callable(default) else copy.copy(default)

    return field(default=UNSET, metadata={"help": help, "type": kind, "initial": initial,
                                          "default": default})


@dataclass
class Settings:
    """Everything a :class:`ControlPlane` can be configured with (see each field's help)."""

    state_dir: Path = setting(default_state_dir, "Where the shared registry and engine logs live "
                              "(default: <jupyter data dir>/sage_nb).", Path)
    engine_python: str = setting(lambda: sys.executable, "The Python that runs vLLM "
                                 "(default: this one).", str)
    fake_gpus: list[dict] | None = setting(None, "A fake GPU inventory: a JSON list (or a path to "
                                           "one) of {name, total_mib, used_mib, uuid, processes: [{pid, used_mib}]}; "
                                           "a GPU in MIG mode adds mig: [{name, total_mib, used_mib, uuid, "
                                           "processes}], its MIG devices; node: the id of the node a GPU is on "
                                           "(a cluster; indices stay global, in list order); empty: NVML.", list)
    gpus: list[int | str] | None = setting(None, "The GPU devices this server may place engines on, within "
                                           "those its own CUDA_VISIBLE_DEVICES gives it: indices as sage_nb "
                                           "lists them (a GPU's NVML index) and GPU-/MIG- UUIDs, e.g. "
                                           "[0, 'GPU-8932f937'] or '0,2'; empty: all of them.", GpuList)
    port_range: tuple[int, int] = setting((18000, 18999), "The ports leased to engines (lo, hi).")
    startup_timeout: float = setting(600.0, "Seconds an engine may take to become ready.")
    health_interval: float = setting(1.0, "Seconds between health probes of each engine.")
    health_failures: int = setting(3, "Failed probes in a row after which an engine is failed.")
    probe_timeout: float = setting(2.0, "Seconds a health or readiness probe may take.")
    work_probe_interval: float = setting(10.0, "Seconds between work probes (a 1-token request) of "
                                         "each ready engine, which catch an engine that answers "
                                         "/health but completes nothing; 0 turns them off.")
    work_probe_timeout: float = setting(30.0, "Seconds a work probe may take before it counts as a "
                                        "failed probe (unless the engine made progress meanwhile).")
    stop_grace: float = setting(15.0, "Seconds a stopping engine gets after TERM before KILL.")
    cpu_kvcache_gib: int = setting(1, "KV cache of CPU engines in GiB (VLLM_CPU_KVCACHE_SPACE).")
    engine_env: dict[str, str] = setting(dict, "Extra environment variables for engine processes.", dict)
    use_nvml: bool = setting(True, "Read GPUs through NVML (off: no GPUs unless fake_gpus is set).")
    keep_alive: float | None = setting(None, "How long an engine may go without a request before it "
                                       "gives its memory back (sleeping or unloaded): seconds or a "
                                       "duration such as '10m'; -1 or empty: forever. Per engine: "
                                       "--keep-alive.", str)
    idle_action: str = setting("auto", "What an idle engine does: 'sleep' (vLLM's sleep mode, GPU "
                               "engines only), 'unload' (its processes stop, the record stays), or "
                               "'auto' (sleep where it can and host RAM takes the weights, else unload).")
    sleep_mode: str = setting("auto", "Launch GPU engines with vLLM's sleep mode so idle ones can "
                              "sleep: 'auto' (on real NVIDIA GPUs when idle_action allows sleeping), "
                              "'on' (also under a fake inventory), 'off'.")
    sleep_residual_mib: int = setting(1536, "GPU memory a sleeping engine keeps booked per GPU (its "
                                      "CUDA context and allocator pools).")
    wake_timeout: float = setting(0.0, "Seconds a request waits for an idle engine to wake "
                                  "(0: the startup timeout).")
    make_room: bool = setting(False, "A start or wake that finds no GPU room first puts the least-"
                              "recently-used idle engines with a keep-alive to sleep (or unloads "
                              "them), one by one, and says which.")
    shared_ledger: Path | None = setting(None, "A machine-wide GPU ledger every user of the box shares "
                                         "(a directory on local disk that an admin set up with "
                                         "`python -m sage_nb.admin init-shared DIR --group GROUP`); "
                                         "empty: this user's bookings only.", Path)
    ray_address: str | None = setting(None, "A Ray cluster to place engines on, across its nodes "
                                      "('auto', or the head's host:port; needs the ray extra); empty: "
                                      "this machine only, and ray is never imported.", str)
    box_service: str | None = setting(None, "The box service of this machine (its URL, e.g. "
                                      "http://127.0.0.1:8765/services/llm/): its shared engines are listed and "
                                      "used beside this user's own; empty: private engines only.", str)
    box_key_file: Path | None = setting(None, "The key an admin issued this user for a standalone box service "
                                        "(python -m sage_nb.admin add-key); empty: $JUPYTERHUB_API_TOKEN under "
                                        "JupyterHub, else /etc/sage_nb/keys/<user> when it exists.", Path)
    metrics_interval: float = setting(2.0, "Seconds between readings of each ready engine's /metrics and the "
                                      "GPUs' memory, kept for the dashboard's plots, %llm top and the metrics "
                                      "routes; 0 turns collection off.")
    metrics_horizon: float = setting(900.0, "Seconds of metrics history kept in memory (15 minutes).")
    adopt_unrecorded: bool = setting(True, "Adopt vLLM servers of this user that sage_nb did not "
                                     "start (found by their command line at discovery).")

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) is UNSET:
                setattr(self, f.name, f.metadata["initial"](f.name))
        self.state_dir = Path(self.state_dir).expanduser()
        if isinstance(self.fake_gpus, str):
            self.fake_gpus = parse_fake_gpus(self.fake_gpus)
        elif self.fake_gpus is not None:
            self.fake_gpus = parse_fake_gpus(json.dumps(self.fake_gpus))
        self.gpus = parse_gpus(self.gpus)
        self.keep_alive = validation.duration("keep_alive", self.keep_alive or None)
        self.shared_ledger = Path(self.shared_ledger).expanduser() if self.shared_ledger else None
        self.box_key_file = Path(self.box_key_file).expanduser() if self.box_key_file else None
        self.box_service = validation.service_url(self.box_service) if self.box_service else None
        self._check()

    def _check(self) -> None:
        lo, hi = self.port_range
        if not (1024 <= lo <= hi <= 65535):
            raise BadRequest(f"port_range {self.port_range} must lie within 1024..65535")
        for name in ("startup_timeout", "health_interval", "probe_timeout", "work_probe_timeout",
                     "health_failures", "cpu_kvcache_gib"):
            if getattr(self, name) <= 0:
                raise BadRequest(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.work_probe_interval < 0 or self.stop_grace < 0 or self.wake_timeout < 0:
            raise BadRequest("work_probe_interval (0: off), stop_grace and wake_timeout must be >= 0")
        if self.ray_address is not None and self.ray_address != "auto" and ":" not in self.ray_address:
            raise BadRequest(f"ray_address must be 'auto' or the head's host:port, got {self.ray_address!r}")
        if self.metrics_interval < 0 or self.metrics_horizon <= 0:
            raise BadRequest(f"metrics_interval (0: off) must be >= 0 and metrics_horizon positive, got "
                             f"{self.metrics_interval!r} and {self.metrics_horizon!r}")
        if self.sleep_residual_mib < 0:
            raise BadRequest(f"sleep_residual_mib must be >= 0, got {self.sleep_residual_mib!r}")
        for name, allowed in (("idle_action", ("auto", "sleep", "unload")), ("sleep_mode", ("auto", "on", "off"))):
            if getattr(self, name) not in allowed:
                raise BadRequest(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")

    @property
    def effective_wake_timeout(self) -> float:
        """Seconds a wake may take."""
        return self.wake_timeout or self.startup_timeout

    @property
    def db_path(self) -> Path:
        return self.state_dir / "registry.sqlite3"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    def to_model(self) -> dict:
        """The effective settings as JSON (engine_env values are not shown: they may hold secrets)."""
        model = {f.name: getattr(self, f.name) for f in fields(self)}
        model.update(box_key_file=self.box_key_file and str(self.box_key_file))
        model.update(state_dir=str(self.state_dir), db_path=str(self.db_path), log_dir=str(self.log_dir),
                     port_range=list(self.port_range), engine_env=sorted(self.engine_env))
        return model
