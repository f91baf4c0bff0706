"""What the box has and where an engine fits: the GPU inventory (``inventory``: NVML or the fake
one, MIG devices), the devices this server may use (``visible``), a model's memory need
(``sizing``, from disk or the hub's metadata in ``hubmeta``), the host-memory check without GPUs
(``hostmem``), best-fit placement over (node, GPUs) (``placement``) and who holds each GPU's
memory (``attribution``).

No re-exports: import the module you need (``from sage_nb.controlplane.gpus.inventory import GpuInventory``).
"""
