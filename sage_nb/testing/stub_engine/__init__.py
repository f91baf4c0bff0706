"""A stand-in for vLLM: put this folder on PYTHONPATH, run ``python -m vllm.entrypoints.openai.api_server``."""
