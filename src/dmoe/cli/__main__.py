"""``python -m dmoe.cli`` is the ``dmoe`` command."""

from dmoe.cli import app

app()
