"""Quick batched generation with the base model or one expert applied (HF generate).

The serving engine (per-row adapters in a mixed batch) is ``dmoe.engine``; this is
the simple path used by ``dmoe generate``/``dmoe chat`` and the demo.
"""

from __future__ import annotations

import torch


def chat_prompts(tokenizer, questions: list[str], system: str | None = None) -> list[str]:
    """Render each question as a one-turn chat with a generation prompt."""
    out = []
    for q in questions:
        msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        out.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return out


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, batch_size: int = 16) -> list[str]:
    """Completions of rendered ``prompts`` (greedy when temperature is 0)."""
    tokenizer.padding_side = "left"
    results: list[str] = []
    torch.manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = model.generate(**enc, **kwargs)
        for row in out[:, enc["input_ids"].shape[1]:]:
            results.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return results
