"""Quick batched generation with HF ``generate``: the base model, one expert applied, or an
upcycled MoE. The serving engine (per-row adapters in a mixed batch) is ``dmoe.engine``;
this is the simple path of ``dmoe generate``, ``dmoe chat``, ``dmoe moe generate``,
the MCP ``moe_generate`` tool and the in-process hit-rate evals.

    texts = generate_texts(model, tok, chat_prompts(tok, ["Why do cats purr?"]), max_new_tokens=32)
"""

from __future__ import annotations

import torch

from dmoe.base import stop_token_ids
from dmoe.errors import RequestError


def chat_prompts(tokenizer, questions: list[str], system: str | None = None) -> list[str]:
    """Render each question as a one-turn chat with a generation prompt; a tokenizer without
    a chat template gets the questions as they are."""
    if not getattr(tokenizer, "chat_template", None):
        return list(questions)
    out = []
    for q in questions:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, batch_size: int = 16, add_special_tokens: bool = False) -> list[str]:
    """Completions of rendered ``prompts``, in batches with left padding (greedy when temperature is 0)."""
    if max_new_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise RequestError(f"temperature must be >= 0 and top_p in (0, 1]; got {temperature}, {top_p}")
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    results: list[str] = []
    torch.manual_seed(seed)
    model.eval()
    device = next(model.parameters()).device
    sample = temperature > 0
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=sample,
                                 temperature=temperature if sample else None, top_p=top_p if sample else None, top_k=None,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(stop_token_ids(tokenizer)))
            for row in out[:, enc["input_ids"].shape[1]:]:
                results.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
    return results


def answer_questions(model, tokenizer, questions: list[str], **kw) -> list[str]:
    """:func:`generate_texts` over :func:`chat_prompts` (plain text, with BOS, when the
    tokenizer has no chat template)."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    return generate_texts(model, tokenizer, chat_prompts(tokenizer, questions), add_special_tokens=not templated, **kw)
