"""Benchmark runs from the web UI: ``dmoe bench`` against this server, one at a time.

    runs = BenchRuns(runs_dir)
    run = runs.start(url, experts_root, questions, ["vanilla", "expert:cooking", "auto"], limit=8)
    runs.get(run["id"])      # state, the summary when done, the report's path

Each run is a child process (``dmoe bench --url <this server>``): its answers come from the
engine that serves, through the same API, and it writes ``<runs_dir>/bench/<id>/`` with
``report.html`` and ``summary.json`` (atomically, as ``dmoe bench`` does).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from dmoe.errors import ConflictError, NotFoundError, RequestError

MODE_PREFIXES = ("vanilla", "auto", "expert:")


class BenchRuns:
    def __init__(self, runs_dir: Path, python: str = sys.executable):
        self.dir = runs_dir / "bench"
        self.python = python
        self._lock = threading.Lock()
        self._procs: dict[str, subprocess.Popen] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def start(self, url: str, experts_root: Path, questions: Path, modes: list[str], limit: int) -> dict[str, Any]:
        if not modes or any(not (m == "vanilla" or m == "auto" or m.startswith("expert:")) for m in modes):
            raise RequestError(f"modes {modes!r}: give vanilla, auto and/or expert:NAME")
        if not questions.is_file():
            raise RequestError(f"no held-out questions at {questions}: generate a dataset from the bundled templates "
                               "(it adds them) or put a heldout.jsonl in the data folder")
        with self._lock:
            if any(p.poll() is None for p in self._procs.values()):
                raise ConflictError("a benchmark is already running; wait for it to end")
            run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
            self.dir.mkdir(parents=True, exist_ok=True)
            cmd = [self.python, "-m", "dmoe.cli", "bench", "--url", url, "--experts", str(experts_root),
                   "--questions", str(questions), "--modes", ",".join(modes), "--limit", str(limit),
                   "--out", str(self.dir), "--run-id", run_id]
            log = open(self.dir / f"{run_id}.log", "wb")
            self._procs[run_id] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            log.close()
            self._meta[run_id] = {"id": run_id, "modes": modes, "limit": limit, "started": time.time()}
        return self.get(run_id)

    def get(self, run_id: str) -> dict[str, Any]:
        meta = self._meta.get(run_id)
        folder = self.dir / run_id
        if meta is None and not folder.is_dir():
            raise NotFoundError(f"no benchmark run {run_id!r}")
        proc = self._procs.get(run_id)
        rc = proc.poll() if proc is not None else 0
        state = "running" if rc is None else ("done" if rc == 0 else "failed")
        summary = None
        if (folder / "summary.json").is_file():
            try:
                summary = json.loads((folder / "summary.json").read_text())
            except ValueError:
                summary = None
        tail = (self.dir / f"{run_id}.log").read_text(errors="replace").splitlines()[-5:] \
            if (self.dir / f"{run_id}.log").is_file() else []
        return {**(meta or {"id": run_id}), "state": state, "returncode": rc,
                "report": f"/ui/api/bench/{run_id}/report" if (folder / "report.html").is_file() else None,
                "summary": summary, "log_tail": tail}

    def report(self, run_id: str) -> Path:
        path = self.dir / run_id / "report.html"
        if "/" in run_id or ".." in run_id or not path.is_file():
            raise NotFoundError(f"benchmark run {run_id!r} has no report (yet)")
        return path

    def close(self) -> None:
        from dmoe.webui.training import terminate

        for p in self._procs.values():
            if p.poll() is None:
                terminate(p)
