"""Inference engines. ``lora_ops`` holds the batched multi-LoRA op (per-row adapter
index, blends); the serving engine built on it is issue #3's work in progress."""
