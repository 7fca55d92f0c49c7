"""dmoe's C multi-LoRA kernel (engine/lora_cpu.c) against the reference semantics, its build, and
its place in the engine: the torch ops stay the reference it must equal."""

import logging

import pytest
import torch

from dmoe.engine import native as native_mod
from dmoe.engine.lora_ops import lora_add_dense_
from dmoe.engine.model import LoRABatch
from dmoe.engine.native import native_kernel

pytestmark = pytest.mark.skipif(native_kernel() is None, reason="no C compiler: the native LoRA kernel cannot be built")


def _fused(S, outs, r, d_in, dtype, g, junk_off_diagonal=False):
    """Slots as AdapterSlots lays them out: A (S, P, r, d_in), B (S, P, r, d_out) with part j's B in its
    own columns. ``junk_off_diagonal`` fills the other columns with values the kernel must not read."""
    P, d_out = len(outs), sum(outs)
    A = torch.randn(S, P, r, d_in, generator=g) * 0.2
    B = torch.randn(S, P, r, d_out, generator=g) * 0.2 if junk_off_diagonal else torch.zeros(S, P, r, d_out)
    off = []
    start = 0
    for j, o in enumerate(outs):
        B[:, j, :, start:start + o] = torch.randn(S, r, o, generator=g) * 0.2
        if junk_off_diagonal:
            mask = torch.ones(d_out, dtype=torch.bool)
            mask[start:start + o] = False
            B[:, j, :, mask] = 1e4
        off.append(start)
        start += o
    return A.to(dtype), B.to(dtype), torch.tensor(off), torch.tensor(outs)


def _reference(y, x, A, B, w, off, lens):
    """y + sum over slots s and parts j of w[n, s] * (x A[s, j]^T) B[s, j, :, part j's columns], in fp64."""
    y = y.double().clone()
    x, A, B, w = x.double(), A.double(), B.double(), w.double()
    for s in range(A.shape[0]):
        for j in range(A.shape[1]):
            o, n = int(off[j]), int(lens[j])
            delta = (x @ A[s, j].T) @ B[s, j, :, o:o + n]  # (N, T, n)
            y[..., o:o + n] += w[:, s, None, None] * delta
    return y


CASES = [  # n, t, d_in, outs, r, S, threads
    (1, 1, 16, [16], 4, 1, 1),
    (8, 1, 64, [64, 16, 16], 8, 1, 2),
    (8, 1, 48, [200, 200], 16, 3, 2),
    (5, 1, 130, [70], 3, 2, 1),
    (2, 6, 32, [40, 24], 8, 2, 2),  # a prefill: 6 tokens per sequence share its weights
    (32, 1, 24, [24, 8, 8], 4, 4, 2),
]


@pytest.mark.parametrize("n,t,d_in,outs,r,S,threads", CASES)
@pytest.mark.parametrize("dtype,slot_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.bfloat16, torch.float32)])
def test_kernel_equals_the_reference(n, t, d_in, outs, r, S, threads, dtype, slot_dtype):
    g = torch.Generator().manual_seed(n * 31 + t * 7 + r)
    A, B, off, lens = _fused(S, outs, r, d_in, slot_dtype, g)
    x = torch.randn(n, t, d_in, generator=g).to(dtype)
    y = torch.randn(n, t, sum(outs), generator=g).to(dtype)
    w = torch.rand(n, S, generator=g) * (torch.rand(n, S, generator=g) < 0.6)  # some rows use no slot at all
    w[0, 0] = 0.75
    want = _reference(y, x, A, B, w, off, lens)
    kernel = native_kernel()
    kernel.threads = threads
    try:
        got = y.clone()
        assert kernel.add_(got, x, A, B, w, off, lens) is not None
    finally:
        kernel.threads = None
    if dtype == torch.float32:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    else:  # one rounding of the fp32 sum: within one bf16 step of the exact value
        torch.testing.assert_close(got.double(), want, rtol=2 ** -8, atol=1e-6)
    unused = (w == 0).all(dim=1)
    assert torch.equal(got[unused], y[unused]), "a row with no adapter must come back bit for bit"


def test_kernel_equals_the_torch_path_it_replaces():
    """The engine's torch ops (lora_add_dense_ over the block-diagonal B) and the kernel agree on a
    decode step: fp32 exactly to rounding, the same step the model runs."""
    g = torch.Generator().manual_seed(5)
    A, B, off, lens = _fused(3, [96, 32, 32], 8, 96, torch.float32, g)
    x, y = torch.randn(8, 1, 96, generator=g), torch.randn(8, 1, 160, generator=g)
    w = torch.zeros(8, 3)
    w[torch.arange(8), torch.arange(8) % 3] = 1.0
    want = lora_add_dense_(y.clone(), x, A.view(3, 24, 96), B.view(3, 24, 160), w)
    got = native_kernel().add_(y.clone(), x, A, B, w, off, lens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kernel_reads_only_the_columns_each_part_owns():
    """The fused B is block-diagonal; the kernel skips the zero blocks (a third of q|k|v's bytes, half
    of gate|up's). Values put there are never read."""
    g = torch.Generator().manual_seed(2)
    A, Bj, off, lens = _fused(2, [40, 40], 4, 32, torch.float32, g, junk_off_diagonal=True)
    Bz = torch.zeros_like(Bj)  # the same parts, zeros elsewhere (what AdapterSlots keeps there)
    Bz[:, 0, :, :40], Bz[:, 1, :, 40:] = Bj[:, 0, :, :40], Bj[:, 1, :, 40:]
    assert (Bj != Bz).sum() == 2 * 2 * 4 * 40
    x, y = torch.randn(3, 1, 32, generator=g), torch.randn(3, 1, 80, generator=g)
    w = torch.tensor([[1.0, 0.0], [0.0, 0.5], [1.0, 1.0]])
    got = native_kernel().add_(y.clone(), x, A, Bj, w, off, lens)
    torch.testing.assert_close(got.double(), _reference(y, x, A, Bz, w, off, lens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad,needle", [
    (lambda a: {**a, "A": a["A"].transpose(2, 3).contiguous().transpose(2, 3)}, "contiguous CPU"),
    (lambda a: {**a, "B": a["B"].double()}, "one dtype"),
    (lambda a: {**a, "off": a["off"].int()}, "int64"),
    (lambda a: {**a, "lens": a["lens"] + 100}, "outside d_out"),
    (lambda a: {**a, "w": a["w"].bfloat16()}, "fp32"),
    (lambda a: {**a, "w": a["w"][:, :1].contiguous()}, "fp32, contiguous"),
    (lambda a: {**a, "x": a["x"][..., :8].contiguous()}, "d_in"),
    (lambda a: {**a, "y": a["y"].transpose(0, 1)}, "contiguous CPU"),
])
def test_bad_layouts_are_refused_before_the_kernel_runs(bad, needle):
    g = torch.Generator().manual_seed(3)
    A, B, off, lens = _fused(2, [16, 16], 4, 16, torch.float32, g)
    args = {"y": torch.zeros(2, 1, 32), "x": torch.randn(2, 1, 16, generator=g), "A": A, "B": B,
            "w": torch.ones(2, 2), "off": off, "lens": lens}
    args = bad(args)
    before = args["y"].clone()
    with pytest.raises(ValueError, match=needle):
        native_kernel().add_(args["y"], args["x"], args["A"], args["B"], args["w"], args["off"], args["lens"])
    assert torch.equal(args["y"], before)


# ---------------------------------------------------------------- build
@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A kernel looked up again, over an empty DMOE_HOME; the process's kernel is restored after."""
    monkeypatch.setenv("DMOE_HOME", str(tmp_path / "home"))
    saved = native_mod._path, native_mod._tried, dict(native_mod._bindings)
    native_mod.reset_for_tests()
    yield tmp_path
    native_mod._path, native_mod._tried = saved[0], saved[1]
    native_mod._bindings.update(saved[2])


def test_built_once_into_dmoe_home_and_reused(fresh, caplog):
    with caplog.at_level(logging.INFO, logger="dmoe.engine.native"):
        k = native_kernel()
    assert k is not None and k.path.parent == fresh / "home" / "native" and k.path.exists()
    assert "building the native CPU kernels" in caplog.text
    native_mod.reset_for_tests()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dmoe.engine.native"):
        again = native_kernel()
    assert again is not None and again.path == k.path and "building" not in caplog.text
    assert [p.name for p in k.path.parent.iterdir()] == [k.path.name], "no temporary files left behind"


def test_no_compiler_leaves_the_torch_path_with_a_warning(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CC", "dmoe-no-such-compiler")
    with caplog.at_level(logging.WARNING, logger="dmoe.engine.native"):
        assert native_kernel() is None
    assert "no C compiler (dmoe-no-such-compiler)" in caplog.text and "set CC" in caplog.text


def test_a_failed_build_leaves_the_torch_path_and_no_file(fresh, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger="dmoe.engine.native"):
        assert native_kernel() is None
    assert "could not be built" in caplog.text
    assert not list((fresh / "home" / "native").glob("*")), "a failed build leaves nothing to load next time"


def test_switched_off_by_the_environment(fresh, monkeypatch):
    monkeypatch.setenv("DMOE_NATIVE_LORA", "0")
    assert native_kernel() is None


# ---------------------------------------------------------------- in the model
def test_lora_batch_keeps_fp32_weights_only_for_the_kernel():
    b = LoRABatch()
    b.set([[(2, 0.5)], [], [(3, 1.0), (2, 0.25)]], torch.bfloat16, torch.device("cpu"))
    assert b.w32 is None
    b.use_native(native_kernel())
    b.set([[(2, 0.5)], [], [(3, 1.0), (2, 0.25)]], torch.bfloat16, torch.device("cpu"))
    assert b.w32 is not None and b.w32.dtype == torch.float32 and b.w32.is_contiguous()
    assert b.w32.tolist() == [[0.5, 0.0], [0.0, 0.0], [0.25, 1.0]]  # slots 2..3, summed per row


def test_the_engine_gives_the_torch_ops_logits_with_the_kernel(tiny_engine, tiny_experts):
    """A forward of the tiny model over a mixed batch (a bare row, one expert, a blend, a scaled
    expert), one token per row and a short prefill: the kernel's logits equal the torch ops' (the
    reference path, which equals PEFT in test_engine.py), before and after the buffers grow."""
    from dmoe.engine.model import StepInput
    from dmoe.experts import load_expert

    engine = tiny_engine
    assert engine.model.lora.native is not None, "a CPU engine runs the kernel by default"
    assert "C kernel" in engine.describe()
    kernel = engine.model.lora.native
    engine.load_expert(load_expert(tiny_experts / "gamma"))

    def logits(native, rows, tokens):
        n = len(tokens)
        step = StepInput.build(tokens, [list(range(len(tokens[0])))] * n, list(range(n)), torch.device("cpu"))
        engine.model.lora.use_native(native)
        engine.model.lora.set(rows, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            return engine.model.forward(step).clone()

    slot = {n: r.slot for n, r in engine.resident.items()}
    rows = [[], [(slot["alpha"], 1.0)], [(slot["beta"], 0.5), (slot["gamma"], 0.5)], [(slot["gamma"], 1.5)]]
    for tokens in ([[5], [6], [7], [8]], [[5, 9, 4], [6, 1, 2], [7, 7, 7], [8, 3, 1]]):
        fast, ref = logits(kernel, rows, tokens), logits(None, rows, tokens)
        assert not torch.equal(fast[0], fast[1])  # the adapters change the logits
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    sites_before = sum(len(lin.sites) for lin in engine.slots.linears)
    assert sites_before > 0  # the kernel's checked views are cached per slot range
    engine.slots._grow(engine.slots.rank * 2)  # new buffers: the cached addresses must go
    assert all(not lin.sites for lin in engine.slots.linears)
    torch.testing.assert_close(logits(kernel, rows, [[5], [6], [7], [8]]), logits(None, rows, [[5], [6], [7], [8]]),
                               rtol=1e-5, atol=1e-5)
    assert "LoRA on torch ops (the C kernel is off or could not be built" in engine.describe()  # the banner says so
    engine.model.lora.use_native(kernel)


def test_compiled_blocks_keep_the_torch_ops(tiny_base):
    """A ctypes call inside a compiled block would break its graph: --compile runs the torch ops."""
    from dmoe.base import load_base
    from dmoe.engine.model import compile_blocks, from_hf

    model, _, _ = load_base(tiny_base)
    m = from_hf(model)
    m.lora.use_native(native_kernel())
    compile_blocks(m)
    assert m.lora.native is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_delta_never_depends_on_its_batch_mates(dtype):
    """Bit for bit: a row's output is the same alone and inside batches of 2-8 rows, at any position,
    whatever slots its batch-mates use (a greedy reply must not change with the load: the cluster's
    failover test compares replies under load with single-request references)."""
    g = torch.Generator().manual_seed(11)
    A, B, off, lens = _fused(3, [96, 32, 32], 8, 100, torch.float32, g)  # d_in 100: a tail past the lanes
    A, B = A.to(dtype), B.to(dtype)
    kernel = native_kernel()
    x_row, y_row = torch.randn(1, 1, 100, generator=g).to(dtype), torch.randn(1, 1, 160, generator=g).to(dtype)
    w_row = torch.tensor([[0.0, 1.0, 0.0]])
    alone = kernel.add_(y_row.clone(), x_row, A, B, w_row, off, lens)
    for n in range(2, 9):
        for at in (0, n // 2, n - 1):
            x = torch.randn(n, 1, 100, generator=g).to(dtype)
            y = torch.randn(n, 1, 160, generator=g).to(dtype)
            w = torch.zeros(n, 3)
            same = torch.rand(n, generator=g) < 0.7  # most batch-mates share its slot: blocks of four rows form
            w[torch.arange(n), torch.where(same, 1, torch.randint(0, 3, (n,), generator=g))] = 1.0
            x[at], y[at], w[at] = x_row[0], y_row[0], w_row[0]
            got = kernel.add_(y, x, A, B, w, off, lens)
            assert torch.equal(got[at], alone[0]), f"row {at} of {n} differs from the same row alone"


def test_only_decode_steps_take_the_kernel_whatever_their_rows(tiny_engine, monkeypatch):
    """A prefill's rows are its batch's tokens: were the path chosen by row count, the same request's
    prefill would run the kernel alone and the torch ops beside others, and a greedy reply would
    change with the load. Prefills never take the kernel; decode steps always do."""
    from dmoe.engine.model import StepInput

    engine = tiny_engine
    kernel = engine.model.lora.native
    calls = []
    monkeypatch.setattr(type(kernel), "run_", lambda self, site, y, x, w: calls.append(tuple(x.shape)) or y)
    slot = engine.resident["alpha"].slot
    for tokens in ([[5, 6]], [[5] * 16], [[5]] * 8, [[5]]):
        calls.clear()
        n, t = len(tokens), len(tokens[0])
        step = StepInput.build(tokens, [list(range(t))] * n, list(range(n)), torch.device("cpu"))
        engine.model.lora.set([[(slot, 1.0)]] * n, torch.float32, torch.device("cpu"))
        with torch.no_grad():
            engine.model.forward(step)
        assert bool(calls) == (t == 1), f"{n} rows x {t} tokens: kernel calls {len(calls)}"
