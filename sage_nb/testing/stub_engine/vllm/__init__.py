"""The stub engine's ``vllm`` package: only ``vllm.entrypoints.openai.api_server`` exists."""
