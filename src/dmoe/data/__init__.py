"""Datasets: formats (Alpaca, ShareGPT/OpenAI), the dataset_info.json registry,
chat-template tokenisation with prompt masking, and the example-data generator."""

from dmoe.data.formats import Conversation, DatasetError
from dmoe.data.registry import DatasetAttr, load_conversations, load_dataset_info

__all__ = ["Conversation", "DatasetAttr", "DatasetError", "load_conversations", "load_dataset_info"]
