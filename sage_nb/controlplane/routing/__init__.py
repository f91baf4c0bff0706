"""Routing inference requests: which routable engine serves a kind and model (``BackendIndex``),
and the cached index with in-flight balancing the gateway uses (``Router``), in ``router``.

No re-exports: import the module you need (``from sage_nb.controlplane.routing.router import Router``).
"""
