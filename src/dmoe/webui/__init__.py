"""``dmoe webui``: datasets, training with a live loss curve, experts, GGUF export and a chat
that shows its routing, in the same process (and on the same engine) as the API.

    dmoe webui --experts examples/experts            # http://127.0.0.1:8082/ui/
    dmoe serve --webui                                # the same pages on the serve port

``routes.py`` (pages and the UI-only ``/ui/api/...`` endpoints, the same-origin check),
``datasets.py`` (upload validation, storage, preview), ``training.py`` (one run at a time in
a child process, queued beyond that), ``forms.py`` (the training form from ``TrainConfig``),
``templates/`` and ``static/`` (Jinja2 pages and one script; nothing from a CDN).
"""

from dmoe.webui.routes import WebUIConfig, mount

__all__ = ["WebUIConfig", "mount"]
