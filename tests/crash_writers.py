"""The crash-safety matrix's writers and the kill switch they run under.

Each writer runs in a child process forked from a server that imported torch and dmoe once
(multiprocessing's forkserver, so a kill point costs milliseconds, not an interpreter start).
The child counts the file-system events under the writer's folder (Python's audit events:
opens, renames, removals, folder creation, links, ``renameat2`` through ctypes) and sends
itself SIGKILL at the k-th: a real ``kill -9`` between two steps of the write, with every
file written so far left as it was (an ``open`` kill leaves a created, empty file).

An audit event comes before its operation, so these kills fall between steps. Kills at
seeded moments (a timer) fall inside steps too: a file half written, a rename under way.

``k = 0`` runs the writer to the end and reports how many events it made and how long it
took; ``k = -1`` runs it with no kill (the rerun after a crash).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

EVENTS = frozenset({"open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "os.link", "os.chmod",
                    "os.truncate", "shutil.copyfile", "ctypes.call_function", "os.symlink"})


def _arm(root: str, kill_at: int) -> list[int]:
    count = [0]

    def hook(event: str, args: tuple) -> None:
        if event not in EVENTS or root not in repr(args):
            return
        count[0] += 1
        if count[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)
    return count


def child(writer: str, root: str, kill_at: int, params: dict, report: str | None, kill_after_s: float = 0.0) -> None:
    """The forked child: environment, kill switch, then the writer. ``kill_after_s``: a SIGKILL
    from a timer instead, at a moment inside a write (a file half written), not between steps."""
    import torch

    torch.set_num_threads(1)
    os.environ["DMOE_HOME"] = params["home"]
    count = _arm(root, kill_at)
    if kill_after_s > 0:
        timer = threading.Timer(kill_after_s, os.kill, (os.getpid(), signal.SIGKILL))
        timer.daemon = True
        timer.start()
    t0 = time.perf_counter()
    WRITERS[writer](params)
    if report:
        n, seconds = count[0], time.perf_counter() - t0
        Path(report).write_text(json.dumps({"events": n, "seconds": seconds}))  # outside root: not counted


# ---------------------------------------------------------------- the writers
def checkpoint(p: dict) -> None:
    """``checkpoint-<step>`` beside the previous one (keep 1: the previous one then goes)."""
    from dmoe.train.checkpoint import TrainerState, save_checkpoint

    trainable, opt, sched = checkpoint_objects(p["step"])
    save_checkpoint(Path(p["out"]), TrainerState(p["step"], 10, 100 * p["step"], 1.0, "digest"), trainable, opt, sched,
                    keep=1)


def checkpoint_objects(step: int):
    """A parameter, its AdamW and schedule after ``step`` steps: what a checkpoint holds."""
    import torch

    torch.manual_seed(step)
    w = torch.nn.Parameter(torch.randn(64, 32))
    opt = torch.optim.AdamW([w], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for _ in range(step):
        (w * w).sum().backward()
        opt.step()
        sched.step()
    return {"w": w}, opt, sched


def train(p: dict) -> None:
    """A whole tiny training run: checkpoints every step, then the expert directory."""
    from dmoe.config import load_train_config
    from dmoe.train import train as run

    run(load_train_config(None, p["overrides"]), show_progress=False)


def gguf_adapter_cache(p: dict) -> None:
    from dmoe.base import resolve_base
    from dmoe.experts import load_expert
    from dmoe.lora_gguf import cached_adapter_gguf

    cached_adapter_gguf(load_expert(p["expert"]), resolve_base(p["base"]))


def base_cache(p: dict) -> None:
    from dmoe.base import hf_dir, resolve_base

    hf_dir(resolve_base(p["base"]))


def router(p: dict) -> None:
    """Refit nothing: load the router, change its threshold, save it over the old one."""
    from conftest import HashEncoder
    from dmoe.experts import find_experts
    from dmoe.route.router import load_router

    r = load_router(p["dir"], find_experts(p["experts"]), HashEncoder())
    r.threshold = p["threshold"]
    r.save(p["dir"])


def export_gguf(p: dict) -> None:
    from dmoe.base import resolve_base
    from dmoe.experts import load_expert
    from dmoe.lora_gguf import write_adapter_gguf

    write_adapter_gguf(load_expert(p["expert"]), p["out"], resolve_base(p["base"]), p["outtype"])


def merge(p: dict) -> None:
    from dmoe.experts import load_expert
    from dmoe.export.merge import merge_expert

    merge_expert(load_expert(p["expert"]), p["out"], p["base"])


def bench(p: dict) -> None:
    """The end of a benchmark run: summary, comparison and answers written over a partial set."""
    bench_run(Path(p["out"]))._write(*bench_answers(), partial=p["partial"])


def bench_run(out: Path):
    from dmoe.evals.behaviour import BenchRun, Question, parse_mode

    qs = [Question(f"question {i}?", "math") for i in range(5)]
    return BenchRun("http://127.0.0.1:9", qs, [parse_mode("vanilla")], out)


def bench_answers():
    from dmoe.evals.behaviour import Answer

    return {"vanilla": [Answer("vanilla", i, f"answer {i}", tokens=3, latency_s=0.1) for i in range(5)]}, {"vanilla": 1.0}


WRITERS = {"checkpoint": checkpoint, "train": train, "gguf_adapter_cache": gguf_adapter_cache, "base_cache": base_cache,
           "router": router, "export_gguf": export_gguf, "merge": merge, "bench": bench}
