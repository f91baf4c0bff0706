"""sage_nb: an LLM control plane inside Jupyter."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "Dashboard":  # imported on use: ipywidgets stays out of plain ``import sage_nb``
        from sage_nb.kernel.dashboard import Dashboard

        return Dashboard
    raise AttributeError(f"module 'sage_nb' has no attribute {name!r}")


def _jupyter_server_extension_points() -> list[dict]:
    """Where jupyter_server finds the extension (``sage_nb.server.app.SageNBApp``)."""
    from sage_nb.server.app import SageNBApp

    return [{"module": "sage_nb", "app": SageNBApp}]


def load_ipython_extension(ipython) -> None:
    """``%load_ext sage_nb``: registers ``%llm`` / ``%%llm`` (settings: ``%config LLMMagics``)."""
    from sage_nb.kernel.magics import LLMMagics

    magics = LLMMagics(shell=ipython)
    ipython.register_magics(magics)
    if magics not in ipython.configurables:
        ipython.configurables.append(magics)
