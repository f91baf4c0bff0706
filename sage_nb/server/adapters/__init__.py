"""REST for LoRA adapters on running engines (``sage_nb/api/adapters``)."""
