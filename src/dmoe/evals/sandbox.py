"""Run untrusted Python (a model's answer under test) in a throw-away subprocess.

    result = run_python("def f(x): return x * 2\nassert f(2) == 4\n", timeout_s=5)
    result.passed, result.detail, result.isolation

What it does: a fresh interpreter in isolated mode (``-I``: no user site, no PYTHON* env,
no current directory on the path) with an empty environment, in a temporary directory
removed afterwards, in its own session (the whole process group is killed on timeout),
under rlimits (CPU seconds, address space, file size, open files, and processes for
non-root users), and in a new network namespace with no interfaces up where the kernel
allows one (root, or an unprivileged user namespace): no network at all.

What it does not: it is not a container. The code runs as the same user, so it can read
any file that user can read; root is not limited by the process-count rlimit. It guards
a benchmark against mistakes and runaway code, not a determined attacker: run benchmarks
of untrusted models as an unprivileged user, or inside a container, for that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

# Runs first inside the child interpreter (no preexec_fn: the benchmark calls this from
# threads): drop the network, set the limits, then run the answer as __main__.
_BOOT = """
import ctypes, os, resource, runpy, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x40000000) != 0 and libc.unshare(0x10000000 | 0x40000000) != 0:
    os.write(2, b"NETNS-FAILED\\n")
cpu, mem = int(sys.argv[1]), int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
resource.setrlimit(resource.RLIMIT_AS, (mem << 20, mem << 20))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
if os.geteuid() != 0:
    resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
sys.argv = ["answer.py"]
runpy.run_path("answer.py", run_name="__main__")
"""


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    detail: str  # "ok", "timeout after 5 s", or the last line of stderr
    isolation: str  # "netns", or "no network isolation" where the kernel refused a namespace


def run_python(code: str, *, timeout_s: float = 10.0, mem_mb: int = 512) -> SandboxResult:
    """Run ``code``; passed = exit status 0 within the time limit."""
    with tempfile.TemporaryDirectory(prefix="dmoe-sandbox-") as tmp:
        with open(os.path.join(tmp, "answer.py"), "w", encoding="utf-8") as fh:
            fh.write(code)
        cpu = max(1, int(timeout_s) + 1)
        proc = subprocess.Popen([sys.executable, "-I", "-c", _BOOT, str(cpu), str(mem_mb)], cwd=tmp,
                                env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            return SandboxResult(False, f"timeout after {timeout_s:g} s", _isolation(err))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    text = err.decode("utf-8", "replace").replace("NETNS-FAILED\n", "").strip()
    if proc.returncode == 0:
        return SandboxResult(True, "ok", _isolation(err))
    tail = text.splitlines()[-1] if text else f"exit status {proc.returncode}"
    return SandboxResult(False, tail[:300], _isolation(err))


def _isolation(err: bytes) -> str:
    return "no network isolation" if b"NETNS-FAILED" in err else "netns"
