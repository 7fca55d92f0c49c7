"""LoRA SFT training: ``train(cfg)`` turns a TrainConfig into an expert directory."""

from dmoe.train.trainer import TrainResult, train

__all__ = ["TrainResult", "train"]
