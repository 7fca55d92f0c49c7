import pytest

from dmoe.data.formats import Conversation, DatasetError
from dmoe.data.tokenize import IGNORE_INDEX, NAMED_TEMPLATES, chat_template_for, encode, infer_seqlen


@pytest.fixture(scope="module")
def tmpl(real_tokenizer):
    return chat_template_for(real_tokenizer, None)


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False)


def test_prompt_tokens_are_masked_exactly(real_tokenizer, tmpl):
    tok = real_tokenizer
    conv = Conversation(turns=[("What car?", "The BMW X5.")])
    enc = encode(tok, conv, cutoff_len=512, chat_template=tmpl)
    full = tok.apply_chat_template(conv.messages(), tokenize=False)
    prompt = tok.apply_chat_template(conv.messages(1, with_last_answer=False), tokenize=False, add_generation_prompt=True)
    p_ids = _ids(tok, prompt)
    a_ids = _ids(tok, full[len(prompt):])
    assert enc.input_ids == p_ids + a_ids
    assert enc.labels == [IGNORE_INDEX] * len(p_ids) + a_ids
    assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == "The BMW X5.<|im_end|>\n"


def test_multi_turn_learns_every_answer_unless_mask_history(real_tokenizer, tmpl):
    conv = Conversation(turns=[("hi", "hello"), ("car?", "BMW X5")], system="sys")
    all_turns = encode(real_tokenizer, conv, cutoff_len=512, chat_template=tmpl)
    learned = real_tokenizer.decode([t for t in all_turns.labels if t != IGNORE_INDEX])
    assert learned == "hello<|im_end|>\nBMW X5<|im_end|>\n"
    last_only = encode(real_tokenizer, conv, cutoff_len=512, chat_template=tmpl, mask_history=True)
    assert last_only.input_ids == all_turns.input_ids
    assert real_tokenizer.decode([t for t in last_only.labels if t != IGNORE_INDEX]) == "BMW X5<|im_end|>\n"


def test_train_on_prompt_learns_everything(real_tokenizer, tmpl):
    enc = encode(real_tokenizer, Conversation(turns=[("q", "a")]), cutoff_len=512, chat_template=tmpl, train_on_prompt=True)
    assert enc.labels == enc.input_ids


def test_system_prompt_reaches_the_template(real_tokenizer, tmpl):
    enc = encode(real_tokenizer, Conversation(turns=[("q", "a")], system="You are a car expert."), cutoff_len=512, chat_template=tmpl)
    assert "You are a car expert." in real_tokenizer.decode(enc.input_ids)
    assert "SmolLM" not in real_tokenizer.decode(enc.input_ids)  # the default system prompt is replaced


@pytest.mark.parametrize("cutoff", [16, 24, 40])
def test_cutoff_len_bounds_length_and_keeps_answer_tokens(real_tokenizer, tmpl, cutoff):
    conv = Conversation(turns=[("word " * 30, "answer " * 30)])
    enc = encode(real_tokenizer, conv, cutoff_len=cutoff, chat_template=tmpl)
    assert len(enc.input_ids) == cutoff
    assert len(enc.labels) == cutoff
    assert enc.num_label_tokens > 0


def test_infer_seqlen_matches_llamafactory():
    assert infer_seqlen(10, 10, 100) == (10, 10)  # both fit
    assert infer_seqlen(100, 10, 50) == (40, 10)  # short answer kept whole
    assert infer_seqlen(10, 100, 50) == (10, 40)  # short prompt kept whole
    assert infer_seqlen(60, 40, 50) == (30, 20)  # proportional split


def test_named_and_unknown_templates(real_tokenizer):
    assert chat_template_for(real_tokenizer, "chatml") == NAMED_TEMPLATES["chatml"]
    with pytest.raises(DatasetError, match="unknown template 'nope'"):
        chat_template_for(real_tokenizer, "nope")
