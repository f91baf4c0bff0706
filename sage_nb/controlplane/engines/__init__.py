"""Engine processes and their lifecycle: the ``supervisor`` (the one owner of engine processes),
launching and killing process groups (``process``), HTTP and work ``probes``, finding running
vLLM servers (``scan``) and matching them to records after a restart (``reconcile``), keep-alive,
sleep and unload (``idle``), waking (``waking``), kernel-scoped engines (``scope``) and the
one-line cause of a failure (``diagnosis``).

No re-exports: import the module you need (``from sage_nb.controlplane.engines.supervisor import Supervisor``).
"""
