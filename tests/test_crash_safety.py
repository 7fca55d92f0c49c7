"""Crash safety of every file dmoe writes (issue 19, part 3).

For each writer: ``kill -9`` at seeded points during the write (``crash_writers``: the k-th
file-system event), then check that nothing earlier is lost and nothing half-written is
read, and that running the writer again finishes and leaves no debris. Then a full disk (a
small tmpfs), files damaged by hand, and two processes writing one cache entry at once.

``DMOE_CRASH_POINTS`` (default 4, 1 for the base conversion) sets the kill points of each
kind per writer; the recorded run in docs/reliability.md used 10 (20 kill points per writer).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import HashEncoder
from crash_writers import bench_answers, bench_run, checkpoint_objects, child
from dmoe.errors import ExpertError, TrainError
from dmoe.io import verify_manifest

POINTS = int(os.environ.get("DMOE_CRASH_POINTS", "4"))
SLOW_POINTS = int(os.environ.get("DMOE_CRASH_POINTS", "1"))  # writers whose every run dequantises a base (~5 s)
RESULTS: dict[str, dict] = {}  # writer -> {"events", "points"}, for docs/reliability.md (DMOE_CRASH_REPORT)


@pytest.fixture(scope="module")
def ctx():
    c = mp.get_context("forkserver")
    c.set_forkserver_preload(["torch", "transformers", "peft", "gguf", "transformers.modeling_gguf_pytorch_utils",
                              "dmoe.train", "dmoe.base", "dmoe.lora_gguf",
                              "dmoe.route.router", "dmoe.export.merge", "dmoe.evals.behaviour", "crash_writers"])
    return c


def _run(ctx, writer: str, root: Path, params: dict, kill_at: int, report: Path | None = None, after_s: float = 0.0) -> int:
    p = ctx.Process(target=child, args=(writer, str(root), kill_at, params, str(report) if report else None, after_s))
    p.start()
    p.join(300)
    if p.is_alive():
        p.kill()
        p.join(10)
        pytest.fail(f"{writer}: the writer did not finish in 300 s (kill point {kill_at})")
    assert p.exitcode is not None
    return p.exitcode


def debris(root: Path) -> list[str]:
    """Temp files and folders a writer left anywhere under ``root`` (locks are not debris)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*") if p.name.endswith(".tmp"))


def crash_matrix(ctx, tmp_path: Path, writer: str, template: Path, params, after_kill, after_rerun, *,
                 rerun_needed=lambda root: True, n: int = POINTS, next_writer=lambda root: None) -> dict:
    """Count the writer's events on a copy of ``template`` (and time it), then for each kill
    point: a fresh copy, the writer killed there, ``after_kill(root)``, the writer again
    without a kill (unless ``rerun_needed`` says the write had completed: then ``next_writer``,
    the first step of the next command), ``after_rerun(root)``, and no debris. Kill points: POINTS seeded file events (between steps) and POINTS seeded
    moments of the writer's run (inside steps)."""
    root = tmp_path / f"{writer}-count"
    shutil.copytree(template, root, symlinks=True)
    report = tmp_path / f"{writer}-events.json"
    assert _run(ctx, writer, root, params(root), 0, report) == 0
    measured = json.loads(report.read_text())
    events, seconds = measured["events"], measured["seconds"]
    assert events >= 3, f"{writer}: only {events} file events seen; the kill switch is not reaching the writer"
    rng = random.Random(f"crash:{writer}")
    points = [("event", k) for k in sorted(rng.sample(range(1, events + 1), min(n, events)))]
    points += [("moment", round(rng.uniform(0.02, 1.0) * seconds, 4)) for _ in range(n)]
    killed = 0
    for i, (kind, at) in enumerate(points):
        root = tmp_path / f"{writer}-{i}"
        shutil.copytree(template, root, symlinks=True)
        code = _run(ctx, writer, root, params(root), at if kind == "event" else -1, after_s=at if kind == "moment" else 0.0)
        if kind == "event":
            assert code == -9, f"{writer}: expected a SIGKILL at event {at} of {events}, got exit {code}"
        else:
            assert code in (-9, 0), f"{writer}: exit {code} with a kill timed at {at} s"
        killed += code == -9
        after_kill(root)
        if code == -9 and rerun_needed(root):
            assert _run(ctx, writer, root, params(root), -1) == 0, f"{writer}: the rerun after a kill at {kind} {at} failed"
        else:
            next_writer(root)
        after_rerun(root)
        assert debris(root) == [], f"{writer}: a kill at {kind} {at} left {debris(root)}"
        shutil.rmtree(root)
    RESULTS[writer] = {"points_per_kind": n, "events": events, "seconds": round(seconds, 3), "points": points, "killed": killed}
    return RESULTS[writer]


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    out = os.environ.get("DMOE_CRASH_REPORT")
    if out and RESULTS:
        Path(out).write_text(json.dumps({"points_per_writer": POINTS, "writers": RESULTS}, indent=2) + "\n")


# ---------------------------------------------------------------- kill -9 at seeded points
def test_checkpoints_survive_kills(ctx, tmp_path):
    from dmoe.train.checkpoint import TrainerState, list_checkpoints, load_checkpoint, save_checkpoint

    template = tmp_path / "template"
    out = template / "out"
    trainable, opt, sched = checkpoint_objects(1)
    save_checkpoint(out, TrainerState(1, 10, 100, 1.0, "digest"), trainable, opt, sched, keep=1)

    def loads(root: Path) -> list[int]:
        steps = []
        for step, path in list_checkpoints(root / "out"):
            w, o, s = checkpoint_objects(0)
            assert load_checkpoint(path, w, o, s).step == step  # verified against its manifest, then read
            want, _, _ = checkpoint_objects(step)
            assert torch.equal(w["w"], want["w"]), "a checkpoint holds other weights than its step's"
            steps.append(step)
        return steps

    def after_kill(root: Path) -> None:
        assert loads(root) in ([1], [2], [1, 2])  # the old one, the new one, or both: never none, never half

    def after_rerun(root: Path) -> None:
        assert loads(root) == [2]

    crash_matrix(ctx, tmp_path, "checkpoint", template, lambda root: {"home": str(root / "home"), "out": str(root / "out"),
                                                                     "step": 2}, after_kill, after_rerun)


def test_a_training_run_killed_anywhere_resumes_to_the_same_expert(ctx, tmp_path, tiny_train_cfg):
    """Checkpoints every step and the expert directory: after a kill there is a complete expert
    or none (checkpoints that verify); the same command finishes it, with the uninterrupted run's weights."""
    from dmoe.experts import is_expert_dir, load_expert, read_peft_adapter
    from dmoe.train.checkpoint import clean_stale_tmp, list_checkpoints, verify_checkpoint

    template = tmp_path / "template"
    template.mkdir()
    ref_out = tmp_path / "reference"

    def params(root: Path) -> dict:
        out = root / "out" if root != ref_out else ref_out
        return {"home": str(root / "home"),
                "overrides": tiny_train_cfg(out, max_steps=3, save_steps=1, num_train_epochs=1)}

    assert _run(ctx, "train", ref_out, params(ref_out), -1) == 0
    want = load_file(str(ref_out / "adapter_model.safetensors"))

    def complete(root: Path) -> bool:
        return is_expert_dir(root / "out") and (root / "out" / "adapter_model.safetensors").is_file()

    def after_kill(root: Path) -> None:
        out = root / "out"
        for _, ck in list_checkpoints(out):
            verify_checkpoint(ck)
        if complete(root):
            read_peft_adapter(load_expert(out))
        else:
            assert not (out / "adapter_model.safetensors").exists() and not (out / "expert.yaml").exists()

    def after_rerun(root: Path) -> None:
        got = load_file(str(root / "out" / "adapter_model.safetensors"))
        assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)
        verify_manifest(root / "out", ExpertError)

    # A kill while the finished run removes its checkpoints leaves a dead writer's folder: the
    # next `dmoe train` into that folder removes it first (and then says the expert exists).
    crash_matrix(ctx, tmp_path, "train", template, params, after_kill, after_rerun,
                 rerun_needed=lambda root: not complete(root) or bool(list_checkpoints(root / "out")),
                 next_writer=lambda root: clean_stale_tmp(root / "out"))


@pytest.fixture(scope="module")
def gguf_home(tmp_path_factory, tiny_gguf_base):
    """A $DMOE_HOME holding the tiny GGUF base's dequantised copy already."""
    from dmoe.base import hf_dir

    home = tmp_path_factory.mktemp("home")
    mp_ = pytest.MonkeyPatch()
    mp_.setenv("DMOE_HOME", str(home))
    hf_dir(tiny_gguf_base)
    mp_.undo()
    return home


def test_the_gguf_adapter_cache_survives_kills(ctx, tmp_path, tiny_gguf_base, tiny_gguf_experts, gguf_home):
    from gguf import GGUFReader

    template = tmp_path / "template"
    shutil.copytree(gguf_home, template / "home")
    params = lambda root: {"home": str(root / "home"), "expert": str(tiny_gguf_experts / "alpha"),  # noqa: E731
                           "base": str(tiny_gguf_base.path)}
    ref = tmp_path / "ref"
    shutil.copytree(template, ref)
    assert _run(ctx, "gguf_adapter_cache", ref, params(ref), -1) == 0
    (want,) = (ref / "home" / "gguf-adapters").glob("*.gguf")

    def after_kill(root: Path) -> None:
        for f in (root / "home" / "gguf-adapters").glob("*.gguf"):  # any file in place is whole
            assert f.read_bytes() == want.read_bytes()
            GGUFReader(f)

    def after_rerun(root: Path) -> None:
        (f,) = (root / "home" / "gguf-adapters").glob("*.gguf")
        assert f.read_bytes() == want.read_bytes()

    crash_matrix(ctx, tmp_path, "gguf_adapter_cache", template, params, after_kill, after_rerun)


def test_the_dequantised_base_cache_survives_kills(ctx, tmp_path, tiny_gguf_base):
    from dmoe.base import BaseModelError

    template = tmp_path / "template"
    (template / "home").mkdir(parents=True)

    def after_kill(root: Path) -> None:
        for d in (root / "home" / "bases").glob("gguf-*"):
            assert verify_manifest(d, BaseModelError) and (d / "config.json").is_file()

    def after_rerun(root: Path) -> None:
        (d,) = (root / "home" / "bases").glob("gguf-*")
        assert verify_manifest(d, BaseModelError)
        from transformers import AutoConfig

        AutoConfig.from_pretrained(d)

    crash_matrix(ctx, tmp_path, "base_cache", template,
                 lambda root: {"home": str(root / "home"), "base": str(tiny_gguf_base.path)}, after_kill, after_rerun,
                 n=SLOW_POINTS)


@pytest.fixture(scope="module")
def routed_experts(tmp_path_factory, tiny_experts):
    """The tiny experts with a router (hash encoder, centroids) at threshold 0.1."""
    import numpy as np

    from dmoe.experts import find_experts
    from dmoe.route.classifiers import Classifier
    from dmoe.route.decision import NONE
    from dmoe.route.router import ROUTER_DIR, EmbeddingRouter, expert_fingerprint

    root = tmp_path_factory.mktemp("routed")
    shutil.copytree(tiny_experts, root / "experts")
    experts = find_experts(root / "experts")
    classes = [e.name for e in experts] + [NONE]
    centroids = np.random.default_rng(0).normal(size=(len(classes), HashEncoder.dim)).astype(np.float32)
    r = EmbeddingRouter(HashEncoder(), classes, Classifier("centroid", {"centroids": centroids}, len(classes)), 0.1,
                        {e.name: expert_fingerprint(e) for e in experts})
    r.save(root / "experts" / ROUTER_DIR)
    return root / "experts"


def test_router_files_survive_kills(ctx, tmp_path, routed_experts):
    from dmoe.experts import find_experts
    from dmoe.route.router import ROUTER_DIR, load_router

    template = tmp_path / "template"
    shutil.copytree(routed_experts, template / "experts")

    def threshold(root: Path) -> float:
        return load_router(root / "experts" / ROUTER_DIR, find_experts(root / "experts"), HashEncoder()).threshold

    crash_matrix(ctx, tmp_path, "router", template,
                 lambda root: {"home": str(root / "home"), "dir": str(root / "experts" / ROUTER_DIR),
                               "experts": str(root / "experts"), "threshold": 0.2},
                 lambda root: threshold(root) in (0.1, 0.2), lambda root: threshold(root) == 0.2)
    # (the asserts are in threshold(): load_router refuses anything damaged or mixed)


def test_export_and_merge_outputs_survive_kills(ctx, tmp_path, tiny_base, tiny_experts):
    from dmoe.base import BaseModelError, load_base

    template = tmp_path / "template"
    template.mkdir()
    ref = tmp_path / "ref"
    ref.mkdir()
    args = lambda root, outtype: {"home": str(root / "home"), "expert": str(tiny_experts / "alpha"),  # noqa: E731
                                  "base": str(tiny_base), "out": str(root / "alpha.gguf"), "outtype": outtype}
    assert _run(ctx, "export_gguf", template, args(template, "f16"), -1) == 0  # the earlier export, kept until replaced
    assert _run(ctx, "export_gguf", ref, args(ref, "f32"), -1) == 0
    old, new = (template / "alpha.gguf").read_bytes(), (ref / "alpha.gguf").read_bytes()
    crash_matrix(ctx, tmp_path, "export_gguf", template, lambda root: args(root, "f32"),
                 lambda root: (root / "alpha.gguf").read_bytes() in (old, new),
                 lambda root: (root / "alpha.gguf").read_bytes() == new)

    merged = lambda root: root / "merged"  # noqa: E731
    empty = tmp_path / "empty"
    empty.mkdir()

    def after_kill(root: Path) -> None:
        assert not merged(root).exists() or verify_manifest(merged(root), BaseModelError)

    def after_rerun(root: Path) -> None:
        assert verify_manifest(merged(root), BaseModelError)
        load_base(merged(root))

    crash_matrix(ctx, tmp_path, "merge", empty,
                 lambda root: {"home": str(root / "home"), "expert": str(tiny_experts / "alpha"), "base": str(tiny_base),
                               "out": str(merged(root))},
                 after_kill, after_rerun, rerun_needed=lambda root: not merged(root).exists())


def test_bench_results_survive_kills(ctx, tmp_path):
    from dmoe.evals.report import _load

    template = tmp_path / "template"
    run = template / "run"
    run.mkdir(parents=True)
    (run / "vanilla.log").write_text("Q: question 0?\n---\n")
    bench_run(run)._write(*bench_answers(), partial=True)  # an earlier, interrupted set of results

    def status(root: Path) -> str:
        s = _load(root / "run")  # verifies the three files against their manifest
        assert (root / "run" / "vanilla.log").read_text().startswith("Q: question 0?")  # the log is kept
        return s["status"]

    crash_matrix(ctx, tmp_path, "bench", template,
                 lambda root: {"home": str(root / "home"), "out": str(root / "run"), "partial": False},
                 lambda root: status(root) in ("partial: interrupted", "complete"),
                 lambda root: status(root) == "complete")


# ---------------------------------------------------------------- files damaged by hand
def _flip(f: Path, at: int | None = None) -> None:
    data = bytearray(f.read_bytes())
    i = len(data) - 5 if at is None else at
    data[i] ^= 0xFF
    f.write_bytes(bytes(data))


def test_damaged_files_are_detected_never_trusted(tmp_path, tiny_base, tiny_experts, routed_experts, monkeypatch):
    from dmoe.base import BaseModelError, load_base
    from dmoe.evals.behaviour import BenchError
    from dmoe.evals.report import _load
    from dmoe.experts import find_experts, load_expert
    from dmoe.export.merge import merge_expert
    from dmoe.route.router import ROUTER_DIR, load_router
    from dmoe.route.text import RouteError
    from dmoe.train.checkpoint import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint

    monkeypatch.setenv("DMOE_HOME", str(tmp_path / "home"))
    # an expert's weights, flipped or cut: refused, with the fix
    e = tmp_path / "alpha"
    shutil.copytree(tiny_experts / "alpha", e)
    _flip(e / "adapter_model.safetensors")
    with pytest.raises(ExpertError, match="does not match the digest written with it.*Retrain the expert"):
        load_expert(e)
    with open(e / "adapter_model.safetensors", "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(ExpertError, match="has 100 bytes, not the"):
        load_expert(e)
    # checkpoints: the damaged newest one is skipped, resume takes the one before; loading it is refused
    out = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(out, TrainerState(step, 10, 100, 1.0, "d"), *checkpoint_objects(step), keep=None)
    _flip(out / "checkpoint-2" / "optimizer.pt")
    assert latest_checkpoint(out) == out / "checkpoint-1"
    with pytest.raises(TrainError, match="checkpoint-2/optimizer.pt does not match"):
        load_checkpoint(out / "checkpoint-2", *checkpoint_objects(0))
    # the router's weights
    r = tmp_path / "routed"
    shutil.copytree(routed_experts, r)
    _flip(r / ROUTER_DIR / "router.safetensors")
    with pytest.raises(RouteError, match="router.safetensors does not match.*dmoe route train"):
        load_router(r / ROUTER_DIR, find_experts(r), HashEncoder())
    # a merged model used as a base
    m = merge_expert(load_expert(tiny_experts / "alpha"), tmp_path / "merged", tiny_base)
    _flip(m / "model.safetensors")
    with pytest.raises(BaseModelError, match="model.safetensors does not match"):
        load_base(m)
    # bench results
    run = tmp_path / "bench" / "run"
    run.mkdir(parents=True)
    bench_run(run)._write(*bench_answers(), partial=False)
    (run / "summary.json").write_text((run / "summary.json").read_text().replace("complete", "complete!"))
    with pytest.raises(BenchError, match="summary.json has .* bytes, not the"):
        _load(run)


def test_damaged_caches_are_rebuilt(tmp_path, tiny_gguf_base, tiny_gguf_experts, monkeypatch, caplog):
    from dmoe.base import hf_dir
    from dmoe.experts import load_expert
    from dmoe.lora_gguf import cached_adapter_gguf

    monkeypatch.setenv("DMOE_HOME", str(tmp_path / "home"))
    d = hf_dir(tiny_gguf_base)
    good = (d / "model.safetensors").read_bytes()
    _flip(d / "model.safetensors")
    assert hf_dir(tiny_gguf_base) == d and (d / "model.safetensors").read_bytes() == good
    assert "converting again" in caplog.text
    expert = load_expert(tiny_gguf_experts / "alpha")
    f = cached_adapter_gguf(expert, tiny_gguf_base)
    good = f.read_bytes()
    _flip(f)
    assert cached_adapter_gguf(expert, tiny_gguf_base) == f and f.read_bytes() == good
    f.write_bytes(good[:1000])  # cut short
    assert cached_adapter_gguf(expert, tiny_gguf_base) == f and f.read_bytes() == good
    assert "rebuilding" in caplog.text


# ---------------------------------------------------------------- two writers of one cache
def test_two_processes_filling_one_cache_entry_at_once(ctx, tmp_path, tiny_gguf_base, tiny_gguf_experts):
    """Two servers starting together on a new base and adapter: the lock lets one convert and
    the other wait; both end with the same whole files (2 rounds, each on an empty cache)."""
    from gguf import GGUFReader

    from dmoe.base import BaseModelError

    for i in range(2):
        home = tmp_path / f"home{i}"
        params = {"home": str(home), "expert": str(tiny_gguf_experts / "alpha"), "base": str(tiny_gguf_base.path)}
        procs = [ctx.Process(target=child, args=("gguf_adapter_cache", str(home), -1, params, None)) for _ in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(300)
            assert p.exitcode == 0
        (d,) = (home / "bases").glob("gguf-*")
        assert verify_manifest(d, BaseModelError)
        (f,) = (home / "gguf-adapters").glob("*.gguf")
        GGUFReader(f)
        assert debris(home) == []


# ---------------------------------------------------------------- a full disk
def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _tmpfs(disk, "96k"):
        pytest.skip("a full-disk test needs a small tmpfs (root and mount); not permitted here")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_gives_one_clear_line_and_keeps_the_old_file(small_disk, tiny_base, tiny_experts, tmp_path):
    """`dmoe export` onto a full disk: exit 2, one line that says the disk is full, the earlier
    export byte for byte as it was, and no temp file left."""
    out = small_disk / "alpha.gguf"
    dmoe = [sys.executable, "-m", "dmoe.cli"]
    env = {**os.environ, "DMOE_HOME": str(tmp_path / "home"), "COLUMNS": "300"}
    args = ["export", str(tiny_experts / "alpha"), "--base", str(tiny_base), "-o", str(out)]
    first = subprocess.run([*dmoe, *args, "--outtype", "q8_0"], capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    before = out.read_bytes()
    filler = small_disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:  # fill what is left
        for _ in range(10_000):
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    r = subprocess.run([*dmoe, *args, "--outtype", "f32"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"no space left on device writing {out}" in lines[0].lower(), r.stderr
    assert "Traceback" not in r.stderr
    assert out.read_bytes() == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["alpha.gguf", "filler"]


def test_a_full_dmoe_home_is_a_clear_error_and_leaves_no_half_cache(small_disk, tiny_gguf_base, monkeypatch):
    from dmoe.base import hf_dir

    monkeypatch.setenv("DMOE_HOME", str(small_disk))
    with pytest.raises(OSError) as info:  # the tiny base's copy (~2 MB) cannot fit in 96 KiB
        hf_dir(tiny_gguf_base)
    assert "No space left on device" in str(info.value) or info.value.errno == 28
    assert not list((small_disk / "bases").glob("gguf-*")) and debris(small_disk) == []
