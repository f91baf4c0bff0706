"""sage_nb's control plane: pure Python (no Jupyter, IPython or tornado imports).

``ControlPlane`` starts, lists, stops, prunes and rediscovers vLLM engines over
one SQLite registry shared by every process of the user; its ``Supervisor`` owns
the engine processes and their lifecycle.
"""

from .core import ControlPlane
from .engines.supervisor import Supervisor
from .errors import (
    BadRequest,
    Conflict,
    ControlPlaneError,
    EngineFailed,
    IllegalTransition,
    NoBackend,
    NotFound,
    StateError,
)
from .requests import LaunchRequest
from .settings import Settings
from .state import EngineState, is_routable

__all__ = ["BadRequest", "Conflict", "ControlPlane", "ControlPlaneError", "EngineFailed", "EngineState",
           "IllegalTransition", "LaunchRequest", "NoBackend", "NotFound", "Settings", "StateError",
           "Supervisor", "is_routable"]
