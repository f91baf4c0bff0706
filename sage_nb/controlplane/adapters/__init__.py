"""LoRA adapters on running engines: their files checked against the engine's model (``check``) and
their one owner (``keeper``)."""
