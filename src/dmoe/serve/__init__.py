"""The HTTP server: OpenAI-compatible API, llama-server's /lora-adapters, admin, metrics."""
