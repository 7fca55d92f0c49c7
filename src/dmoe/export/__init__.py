"""Exports: GGUF adapters and bases for llama.cpp, merged standalone models."""
