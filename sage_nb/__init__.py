"""sage_nb: an LLM control plane inside Jupyter."""

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict]:
    """Where jupyter_server finds the extension (``sage_nb.server.app.SageNBApp``)."""
    from sage_nb.server.app import SageNBApp

    return [{"module": "sage_nb", "app": SageNBApp}]
