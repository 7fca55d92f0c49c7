"""Inference engines behind one protocol (``protocol.Engine``): the torch engine
(``torch_engine``: ``model`` forward, ``adapters`` slots, ``lora_ops`` kernels) and the
llama.cpp engine (``llamacpp``). ``request`` holds what both share about a request;
``runner`` drives either one's step loop on a thread for the async server."""
