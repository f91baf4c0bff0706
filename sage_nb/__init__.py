"""sage_nb: an LLM control plane inside Jupyter."""

__version__ = "0.1.0"
