"""What the control plane persists: the user's SQLite registry of engines (``registry``), the
machine-wide GPU ledger shared by every user of the box (``ledger``), and port leases (``ports``).

No re-exports: import the module you need (``from sage_nb.controlplane.store.registry import Engine``).
"""
