"""sage_nb's control plane: pure Python (no Jupyter, IPython or tornado imports).

``ControlPlane`` starts, lists, stops, prunes and rediscovers vLLM engines over
one SQLite registry shared by every process of the user.
"""

from .core import ControlPlane
from .errors import BadRequest, Conflict, ControlPlaneError, EngineFailed, IllegalTransition, NotFound
from .launch import LaunchRequest
from .settings import Settings
from .state import EngineState

__all__ = ["BadRequest", "Conflict", "ControlPlane", "ControlPlaneError", "EngineFailed",
           "EngineState", "IllegalTransition", "LaunchRequest", "NotFound", "Settings"]
