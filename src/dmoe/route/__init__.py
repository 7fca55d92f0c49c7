"""Routing: pick the expert (or none: the bare base) for each request.

``decision.py`` (modes), ``keyword.py`` (YAML rules baseline), ``encoders.py`` (MiniLM,
base hidden states), ``classifiers.py``, ``prompts.py`` (training prompts), ``router.py``
(train / calibrate / save / load), ``select.py`` (the router a server starts with).
"""

from dmoe.route.decision import NONE, RouteDecision
from dmoe.route.text import RouteError

__all__ = ["NONE", "RouteDecision", "RouteError"]
