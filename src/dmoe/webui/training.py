"""Training runs for the web UI: one at a time per server, queued beyond that.

    q = TrainingQueue(runs_dir, experts_root, data_dir)
    run = q.submit(cfg_dict)        # validated as `dmoe train` validates; output confined to the experts root
    q.progress(run.id)              # state, step/total, ETA, tokens/s, loss points, log tail
    q.stop(run.id); q.resume(run.id)

Each run is ``dmoe train <run>/train.yaml --status-file <run>/status.json`` in a child
process, so a crash or a stop never touches the server, and a stopped run resumes from its
checkpoints with the same command. Serving is not starved: the child runs at a lower CPU
priority (``nice`` 10) with ``threads`` torch threads (default 1, half of a 2-core machine),
so the engine's own threads win the cores when both want them (docs/benchmarks.md measures
serving latency during a run). The run list is kept in ``runs_dir`` (``runs.json``, written
atomically), so a page reload, a second tab or a restarted server find the runs where they are.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dmoe.config import IGNORED_LLAMAFACTORY_KEYS, TrainConfig, format_validation_error
from dmoe.data.formats import DatasetError
from dmoe.errors import ConflictError, NotFoundError, RequestError
from dmoe.experts import within_roots
from dmoe.io import atomic_write_text, read_jsonl
from dmoe.train.progress import LOG_FILE
from dmoe.webui.datasets import check_name

log = logging.getLogger(__name__)
RUNS_FILE = "runs.json"
STOP_GRACE_S = 10.0
LOG_TAIL = 40
# keys the UI sets itself: where the run writes and reads (confined to the server's roots)
CONFINED_KEYS = ("output_dir", "dataset_dir", "overwrite_output_dir", "resume_from_checkpoint")


@dataclass
class Run:
    id: str
    name: str                      # the expert's name = its folder under the experts root
    output_dir: str
    config: str                    # the run's YAML path
    state: str = "queued"          # queued | running | done | failed | stopped
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    returncode: int | None = None
    error: str | None = None
    pid: int | None = None


def check_config(values: dict[str, Any], experts_root: Path, data_dir: Path) -> TrainConfig:
    """The form's values as a training config, validated with the same messages as ``dmoe train``;
    the output folder is ``<experts root>/<expert_name>`` and the data folder is the server's."""
    values = {k: v for k, v in values.items() if v is not None and v != "" and k not in IGNORED_LLAMAFACTORY_KEYS}
    for key in CONFINED_KEYS:
        if key in values:
            raise RequestError(f"'{key}' is set by the web UI (runs write under the experts folder and read the "
                               "data folder); leave it out")
    name = values.get("expert_name")
    if not isinstance(name, str) or not name:
        raise RequestError("'expert_name' is required: it names the expert and its folder")
    try:
        check_name(name)
    except DatasetError as exc:
        raise RequestError(str(exc).replace("dataset name", "expert_name")) from None
    out = experts_root / name
    if out.is_symlink() or (out.exists() and not within_roots(out, [experts_root])):
        raise RequestError(f"{out} is a link; the web UI writes only inside {experts_root}: choose another expert_name")
    try:
        return TrainConfig(**values, output_dir=str(out), dataset_dir=str(data_dir))
    except ValidationError as exc:
        raise RequestError(format_validation_error(exc, TrainConfig, "train config")) from None


def config_yaml(cfg: TrainConfig) -> str:
    """The YAML that reproduces the run with ``dmoe train`` (only what differs from the defaults)."""
    data = cfg.model_dump(exclude_defaults=True)
    for key in ("output_dir", "dataset_dir"):
        data[key] = getattr(cfg, key)
    return yaml.safe_dump(data, sort_keys=False)


class TrainingQueue:
    """One training child at a time; the rest wait in submission order."""

    def __init__(self, runs_dir: Path, experts_root: Path, data_dir: Path, *, threads: int = 1, nice: int = 10,
                 python: str = sys.executable):
        self.runs_dir, self.experts_root, self.data_dir = runs_dir, experts_root, data_dir
        self.threads, self.nice, self.python = threads, nice, python
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._proc: subprocess.Popen | None = None
        self._stopping: set[str] = set()
        self._closed = False
        self.runs: dict[str, Run] = self._load()
        self._thread = threading.Thread(target=self._worker, name="dmoe-webui-train", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- bookkeeping
    def _load(self) -> dict[str, Run]:
        path = self.runs_dir / RUNS_FILE
        if not path.is_file():
            return {}
        runs = {}
        for raw in json.loads(path.read_text()):
            run = Run(**raw)
            if run.state in ("running", "queued"):  # the server that ran it is gone; its checkpoints remain
                run.state, run.error = "stopped", "the server stopped during this run; resume continues from its checkpoints"
            runs[run.id] = run
        return runs

    def _save(self) -> None:
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.runs_dir / RUNS_FILE, json.dumps([asdict(r) for r in self.runs.values()], indent=1) + "\n")

    def get(self, run_id: str) -> Run:
        run = self.runs.get(run_id)
        if run is None:
            raise NotFoundError(f"no training run {run_id!r} (runs: {', '.join(self.runs) or 'none'})")
        return run

    # ---------------------------------------------------------------- actions
    def submit(self, values: dict[str, Any]) -> Run:
        cfg = check_config(values, self.experts_root, self.data_dir)
        from dmoe.data import load_conversations

        try:  # the data must load now, not minutes later in the child
            load_conversations(cfg.datasets, cfg.dataset_dir, max_samples=1)
        except Exception as exc:
            raise RequestError(f"dataset: {exc}") from None
        with self._lock:
            name = cfg.expert_name or Path(cfg.output_dir).name
            busy = [r for r in self.runs.values() if r.name == name and r.state in ("queued", "running")]
            if busy:
                raise ConflictError(f"expert {name!r} already has a run {busy[0].state} ({busy[0].id}); stop it or "
                                    "choose another expert_name")
            run_id = uuid.uuid4().hex[:12]
            folder = self.runs_dir / run_id
            folder.mkdir(parents=True)
            atomic_write_text(folder / "train.yaml", config_yaml(cfg))
            run = Run(id=run_id, name=name, output_dir=cfg.output_dir, config=str(folder / "train.yaml"))
            self.runs[run_id] = run
            self._save()
            self._wake.notify_all()
        log.info("training run %s (%s) queued", run_id, name)
        return run

    def stop(self, run_id: str) -> Run:
        """A queued run leaves the queue; a running one gets SIGTERM (SIGKILL after a grace period).
        Its checkpoints stay, so :meth:`resume` continues from the last one."""
        with self._lock:
            run = self.get(run_id)
            if run.state == "queued":
                run.state, run.ended = "stopped", time.time()
                self._save()
                return run
            if run.state != "running":
                raise ConflictError(f"run {run_id} is {run.state}; only a queued or running run can be stopped")
            self._stopping.add(run_id)
            proc = self._proc
        if proc is not None:
            terminate(proc)
        return self.get(run_id)

    def resume(self, run_id: str) -> Run:
        """Queue a stopped or failed run again: the same config, from its latest checkpoint."""
        with self._lock:
            run = self.get(run_id)
            if run.state not in ("stopped", "failed"):
                raise ConflictError(f"run {run_id} is {run.state}; only a stopped or failed run can be resumed")
            busy = [r for r in self.runs.values() if r.name == run.name and r.state in ("queued", "running")]
            if busy:
                raise ConflictError(f"expert {run.name!r} already has a run {busy[0].state} ({busy[0].id})")
            run.state, run.error, run.returncode, run.ended = "queued", None, None, None
            self._save()
            self._wake.notify_all()
        return run

    def close(self) -> None:
        with self._lock:
            self._closed = True
            proc = self._proc
            self._wake.notify_all()
        if proc is not None and proc.poll() is None:
            terminate(proc)
        self._thread.join(STOP_GRACE_S + 5)

    # ---------------------------------------------------------------- the worker
    def _next(self) -> Run | None:
        with self._lock:
            while not self._closed:
                queued = sorted((r for r in self.runs.values() if r.state == "queued"), key=lambda r: r.created)
                if queued:
                    return queued[0]
                self._wake.wait()
            return None

    def _worker(self) -> None:
        while (run := self._next()) is not None:
            folder = Path(run.config).parent
            (folder / "status.json").unlink(missing_ok=True)
            cmd = [self.python, "-m", "dmoe.cli", "train", run.config, "--no-progress",
                   "--status-file", str(folder / "status.json")]
            env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "MKL_NUM_THREADS": str(self.threads)}
            with self._lock:
                if run.state != "queued" or self._closed:
                    continue
                out = open(folder / "train.log", "ab")
                nice = shutil.which("nice")  # (preexec_fn is not safe in a threaded server)
                if nice and self.nice:
                    cmd = [nice, "-n", str(self.nice), *cmd]
                try:
                    self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
                except OSError as exc:
                    run.state, run.error, run.ended = "failed", f"could not start training: {exc}", time.time()
                    self._save()
                    out.close()
                    continue
                run.state, run.started, run.pid = "running", time.time(), self._proc.pid
                self._save()
                proc = self._proc
            log.info("training run %s started (pid %d)", run.id, proc.pid)
            rc = proc.wait()
            out.close()
            with self._lock:
                self._proc = None
                run.returncode, run.ended, run.pid = rc, time.time(), None
                if run.id in self._stopping:
                    self._stopping.discard(run.id)
                    run.state = "stopped"
                elif rc == 0:
                    run.state = "done"
                else:
                    run.state, run.error = "failed", _last_error(folder / "train.log") or f"dmoe train exited with {rc}"
                self._save()
            log.info("training run %s %s", run.id, run.state)

    # ---------------------------------------------------------------- what the page shows
    def progress(self, run_id: str) -> dict[str, Any]:
        """State, step/total, ETA, tokens/s, the loss and eval-loss points, and the log tail."""
        run = self.get(run_id)
        folder = Path(run.config).parent
        status = _read_json(folder / "status.json")
        rows = [r for _, r in read_jsonl(Path(run.output_dir) / LOG_FILE, torn_tail_ok=True)] \
            if (Path(run.output_dir) / LOG_FILE).is_file() else []
        step, total = status.get("step"), status.get("total_steps")
        tps, elapsed = status.get("tokens_per_s"), status.get("elapsed_s")
        eta = None
        if run.state == "running" and step and total and elapsed:
            done_from = status.get("resumed_from") or 0
            rate = (step - done_from) / max(elapsed - _elapsed_at(rows, done_from), 1e-6) if step > done_from else None
            eta = round((total - step) / rate, 1) if rate else None
        return {**asdict(run), "step": step, "total_steps": total, "tokens_per_s": tps, "elapsed_s": elapsed, "eta_s": eta,
                "loss": [[r["step"], r["loss"]] for r in rows if "loss" in r],
                "eval_loss": [[r["step"], r["eval_loss"]] for r in rows if "eval_loss" in r],
                "log_tail": _tail(folder / "train.log")}

    def list(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in sorted(self.runs.values(), key=lambda r: r.created, reverse=True)]


def terminate(proc: subprocess.Popen) -> None:
    """SIGTERM (a training run keeps its checkpoints), SIGKILL after ``STOP_GRACE_S``."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _elapsed_at(rows: list[dict], step: int) -> float:
    """The run's elapsed seconds at ``step`` (a resumed run's clock starts there)."""
    at = [r.get("elapsed_s", 0.0) for r in rows if r.get("step") == step and "elapsed_s" in r]
    return at[-1] if at else 0.0


def _tail(path: Path, n: int = LOG_TAIL) -> list[str]:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            return fh.read().decode("utf-8", "replace").splitlines()[-n:]
    except OSError:
        return []


def _last_error(path: Path) -> str | None:
    for line in reversed(_tail(path)):
        if line.strip().startswith("error:"):
            return line.strip().removeprefix("error:").strip()
    return None
