"""llm-server: an OpenAI-compatible inference server for a base model and its LoRA adapters."""
