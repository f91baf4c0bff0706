"""The GPU doctor (``python -m sage_nb.doctor --gpu``, ``%llm doctor --gpu``): what NVML, torch and vLLM say
about this machine's GPUs next to what sage_nb makes of them (``report``, read-only; ``nvml``, the driver's
versions; ``probe``, torch and vLLM as the engine's Python sees them; ``render``, the tables), and the
launch check, a stand-in CUDA engine through the real Supervisor, placement and ledger (``launch``).

Imports the vocabulary, ``store/``, ``gpus/`` and ``engines/``; the facade is handed in, never imported.
"""
