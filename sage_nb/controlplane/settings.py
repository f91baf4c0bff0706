"""Settings of a control plane, from keyword arguments and ``SAGE_NB_*`` environment variables."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BadRequest


def default_state_dir() -> Path:
    """``$SAGE_NB_STATE_DIR``, else ``sage_nb/`` in the user's Jupyter data dir."""
    if os.environ.get("SAGE_NB_STATE_DIR"):
        return Path(os.environ["SAGE_NB_STATE_DIR"]).expanduser()
    if os.environ.get("JUPYTER_DATA_DIR"):
        return Path(os.environ["JUPYTER_DATA_DIR"]).expanduser() / "sage_nb"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Jupyter" / "sage_nb"
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "jupyter" / "sage_nb"


def parse_fake_gpus(value: str | list | None) -> list[dict] | None:
    """Parse a fake GPU inventory: a JSON list (or a path to a JSON file) of
    ``{"name", "total_mib", "used_mib", "uuid"?}``. ``None``/empty means "use NVML"."""
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
        if not isinstance(dev, dict):
            raise BadRequest(f"fake GPU {i}: expected an object, got {type(dev).__name__}")
        try:
            total, used = int(dev["total_mib"]), int(dev.get("used_mib", 0))
        except KeyError:
            raise BadRequest(f"fake GPU {i}: 'total_mib' is required") from None
        except (TypeError, ValueError):
            raise BadRequest(f"fake GPU {i}: total_mib and used_mib must be integers") from None
        if total <= 0 or used < 0 or used > total:
            raise BadRequest(f"fake GPU {i}: need 0 <= used_mib ({used}) <= total_mib ({total})")
        devices.append({
            "name": str(dev.get("name", f"Fake GPU {i}")),
            "total_mib": total,
            "used_mib": used,
            "uuid": str(dev.get("uuid", f"GPU-fake-{i}")),
        })
    return devices


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


@dataclass
class Settings:
    """Everything a :class:`ControlPlane` can be configured with."""

    state_dir: Path = field(default_factory=default_state_dir)
    engine_python: str = field(
        default_factory=lambda: os.environ.get("SAGE_NB_ENGINE_PYTHON") or sys.executable)
    fake_gpus: list[dict] | None = field(
        default_factory=lambda: parse_fake_gpus(os.environ.get("SAGE_NB_FAKE_GPUS")))
    port_range: tuple[int, int] = (18000, 18999)
    startup_timeout: float = field(
        default_factory=lambda: _env_float("SAGE_NB_STARTUP_TIMEOUT", 600.0))
    health_interval: float = 1.0
    health_failures: int = 3
    probe_timeout: float = 2.0
    work_probe_interval: float = 10.0  # a 1-token request to each ready engine this often; 0: never
    work_probe_timeout: float = 30.0  # no answer and no progress meanwhile: one failed probe
    stop_grace: float = 15.0
    cpu_kvcache_gib: int = 1
    engine_env: dict[str, str] = field(default_factory=dict)
    use_nvml: bool = True
    adopt_unrecorded: bool = True  # adopt vLLM servers of this user that sage_nb did not start

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser()
        if isinstance(self.fake_gpus, str):
            self.fake_gpus = parse_fake_gpus(self.fake_gpus)
        elif self.fake_gpus is not None:
            self.fake_gpus = parse_fake_gpus(json.dumps(self.fake_gpus))
        lo, hi = self.port_range
        if not (1024 <= lo <= hi <= 65535):
            raise BadRequest(f"port_range {self.port_range} must lie within 1024..65535")
        if self.startup_timeout <= 0 or self.health_interval <= 0 or self.health_failures < 1:
            raise BadRequest("startup_timeout, health_interval and health_failures must be positive")
        if self.work_probe_interval < 0 or self.work_probe_timeout <= 0:
            raise BadRequest("work_probe_interval must be >= 0 (0: off) and work_probe_timeout positive")

    @property
    def db_path(self) -> Path:
        return self.state_dir / "registry.sqlite3"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"
