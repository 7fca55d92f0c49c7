"""Query hygiene shared by every router."""

from __future__ import annotations

from dmoe import DmoeError

MAX_QUERY_CHARS = 4000  # the encoders read at most 256 tokens; longer text only costs tokenising time


class RouteError(DmoeError):
    """A router file is missing, invalid, or made for other experts."""


def clean_query(query) -> tuple[str | None, str]:
    """(text to route, note) or (None, reason to use the base model)."""
    if not isinstance(query, str):
        return None, f"the query is not text ({type(query).__name__}): base model"
    text = query.strip()
    if not text:
        return None, "the query is empty: base model"
    if len(text) > MAX_QUERY_CHARS:
        return text[:MAX_QUERY_CHARS], f"truncated from {len(text)} characters"
    return text, ""
