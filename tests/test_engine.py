"""The torch multi-LoRA engine on a tiny random Llama: equals HF / PEFT, and a mixed
batch equals each request run alone."""


import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import hand_copy, step_wrapper
from dmoe.base import load_base
from dmoe.engine.protocol import Engine, run_until_done
from dmoe.engine.request import SamplingParams
from dmoe.errors import AdapterError, AdapterInUseError, EngineError, ExpertNotLoadedError, RequestError
from dmoe.experts import apply_expert, load_expert

GREEDY = SamplingParams(max_tokens=12)


@pytest.fixture
def engine(tiny_engine):
    return tiny_engine


PROMPTS = [[1, 4093, 198, 1780, 1076], [1, 520, 9531, 198], [5, 6, 7, 8, 9, 10, 11], [300, 301]]


def hf_greedy(model, ids, n):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                         min_new_tokens=n)
    return out[0, len(ids):].tolist()


def test_base_greedy_equals_hf_generate(engine, tiny_base):
    model, _, _ = load_base(tiny_base)
    got = engine.generate(PROMPTS, [[]] * len(PROMPTS), GREEDY)
    for ids, out in zip(PROMPTS, got):
        assert out == hf_greedy(model, ids, len(out))


def test_expert_greedy_equals_peft(engine, tiny_base, tiny_experts):
    model, _, _ = load_base(tiny_base)
    peft_model = apply_expert(model, load_expert(tiny_experts / "alpha"))
    got = engine.generate(PROMPTS, [[("alpha", 1.0)]] * len(PROMPTS), GREEDY)
    base = engine.generate(PROMPTS, [[]] * len(PROMPTS), GREEDY)
    assert got != base  # the adapter changes the output
    for ids, out in zip(PROMPTS, got):
        assert out == hf_greedy(peft_model, ids, len(out))


def test_mixed_batch_equals_each_request_alone(engine):
    sets = [[], [("alpha", 1.0)], [("beta", 1.0)], [("alpha", 0.5), ("beta", 0.5)], [("beta", 2.0)]]
    prompts = [p for p in PROMPTS for _ in sets]
    adapter_sets = [s for _ in PROMPTS for s in sets]
    together = engine.generate(prompts, adapter_sets, GREEDY)  # 20 requests, 8 KV slots: rows join and leave
    alone = [engine.generate([p], [s], GREEDY)[0] for p, s in zip(prompts, adapter_sets)]
    assert together == alone
    assert len({tuple(o) for o in together}) > len(PROMPTS)  # the sets really differ


def test_the_fused_layer_delta_equals_the_per_part_reference(engine, tiny_experts, monkeypatch):
    """One A and one block-diagonal B per fused layer (q|k|v, gate|up) give the logits the
    per-part loop gives, for a mixed batch with blends and a bare row."""
    from dmoe.engine.model import LoRALinear, StepInput

    engine.load_expert(load_expert(tiny_experts / "gamma"))
    slot = {n: r.slot for n, r in engine.resident.items()}
    rows = [[], [(slot["alpha"], 1.0)], [(slot["beta"], 0.5), (slot["gamma"], 0.5)], [(slot["gamma"], 1.5)]]
    step = StepInput.build([p[:2] for p in PROMPTS], [[0, 1]] * 4, [0, 1, 2, 3], torch.device("cpu"))
    lin = engine.model.layers[0].qkv
    assert lin.A.shape[1] == 3 and lin.parts[1].A.data_ptr() == lin.A[:, 1].data_ptr()  # the parts are views

    def logits(fused: bool) -> torch.Tensor:
        monkeypatch.setattr(LoRALinear, "fused", fused)
        engine.model.lora.set(rows, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            return engine.model.forward(step).clone()

    fused, reference = logits(True), logits(False)
    assert not torch.equal(fused[0], fused[1])  # the adapters change the logits
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["dense", "gather"])
def test_rows_finishing_at_different_steps_match_each_alone(engine, tiny_experts, monkeypatch, kernel):
    """Rows leave mid-batch (KV slots are compacted), prompts of different lengths are
    prefilled together, and both LoRA kernels give the same tokens as a lone request."""
    import dmoe.engine.model as model_mod

    monkeypatch.setattr(model_mod, "use_dense", lambda n_slots, k: kernel == "dense")
    engine.load_expert(load_expert(tiny_experts / "gamma"))
    sets = [[("gamma", 1.0)], [], [("alpha", 1.0)], [("beta", 0.5), ("gamma", 0.5)], [("alpha", 1.0)], [("gamma", 1.5)]]
    jobs = [(PROMPTS[i % len(PROMPTS)], sets[i % len(sets)], SamplingParams(max_tokens=3 + (5 * i) % 11)) for i in range(14)]
    forward, decode_slots = engine.model.forward, []

    def spy(step):
        if step.tokens.shape[1] == 1:
            decode_slots.append((step.slots.tolist(), step.slot_range))
        return forward(step)

    engine.model.forward = spy
    reqs = [engine.submit(p, s, sp) for p, s, sp in jobs]
    run_until_done(engine, reqs)
    # compacted: decode reads the cache in place (the engine passes the slot range as ints)
    assert all(s == list(range(len(s))) and rng == (0, len(s)) for s, rng in decode_slots)
    assert len({len(s) for s, _ in decode_slots}) > 2  # rows really left mid-batch
    alone = [engine.generate([p], [s], sp)[0] for p, s, sp in jobs]
    assert [r.output_ids for r in reqs] == alone


def test_a_larger_rank_grows_the_buffers_without_changing_loaded_experts(engine, tiny_experts, tmp_path):
    import json

    before = engine.generate(PROMPTS, [[("alpha", 1.0)]] * len(PROMPTS), GREEDY)
    wide = tmp_path / "alpha_wide"  # alpha zero-padded to twice the rank: the same function
    hand_copy(tiny_experts / "alpha", wide)
    w = load_file(str(wide / "adapter_model.safetensors"))
    save_file({k: torch.cat([v, torch.zeros_like(v)], dim=0 if "lora_A" in k else 1) for k, v in w.items()},
              str(wide / "adapter_model.safetensors"))
    cfg = json.loads((wide / "adapter_config.json").read_text())
    cfg["r"], cfg["lora_alpha"] = cfg["r"] * 2, cfg["lora_alpha"] * 2
    (wide / "adapter_config.json").write_text(json.dumps(cfg))
    (wide / "expert.yaml").write_text((wide / "expert.yaml").read_text().replace("name: alpha", "name: alpha_wide"))
    rank = engine.slots.rank
    engine.load_expert(load_expert(wide))
    assert engine.slots.rank == 2 * rank
    assert engine.generate(PROMPTS, [[("alpha", 1.0)]] * len(PROMPTS), GREEDY) == before
    assert engine.generate(PROMPTS, [[("alpha_wide", 1.0)]] * len(PROMPTS), GREEDY) == before


def test_adapters_with_other_target_modules_mix_and_match_peft(engine, tiny_base, tiny_experts, tmp_path):
    import json

    part = tmp_path / "attn_only"  # alpha restricted to q_proj and v_proj
    hand_copy(tiny_experts / "alpha", part)
    w = load_file(str(part / "adapter_model.safetensors"))
    save_file({k: v for k, v in w.items() if ".q_proj." in k or ".v_proj." in k}, str(part / "adapter_model.safetensors"))
    cfg = json.loads((part / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj"]
    (part / "adapter_config.json").write_text(json.dumps(cfg))
    (part / "expert.yaml").write_text((part / "expert.yaml").read_text().replace("name: alpha", "name: attn_only"))
    res = engine.load_expert(load_expert(part))
    assert {m.split(".")[-1] for m in res.modules} == {"q_proj", "v_proj"}
    model, _, _ = load_base(tiny_base)
    want = [hf_greedy(apply_expert(model, load_expert(part)), ids, 12) for ids in PROMPTS]
    mixed = engine.generate(PROMPTS * 2, [[("attn_only", 1.0)]] * 4 + [[("alpha", 1.0)]] * 4, GREEDY)
    assert mixed[:4] == want
    assert mixed[4:] == engine.generate(PROMPTS, [[("alpha", 1.0)]] * 4, GREEDY) != want


def test_load_during_generation_does_not_touch_requests_in_flight(engine, tiny_experts):
    params = SamplingParams(max_tokens=10)
    want = engine.generate([PROMPTS[0]], [[("alpha", 1.0)]], params)[0]
    req = engine.submit(PROMPTS[0], [("alpha", 1.0)], params)
    seen = []

    def mid_flight(steps: int) -> None:
        if steps == 2:
            with pytest.raises(AdapterInUseError, match="in use"):
                engine.unload_expert("alpha")
            with pytest.raises(AdapterInUseError, match="in use"):
                engine.load_expert(load_expert(tiny_experts / "alpha"))  # replacing it mid-flight is refused too
            engine.load_expert(load_expert(tiny_experts / "beta"))  # a reload of another expert mid-flight
            seen.append(steps)

    engine.step = step_wrapper(engine, mid_flight)
    run_until_done(engine, [req])
    assert seen == [2] and req.output_ids == want
    engine.unload_expert("alpha")  # idle now
    with pytest.raises(RequestError, match="unknown expert 'alpha'"):
        engine.submit(PROMPTS[0], [("alpha", 1.0)], params)
    with pytest.raises(ExpertNotLoadedError, match="not loaded"):
        engine.unload_expert("alpha")


@pytest.mark.parametrize("scale", [float("nan"), float("inf")])
def test_bad_scales_are_refused(engine, scale):
    with pytest.raises(RequestError, match="finite"):
        engine.submit(PROMPTS[0], [("alpha", scale)], GREEDY)


def test_bad_lengths_are_refused(engine):
    with pytest.raises(RequestError, match="exceeds the context"):
        engine.submit([1] * 120, [], SamplingParams(max_tokens=20))
    with pytest.raises(RequestError, match="at least 1"):
        engine.submit([1], [], SamplingParams(max_tokens=0))
    with pytest.raises(RequestError, match="empty"):
        engine.submit([], [], GREEDY)


def test_adapter_for_another_base_changes_nothing(engine, tiny_experts, tmp_path):

    bad = tmp_path / "wide"
    hand_copy(tiny_experts / "alpha", bad)
    w = load_file(str(bad / "adapter_model.safetensors"))
    save_file({k: torch.cat([v, v], dim=-1) if "lora_A" in k else v for k, v in w.items()}, str(bad / "adapter_model.safetensors"))
    before = engine.generate([PROMPTS[1]], [[("beta", 1.0)]], GREEDY)
    card = (bad / "expert.yaml").read_text().replace("name: alpha", "name: wide")
    (bad / "expert.yaml").write_text(card)
    with pytest.raises(AdapterError, match="built for another base"):
        engine.load_expert(load_expert(bad))
    assert "wide" not in engine.resident
    assert engine.generate([PROMPTS[1]], [[("beta", 1.0)]], GREEDY) == before
    save_file({k: v * float("nan") for k, v in w.items()}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="NaN or infinite"):
        engine.load_expert(load_expert(bad))
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match="not a valid safetensors"):
        engine.load_expert(load_expert(bad))


def test_sampling_is_seeded(engine):
    p = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=3)
    a = engine.generate([PROMPTS[0]], [[]], p)
    assert a == engine.generate([PROMPTS[0]], [[]], p)
    others = {tuple(engine.generate([PROMPTS[0]], [[]], SamplingParams(max_tokens=8, temperature=1.0, seed=s))[0]) for s in range(6)}
    assert len(others) > 1  # the seed really changes the sample


@pytest.mark.parametrize("truncation", [{"top_k": 1}, {"top_p": 1e-6}])
def test_sampling_truncated_to_one_token_is_greedy(engine, truncation):
    """The on-device sampler keeps only the top token when top_k=1 or top_p is tiny."""
    greedy = engine.generate(PROMPTS, [[]] * len(PROMPTS), GREEDY)
    sampled = engine.generate(PROMPTS, [[]] * len(PROMPTS), SamplingParams(max_tokens=12, temperature=5.0, seed=1, **truncation))
    assert sampled == greedy


@pytest.mark.parametrize("bad, words", [({"max_tokens": 0}, "max_tokens"), ({"temperature": -1.0}, "temperature"),
                                        ({"temperature": float("nan")}, "finite"), ({"top_p": 0.0}, "top_p"),
                                        ({"top_p": 1.5}, "top_p"), ({"top_k": -1}, "top_k"), ({"seed": 1.5}, "seed"),
                                        ({"stop": ("",)}, "stop")])
def test_sampling_params_validate_themselves(bad, words):
    with pytest.raises(RequestError, match=words):
        SamplingParams(**bad)


def test_the_engine_implements_the_protocol_and_a_stuck_loop_fails(engine):
    assert isinstance(engine, Engine)
    req = engine.submit(PROMPTS[0], [], SamplingParams(max_tokens=30))
    with pytest.raises(EngineError, match="not done after 3 engine steps"):
        run_until_done(engine, [req], max_steps=3)
    s = engine.stats()
    assert s.running == 1 and s.kv_tokens == len(PROMPTS[0]) + len(req.output_ids) and s.kv_bytes_used > 0
    engine.cancel(req)
    assert req.finish_reason == "cancelled" and not engine.has_work()


def test_prefill_widths_are_few_buckets_and_change_no_output(engine, monkeypatch):
    """Prompts are padded to a power-of-two width (bf16 matmuls keep memory per new shape);
    the padding changes no reply, and a width never passes max_seq."""
    from dmoe.engine import torch_engine
    from dmoe.engine.torch_engine import prefill_width

    assert [prefill_width(n, 2048) for n in (1, 16, 17, 100, 128, 129, 1500)] == [16, 16, 32, 128, 128, 256, 2048]
    assert prefill_width(100, 64) == 64 and prefill_width(40, 40) == 40
    widths = {prefill_width(n, 2048) for n in range(1, 2049)}
    assert widths == {16, 32, 64, 128, 256, 512, 1024, 2048}
    prompts = PROMPTS + [list(range(100, 117)), list(range(200, 233))]  # 17 and 33 tokens: padded to 32 and 64
    sets = [[], [("alpha", 1.0)], [("beta", 1.0)], [("alpha", 0.5), ("beta", 0.5)], [], [("beta", 1.0)]]
    seen = []
    real = torch_engine.StepInput.build

    def spy(tokens, positions, slots, device, logits_at=None):
        seen.append(len(tokens[0]))
        return real(tokens, positions, slots, device, logits_at)

    monkeypatch.setattr(torch_engine.StepInput, "build", staticmethod(spy))
    bucketed = engine.generate(prompts, sets, GREEDY)
    assert {w for w in seen if w > 1} <= {16, 32, 64}  # prefill widths (decode steps are 1 wide)
    monkeypatch.setattr(torch_engine, "BUCKET_PREFILL", False)
    seen.clear()
    exact = engine.generate(prompts, sets, GREEDY)
    assert bucketed == exact and 33 in seen


def test_compiled_blocks_give_the_eager_replies(tiny_base, tiny_experts):
    """``dmoe serve --compile``: torch.compile'd decoder blocks (fp32, the tiny model) give the
    eager engine's greedy replies for the base, an expert and a blend in one mixed batch."""
    from dmoe.engine.torch_engine import TorchEngine

    model, tok, _ = load_base(tiny_base)
    eager = TorchEngine.from_base(model, tok, max_batch=4, max_seq=64, max_loras=2, max_rank=8)
    model, tok, _ = load_base(tiny_base)
    fast = TorchEngine.from_base(model, tok, max_batch=4, max_seq=64, max_loras=2, max_rank=8, compile=True)
    for eng in (eager, fast):
        for name in ("alpha", "beta"):
            eng.load_expert(load_expert(tiny_experts / name))
    sets = [[], [("alpha", 1.0)], [("beta", 1.0)], [("alpha", 0.5), ("beta", 0.5)]]
    before = eager.generate(PROMPTS, sets, GREEDY)
    eager.warm_up()  # what serving runs before its first request when compiled: it leaves nothing behind
    assert eager.stats().running == eager.stats().waiting == eager.stats().kv_tokens == 0
    assert sorted(eager.resident) == ["alpha", "beta"]
    assert fast.generate(PROMPTS, sets, GREEDY) == eager.generate(PROMPTS, sets, GREEDY) == before
    assert fast.compiled and not eager.compiled
