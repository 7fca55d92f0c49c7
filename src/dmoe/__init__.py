"""dmoe: a Dynamic Mixture of Experts over one shared base model.

Domain experts are LoRA adapters; a router picks one per request (or none), and
one copy of the base serves them all.
"""

import os

# dmoe never downloads from a model hub: every model is a local file or directory.
# Set before transformers/huggingface_hub are imported anywhere in the process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"

from dmoe.errors import DmoeError  # noqa: E402 - after the environment is set

__all__ = ["DmoeError", "__version__"]
