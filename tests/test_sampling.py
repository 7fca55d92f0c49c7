"""Per-request logit rules (penalties, logit_bias, logprobs, grammars) on the fast path
equal the slow reference, and a grammar's mask holds for its own row of a mixed batch only."""

import json

import jsonschema
import numpy as np
import pytest
import torch

from dmoe.engine import sampling_numpy
from dmoe.engine.grammar import allowed_tokens, gbnf_grammar, json_schema_grammar, new_matcher, response_format_grammar
from dmoe.engine.protocol import run_until_done
from dmoe.engine.request import Request, SamplingParams, append_token
from dmoe.engine.sampling import sample_batch, sample_batch_reference
from dmoe.errors import RequestError

V = 64


def _req(params: SamplingParams, prompt=(1, 2, 3), out=(), matcher=None, seed=None) -> Request:
    r = Request(list(prompt), [], params, output_ids=list(out), matcher=matcher)
    if params.seed is not None:
        r.generator = torch.Generator().manual_seed(params.seed)
    return r


ROWS = [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.7),
    SamplingParams(repetition_penalty=0.6, presence_penalty=1.5),
    SamplingParams(frequency_penalty=2.0, presence_penalty=-0.5),
    SamplingParams(logit_bias=((5, 100.0), (7, -100.0))),
    SamplingParams(logprobs=4),
    SamplingParams(logprobs=0, frequency_penalty=1.0, temperature=0.9, top_p=0.8, seed=3),
    SamplingParams(temperature=1.3, top_k=5, seed=9, repetition_penalty=1.3),
]


def test_fast_path_equals_reference_row_by_row_in_one_mixed_batch():
    torch.manual_seed(0)
    for trial in range(6):  # bounded: six random batches
        logits = torch.randn(len(ROWS), V) * 3
        outs = [[int(x) for x in torch.randint(0, V, (trial * 3,))] for _ in ROWS]
        fast = [_req(p, out=o) for p, o in zip(ROWS, outs)]
        slow = [_req(p, out=o) for p, o in zip(ROWS, outs)]
        assert sample_batch(logits.clone(), fast) == sample_batch_reference(logits.clone(), slow)
        for f, s in zip(fast, slow):
            assert len(f.logprobs) == len(s.logprobs)
            for (a, ta), (b, tb) in zip(f.logprobs, s.logprobs):
                assert a == pytest.approx(b, abs=1e-5) and [t for t, _ in ta] == [t for t, _ in tb]


def test_numpy_sampler_equals_the_reference_on_every_deterministic_rule():
    """The llama.cpp engine's numpy sampler: the same tokens as the reference wherever no random
    draw decides (greedy rows with penalties, bias, logprobs), the same logprobs, in one mixed batch."""
    torch.manual_seed(1)
    greedy = [p for p in ROWS if p.greedy]
    assert len(greedy) >= 5
    for trial in range(6):  # bounded
        logits = torch.randn(len(greedy), V) * 3
        outs = [[int(x) for x in torch.randint(0, V, (trial * 3,))] for _ in greedy]
        fast = [_req(p, out=o) for p, o in zip(greedy, outs)]
        slow = [_req(p, out=o) for p, o in zip(greedy, outs)]
        rows = logits.numpy().copy()
        assert sampling_numpy.sample_batch(rows, fast) == sample_batch_reference(logits.clone(), slow)
        assert np.array_equal(rows, logits.numpy())  # the engine's logits are not changed
        for f, s in zip(fast, slow):
            assert len(f.logprobs) == len(s.logprobs)
            for (a, ta), (b, tb) in zip(f.logprobs, s.logprobs):
                assert a == pytest.approx(b, abs=1e-5) and [t for t, _ in ta] == [t for t, _ in tb]


def test_numpy_sampler_draws_are_seeded_and_keep_top_k_and_top_p():
    row = np.linspace(0.0, 4.0, V, dtype=np.float32)[None]  # token V-1 the likeliest, then V-2, ...

    def draws(params, n=40):
        r = Request([1], [], params)
        r.generator = sampling_numpy.new_generator(params.seed) if params.seed is not None else None
        return [sampling_numpy.sample_batch(row, [r])[0] for _ in range(n)]

    a = draws(SamplingParams(temperature=2.0, seed=5))
    assert a == draws(SamplingParams(temperature=2.0, seed=5)) and a != draws(SamplingParams(temperature=2.0, seed=6))
    assert len(set(a)) > 3  # a real draw at a high temperature, not greedy
    assert set(draws(SamplingParams(temperature=5.0, top_k=3, seed=1))) <= {V - 1, V - 2, V - 3}
    probs = np.exp(row[0] - row[0].max()) / np.exp(row[0] - row[0].max()).sum()
    keep = int(np.searchsorted(np.cumsum(probs[::-1]), 0.5)) + 1  # the smallest set reaching 0.5
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.5, seed=2), 200)) <= set(range(V - keep, V))
    assert draws(SamplingParams(temperature=0.0), 3) == [V - 1] * 3


def test_the_grammar_mask_reads_llguidance_bits_low_first():
    class Words:
        def compute_bitmask(self):
            return np.array([0b1011, 1 << 31], dtype="<u4").tobytes()

    got = allowed_tokens(Words(), 64)
    assert np.flatnonzero(got).tolist() == [0, 1, 3, 63] and got.dtype == bool and got.shape == (64,)
    assert np.flatnonzero(allowed_tokens(Words(), 40)).tolist() == [0, 1, 3]  # words past the vocabulary: cut


def test_each_rule_does_what_it_says():
    logits = torch.zeros(1, V)
    logits[0, 10], logits[0, 11] = 2.0, 1.9
    # repetition: 10 is in the prompt, 2.0 / 1.5 < 1.9
    assert sample_batch(logits.clone(), [_req(SamplingParams(repetition_penalty=1.5), prompt=[10])]) == [11]
    # frequency: 10 twice in the output, 2.0 - 2 * 0.1 < 1.9; presence: once, 2.0 - 0.2 < 1.9
    assert sample_batch(logits.clone(), [_req(SamplingParams(frequency_penalty=0.1), out=[10, 10])]) == [11]
    assert sample_batch(logits.clone(), [_req(SamplingParams(presence_penalty=0.2), out=[10])]) == [11]
    assert sample_batch(logits.clone(), [_req(SamplingParams(presence_penalty=0.05), out=[10])]) == [10]
    assert sample_batch(logits.clone(), [_req(SamplingParams(logit_bias=((40, 3.0),)))]) == [40]
    r = _req(SamplingParams(logprobs=2))
    assert sample_batch(logits.clone(), [r]) == [10]
    lp, top = r.logprobs[0]
    want = torch.log_softmax(logits[0], -1)
    assert lp == pytest.approx(float(want[10])) and [t for t, _ in top] == [10, 11]
    assert top[1][1] == pytest.approx(float(want[11]))


def test_logprobs_are_of_the_raw_distribution_not_the_penalized_one():
    logits = torch.zeros(1, V)
    logits[0, 10] = 2.0
    r = _req(SamplingParams(logprobs=1, logit_bias=((10, -100.0),)))
    tok = sample_batch(logits.clone(), [r])[0]
    assert tok != 10 and r.logprobs[0][1][0][0] == 10  # the model's favourite is still reported


@pytest.mark.parametrize("bad, words", [
    ({"presence_penalty": 2.5}, "presence_penalty must be in [-2, 2]"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty must be a finite number"),
    ({"repetition_penalty": 0}, "repetition_penalty must be > 0"),
    ({"logit_bias": ((3, 101.0),)}, "logit_bias for token 3 must be in [-100, 100]"),
    ({"logit_bias": ((-1, 1.0),)}, "token ids must be integers >= 0"),
    ({"logprobs": 21}, "in [0, 20]"),
    ({"logprobs": True}, "in [0, 20]"),
])
def test_bad_values_are_refused_by_name(bad, words):
    with pytest.raises(RequestError, match=words.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams(**bad)


# ---------------------------------------------------------------- grammars
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "tag": {"type": "string", "maxLength": 6},
                   "n": {"enum": [1, 2, 3]}, "xs": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}},
    "required": ["ok", "tag", "n", "xs"], "additionalProperties": False,
}


@pytest.mark.parametrize("rf, words", [
    ({"type": "xml"}, "type 'xml' is not supported"),
    ({"type": "json_schema"}, 'needs "json_schema"'),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}, "objectx"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "foo": 1}}, "unknown field foo"),
    ({"type": "json_object", "strictness": 1}, "unknown field strictness"),
])
def test_bad_response_formats_are_refused(rf, words):
    with pytest.raises(RequestError, match=words):
        response_format_grammar(rf)


def test_response_format_text_is_no_grammar_and_gbnf_errors_are_readable():
    assert response_format_grammar({"type": "text"}) is None and response_format_grammar(None) is None
    with pytest.raises(RequestError, match="grammar"):
        gbnf_grammar('root ::= "a" | undefined_rule')


@pytest.fixture
def engine(tiny_engine):
    return tiny_engine


def test_grammar_rows_match_their_schema_and_free_rows_are_untouched_in_a_mixed_batch(engine):
    """A random model, so only the mask can make its output valid JSON: every constrained row
    parses and validates; unconstrained rows in the same batch equal the same requests alone."""
    tok = engine.tokenizer
    schema_g = json_schema_grammar(SCHEMA)
    yes_no = gbnf_grammar('root ::= "yes" | "no"')
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("give json", "hello there", "answer", "x y z")]
    jobs = []
    for i in range(8):
        sets = [[], [("alpha", 1.0)], [("beta", 1.0)], [("alpha", 0.5), ("beta", 0.5)]][i % 4]
        grammar = [schema_g, None, yes_no, None][i % 4]
        params = SamplingParams(max_tokens=60, temperature=[0.0, 1.0][i // 4], seed=i, grammar=grammar)
        jobs.append((prompts[i % 4], sets, params))
    reqs = [engine.submit(p, s, params) for p, s, params in jobs]
    run_until_done(engine, reqs)
    for (p, s, params), r in zip(jobs, reqs):
        text = tok.decode(r.output_ids, skip_special_tokens=True)
        if params.grammar is schema_g:
            assert r.finish_reason == "stop", (text, r.finish_reason)
            jsonschema.validate(json.loads(text), SCHEMA)
        elif params.grammar is yes_no:
            assert text in ("yes", "no") and r.finish_reason == "stop"
        else:
            alone = engine.submit(p, s, params)
            run_until_done(engine, [alone])
            assert alone.output_ids == r.output_ids


def test_json_object_output_is_always_a_valid_json_prefix(engine):
    """json_object lets a random model write an object of any size: a finished one parses;
    one cut by max_tokens is still a prefix the grammar accepts (OpenAI's 'length' case)."""
    g = response_format_grammar({"type": "json_object"})
    reqs = [engine.submit(engine.tokenizer.encode("json please"), [], SamplingParams(max_tokens=40, temperature=1.0,
                                                                                     seed=s, grammar=g)) for s in range(4)]
    run_until_done(engine, reqs)
    for r in reqs:
        text = engine.tokenizer.decode(r.output_ids, skip_special_tokens=True)
        assert text.startswith("{")
        if r.finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            check = new_matcher(engine.tokenizer, engine.n_vocab, g)
            assert check.consume_tokens(r.output_ids) and not check.is_error()


def test_a_complete_grammar_ends_the_request_even_with_ignore_eos(real_tokenizer):
    m = new_matcher(real_tokenizer, len(real_tokenizer), gbnf_grammar('root ::= "ok"'))
    r = _req(SamplingParams(max_tokens=10, ignore_eos=True), matcher=m)
    for t in real_tokenizer.encode("ok", add_special_tokens=False):
        append_token(r, t, {2}, real_tokenizer)
    assert r.finish_reason == "stop"


def test_logit_bias_outside_the_vocabulary_is_refused_at_submit(engine):
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.submit([1, 2], [], SamplingParams(logit_bias=((engine.n_vocab, 1.0),)))
