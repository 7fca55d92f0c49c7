"""Constrained decoding: a request's output format as an llguidance grammar, and the
per-request matcher that masks the tokens the grammar does not allow next.

Both engines sample from torch logits in ``sampling.sample_batch``, so one library
(llguidance, the token-mask engine llama.cpp's server also builds in) serves both,
and each row of a mixed batch has its own matcher.

    grammar = response_format_grammar({"type": "json_schema", "json_schema": {"schema": {...}}})
    matcher = new_matcher(tokenizer, n_vocab, grammar)   # one per request
    allowed = allowed_tokens(matcher, n_vocab)           # (V,) bool, before each sample
    matcher.consume_token(tok)                           # after it
"""

from __future__ import annotations

import json
import weakref
from typing import Any

import numpy as np

from dmoe.errors import RequestError

# Compact JSON with Python's separators: no free whitespace, so a model cannot loop on
# blank lines inside an object (a known failure of flexible-whitespace JSON grammars).
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

_tokenizers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _check(grammar: str, what: str) -> str:
    import llguidance

    err = llguidance.LLMatcher.validate_grammar(grammar)
    if err:
        raise RequestError(f"{what}: {err}")
    return grammar


def json_schema_grammar(schema: Any, what: str = "json_schema") -> str:
    """The grammar of JSON documents valid under ``schema`` (a dict); a bad schema is a RequestError."""
    import llguidance

    if not isinstance(schema, dict):
        raise RequestError(f"{what} must be a JSON Schema object, got {type(schema).__name__}")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)  # pyright: ignore[reportArgumentType]
    except ValueError as exc:
        raise RequestError(f"{what}: {exc}") from None
    return _check(grammar, what)


def response_format_grammar(response_format: dict[str, Any] | None) -> str | None:
    """OpenAI's ``response_format``: None for text, else the grammar of its JSON."""
    if not response_format:
        return None
    kind = response_format.get("type", "text")
    extra = sorted(set(response_format) - {"type", "json_schema", "schema"})
    if extra:
        raise RequestError(f"response_format: unknown field{'s' if len(extra) > 1 else ''} {', '.join(extra)}")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_grammar({"type": "object"}, "response_format")
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            # llama-server also takes {"type": "json_schema", "schema": {...}}
            if "schema" in response_format:
                return json_schema_grammar(response_format["schema"], "response_format.schema")
            raise RequestError('response_format: type json_schema needs "json_schema": {"name": ..., "schema": {...}}')
        unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
        if unknown:
            raise RequestError(f"response_format.json_schema: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
        return json_schema_grammar(spec["schema"], "response_format.json_schema.schema")
    raise RequestError(f"response_format: type {kind!r} is not supported; use text, json_object or json_schema")


def gbnf_grammar(gbnf: str) -> str:
    """llama-server's ``grammar`` field: a GBNF grammar (llama.cpp's format), via llguidance's converter."""
    import llguidance
    from llguidance.gbnf_to_lark import gbnf_to_lark

    if not isinstance(gbnf, str) or not gbnf.strip():
        raise RequestError("grammar must be a non-empty GBNF string")
    try:
        lark = gbnf_to_lark(gbnf)
    except Exception as exc:  # the converter raises plain Exceptions with a line number
        raise RequestError(f"grammar: not valid GBNF: {exc}") from None
    return _check(llguidance.LLMatcher.grammar_from_lark(lark), "grammar")


def _ll_tokenizer(tokenizer: Any, n_vocab: int):
    """llguidance's view of the HF tokenizer (about 0.3 s to build): one per tokenizer and vocabulary size."""
    import llguidance.hf

    per = _tokenizers.setdefault(tokenizer, {})
    if n_vocab not in per:
        per[n_vocab] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab)
    return per[n_vocab]


def new_matcher(tokenizer: Any, n_vocab: int, grammar: str | None):
    """A fresh matcher for one request (None when it has no grammar)."""
    if grammar is None:
        return None
    import llguidance

    m = llguidance.LLMatcher(_ll_tokenizer(tokenizer, n_vocab), grammar, log_level=0)
    if m.is_error():
        raise RequestError(f"the output grammar cannot be used: {m.get_error()}")
    return m


def token_bytes(tokenizer: Any, n_vocab: int, tok: int) -> bytes:
    """The exact bytes of one token (a byte-level BPE token may be half a UTF-8 character)."""
    return _ll_tokenizer(tokenizer, n_vocab).decode_bytes([tok])


def allowed_tokens(matcher: Any, n_vocab: int) -> np.ndarray:
    """(n_vocab,) bool: the tokens the grammar allows next. llguidance's mask is 32-bit words,
    token ``32 * w + j`` at bit ``j`` of word ``w``: little-endian words, so byte by byte, low bit first."""
    words = np.frombuffer(bytes(matcher.compute_bitmask()), dtype="<u4")
    return np.unpackbits(words.view(np.uint8), bitorder="little")[:n_vocab].astype(bool)
