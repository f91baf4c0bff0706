"""The Ray layer, used only when ``ray_address`` is set (``ray`` is imported inside functions, never
at import time): the per-node agents and ``ClusterInventory`` (``agents``), an engine's launcher
actor on its node (``raylaunch``), and ``NodeProcesses``, the Supervisor's mechanism for engines
on Ray nodes (``nodeprocs``).

No re-exports: import the module you need (``from sage_nb.controlplane.cluster.agents import ClusterInventory``).
"""
