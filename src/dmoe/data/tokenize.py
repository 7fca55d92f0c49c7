"""Conversations to (input_ids, labels) through a chat template, with prompt masking.

Semantics (LlamaFactory's supervised encoding):
    ids, labels = [], []
    for each (prompt_i, answer_i) rendered by the chat template:
        ids    += prompt_i + answer_i
        labels += [IGNORE] * len(prompt_i) + answer_i      # train_on_prompt=False
    labels of earlier answers are IGNORE too when mask_history=True
Truncation to ``cutoff_len`` keeps whole turns first, then splits the remaining budget
between prompt and answer (``infer_seqlen``), cutting each from its end.
"""

from __future__ import annotations

from dataclasses import dataclass

from dmoe.data.formats import Conversation, DatasetError

IGNORE_INDEX = -100

# Named templates for models whose tokenizer carries none, or to override it
# (LlamaFactory's `template:` key). None / "auto" / "default" uses the tokenizer's own.
NAMED_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
        " + m['content'] + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
        "{% elif m['role'] == 'user' %}{{ '### Instruction:\n' + m['content'] + '\n\n' }}"
        "{% else %}{{ '### Response:\n' + m['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
    ),
}
NAMED_TEMPLATES["qwen"] = NAMED_TEMPLATES["chatml"]
AUTO_TEMPLATES = {None, "", "auto", "default"}


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def chat_template_for(tokenizer, template: str | None) -> str:
    """The Jinja chat template to use for ``template`` (a name, or None for the tokenizer's)."""
    if template in AUTO_TEMPLATES:
        if not getattr(tokenizer, "chat_template", None):
            raise DatasetError(
                "the tokenizer has no chat template; set `template:` to one of " + ", ".join(sorted(NAMED_TEMPLATES))
            )
        return tokenizer.chat_template
    if template not in NAMED_TEMPLATES:
        raise DatasetError(f"unknown template {template!r}; expected auto or one of {', '.join(sorted(NAMED_TEMPLATES))}")
    return NAMED_TEMPLATES[template]


def render(tokenizer, messages: list[dict], chat_template: str, add_generation_prompt: bool) -> str:
    """Render messages to text with ``chat_template``."""
    return tokenizer.apply_chat_template(
        messages, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def turn_texts(tokenizer, conv: Conversation, chat_template: str) -> list[tuple[str, str]]:
    """(prompt_text, answer_text) per turn, whose concatenation is the rendered conversation."""
    pieces = []
    done = ""
    for k in range(1, len(conv.turns) + 1):
        with_prompt = render(tokenizer, conv.messages(k, with_last_answer=False), chat_template, True)
        full = render(tokenizer, conv.messages(k), chat_template, False)
        if not with_prompt.startswith(done) or not full.startswith(with_prompt):
            raise DatasetError(f"{conv.source}: the chat template does not render turns as a prefix of the conversation")
        pieces.append((with_prompt[len(done):], full[len(with_prompt):]))
        done = full
    return pieces


def infer_seqlen(source_len: int, target_len: int, cutoff_len: int) -> tuple[int, int]:
    """LlamaFactory's budget split between a prompt and its answer."""
    if target_len * 2 < cutoff_len:
        max_target_len = cutoff_len
    elif source_len * 2 < cutoff_len:
        max_target_len = cutoff_len - source_len
    else:
        max_target_len = int(cutoff_len * (target_len / (source_len + target_len)))
    new_target_len = min(max_target_len, target_len)
    max_source_len = max(cutoff_len - new_target_len, 0)
    new_source_len = min(max_source_len, source_len)
    return new_source_len, new_target_len


def encode(
    tokenizer,
    conv: Conversation,
    *,
    cutoff_len: int,
    chat_template: str,
    train_on_prompt: bool = False,
    mask_history: bool = False,
) -> Encoded:
    """Token ids and labels for one conversation (see module docstring)."""
    ids: list[int] = []
    labels: list[int] = []
    pairs = turn_texts(tokenizer, conv, chat_template)
    # With mask_history only the last answer is learned; LlamaFactory then truncates from the front.
    order = list(reversed(pairs)) if mask_history else pairs
    budget = cutoff_len
    encoded_turns = []
    for turn, (p_text, a_text) in enumerate(order):
        if budget <= 0:
            break
        p = tokenizer.encode(p_text, add_special_tokens=False)
        a = tokenizer.encode(a_text, add_special_tokens=False)
        p_len, a_len = infer_seqlen(len(p), len(a), budget)
        p, a = p[:p_len], a[:a_len]
        budget -= p_len + a_len
        is_learned = (not mask_history) or turn == 0
        p_labels = list(p) if train_on_prompt else [IGNORE_INDEX] * len(p)
        a_labels = list(a) if is_learned else [IGNORE_INDEX] * len(a)
        encoded_turns.append((p + a, p_labels + a_labels))
    if mask_history:
        encoded_turns.reverse()
    for t_ids, t_labels in encoded_turns:
        ids += t_ids
        labels += t_labels
    return Encoded(ids, labels)
