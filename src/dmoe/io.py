"""Generic file I/O: atomic writes, content hashes, the cache root, JSONL, CPU features.

Every file dmoe writes goes through :func:`atomic_write_text`, :func:`atomic_write_bytes`
or :func:`atomic_dir`: a reader (or a crash) sees the old content or the new one,
never half of it. Temp files carry the writer's process id, so the next writer removes
what a killed one left. Directories dmoe reads back carry a manifest of sizes and digests
(:func:`write_manifest`, :func:`verify_manifest`): a file cut or edited afterwards is
detected, never trusted. :func:`file_lock` serialises writers of one cache entry.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dmoe.errors import DmoeError

log = logging.getLogger(__name__)


def dmoe_home() -> Path:
    """The cache root: ``$DMOE_HOME`` or ``~/.cache/dmoe``."""
    return Path(os.environ.get("DMOE_HOME") or Path.home() / ".cache" / "dmoe")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(target: Path) -> None:
    """Remove what a killed writer of ``target`` left beside it (``.NAME.PID.*.tmp``, named by
    the writing process's id; only dead processes' files go). If a killed swap left ``target``
    missing and its previous version aside, that version is put back first."""
    if not target.parent.is_dir():
        return
    for p in target.parent.glob(f".{_glob_escape(target.name)}.*.tmp"):
        pid = p.name[len(target.name) + 2:].split(".", 1)[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if p.name.endswith(".old.tmp") and not target.exists():
            os.replace(p, target)  # a swap cut between its two renames: the old version returns
            log.warning("restored %s from %s (a writer was killed while swapping it)", target, p.name)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _tmp_prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


def _fsync_path(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot fsync a directory; the rename is still atomic
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and the folders themselves (durable before the rename)."""
    for dirpath, _, files in os.walk(root):
        for f in files:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath), directory=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=".tmp")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are ordinary user files
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _link_missing(src: Path, dst: Path) -> None:
    """Hard-link (or copy, across devices) each entry of ``src`` that ``dst`` lacks."""
    for entry in src.iterdir():
        to = dst / entry.name
        if to.exists() or entry.name == MANIFEST or (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            continue  # (another writer's temp files are not carried over)
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, to, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(entry), str(to))


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)


@contextmanager
def atomic_dir(target: str | os.PathLike, *, replace: bool = False, carry_over: bool = False,
               manifest: bool = False) -> Iterator[Path]:
    """Build a directory in a hidden temp folder beside ``target``; move it into place when
    the block ends without an error, else remove it.

        with atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(...)

    ``replace=False``: if ``target`` appeared meanwhile (another process won the race),
    the new copy is dropped and the existing one kept. ``replace=True``: an existing
    ``target`` is swapped for the new one in one step (``renameat2`` exchange; where the
    file system cannot, two renames, and a kill between them is repaired by the next
    writer). ``carry_over``: entries of the old ``target`` the block did not write are kept
    (hard links). ``manifest``: a :data:`MANIFEST` of the top-level files' sizes and digests
    is written, for :func:`verify_manifest`. Files are fsynced before the move.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=_tmp_prefix(target), suffix=".tmp"))
    tmp.chmod(0o755)
    try:
        yield tmp
        if carry_over and target.is_dir():
            _link_missing(target, tmp)
        if manifest:
            write_manifest(tmp)
        _fsync_tree(tmp)
        if replace and target.exists():
            if not _exchange(tmp, target):
                old = target.with_name(f"{_tmp_prefix(target)}old.tmp")
                os.replace(target, old)
                os.replace(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, target)
            except OSError:
                if not target.is_dir():  # not a lost race: a real failure
                    raise
        _fsync_path(target.parent, directory=True)
    except Exception as exc:
        if not isinstance(exc, OSError) and "os error 28" in str(exc):  # safetensors' own error for ENOSPC
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target)) from exc
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_tree(path: Path) -> None:
    """Remove a directory so that no reader ever sees it half removed: renamed aside (one
    step) to a temp name of this process, then deleted; a kill in between leaves debris the
    next writer of ``path`` removes, never a partial directory under the real name."""
    aside = path.with_name(f"{_tmp_prefix(path)}del.tmp")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def file_lock(path: str | os.PathLike) -> Iterator[None]:
    """An exclusive lock on ``path`` (created if missing) for the block; the system drops it
    if the process dies, so a killed holder never blocks the next one."""
    import fcntl

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def write_stamp(path: Path, stamp: Path, tag: str = "") -> None:
    """Beside a cached file: ``tag`` (e.g. the source's checksum) and the file's digest, written
    after the file, so the stamp marks it complete (:func:`stamp_matches`)."""
    atomic_write_text(stamp, " ".join([*tag.split(), content_hash([path])]) + "\n")


def stamp_matches(path: Path, stamp: Path, tag: str = "") -> bool:
    """True when ``path`` is complete and unchanged since :func:`write_stamp` (same ``tag``);
    False for a file cut, edited, or never stamped: the caller rebuilds it."""
    return path.is_file() and stamp.is_file() and stamp.read_text().split() == [*tag.split(), content_hash([path])]


MANIFEST = "dmoe_manifest.json"


def write_manifest(directory: Path) -> None:
    """``dmoe_manifest.json``: size and digest of each top-level file of ``directory``."""
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.name != MANIFEST and not p.name.startswith("."))
    entries = {p.name: {"size": p.stat().st_size, "digest": content_hash([p])} for p in files}
    atomic_write_text(directory / MANIFEST, json.dumps({"version": 1, "files": entries}, indent=1, sort_keys=True) + "\n")


def verify_manifest(directory: Path, error: type[DmoeError] = DmoeError, *, names: Sequence[str] | None = None,
                    fix: str = "") -> bool:
    """Check files against the manifest written with them (all, or ``names``): size first, then
    digest (memoised on size and mtime, so a file is hashed once per change). Returns False
    where there is no manifest (a directory made before dmoe wrote them, or by hand); raises
    ``error`` naming the file when one is missing, cut or changed. ``fix`` ends the message."""
    m = directory / MANIFEST
    if not m.is_file():
        return False
    data = read_json_file(m, error, what="manifest")
    files = data.get("files")
    if not isinstance(files, dict):
        raise error(f"{m}: no 'files' mapping; the manifest was damaged. {fix}".strip())
    for name, want in files.items():
        if names is not None and name not in names:
            continue
        p = directory / name
        if not isinstance(want, dict):
            raise error(f"{m}: entry {name!r} is not a mapping; the manifest was damaged. {fix}".strip())
        if not p.is_file():
            raise error(f"{p} is missing (the manifest lists it). {fix}".strip())
        size = p.stat().st_size
        if size != want.get("size"):
            raise error(f"{p} has {size} bytes, not the {want.get('size')} written: it was cut or changed. {fix}".strip())
        if content_hash([p]) != want.get("digest"):
            raise error(f"{p} does not match the digest written with it: it was changed after dmoe wrote it. {fix}".strip())
    return True


def _sha256_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def content_hash(files: list[Path]) -> str:
    """SHA-256 over ``files`` (names and bytes), memoised on (path, size, mtime) under
    ``$DMOE_HOME/hashes.json``, so a multi-GB base is hashed once."""
    key = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    cache_file = dmoe_home() / "hashes.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    digest = _sha256_files(files)
    cache[key] = digest
    try:
        atomic_write_text(cache_file, json.dumps(cache))
    except OSError:
        pass  # a read-only cache only costs a re-hash next time
    return digest


def read_jsonl(path: str | os.PathLike, error: type[DmoeError] = DmoeError, *,
               what: str = "file", torn_tail_ok: bool = False) -> list[tuple[int, Any]]:
    """``(line_number, value)`` for each non-blank line of a JSONL file, line numbers
    1-based as editors show them, so callers can name the line of a bad row.

    A missing file or a line that is not JSON raises ``error`` naming the file and line.
    ``torn_tail_ok``: stop quietly at the first bad line instead (a log whose last line
    was cut by a ``kill -9``; everything after a torn line is dropped too).
    """
    p = Path(path)
    return parse_jsonl(read_text_file(p, error, what=what), p, error, torn_tail_ok=torn_tail_ok)


def read_text_file(path: Path, error: type[DmoeError] = DmoeError, *, what: str = "file") -> str:
    """A UTF-8 text file, or ``error`` saying it is missing, not a file, or not text."""
    if not path.is_file():
        raise error(f"{what} {path} not found" if not path.exists() else f"{what} {path} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def read_json_file(path: Path, error: type[DmoeError] = DmoeError, *, what: str = "file", mapping: bool = True) -> Any:
    """A JSON file's value (an object when ``mapping``), or ``error`` naming the file and the fault."""
    def parse(text: str) -> Any:
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise error(f"{path}: not valid JSON at line {exc.lineno} ({exc.msg})") from None

    return _read_structured(path, error, what, mapping, "JSON", parse)


def read_yaml_file(path: Path, error: type[DmoeError] = DmoeError, *, what: str = "file", mapping: bool = True) -> Any:
    """A YAML file's value (safe_load; a mapping when ``mapping``, an empty file giving {}),
    or ``error`` naming the file and the fault."""
    import yaml

    def parse(text: str) -> Any:
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise error(f"{path}: not valid YAML: {' '.join(str(exc).split())[:300]}") from None
        return {} if value is None and mapping else value

    return _read_structured(path, error, what, mapping, "YAML", parse)


def _read_structured(path: Path, error: type[DmoeError], what: str, mapping: bool, kind: str, parse) -> Any:
    try:
        value = parse(read_text_file(path, error, what=what))
    except RecursionError:
        raise error(f"{path}: {kind} nested too deeply") from None
    if mapping and not isinstance(value, dict):
        raise error(f"{path}: expected a mapping of key: value, got {type(value).__name__}")
    return value


def parse_jsonl(text: str, p: Path, error: type[DmoeError] = DmoeError, *,
                torn_tail_ok: bool = False) -> list[tuple[int, Any]]:
    """:func:`read_jsonl` on text already read from ``p`` (named in the errors)."""
    rows: list[tuple[int, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((n, json.loads(line)))
        except json.JSONDecodeError as exc:
            if torn_tail_ok:
                break
            raise error(f"{p}:{n}: line {n} is not valid JSON ({exc.msg})") from None
    return rows


def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags from /proc/cpuinfo, or None where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((frozenset(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), None)
    except OSError:
        return None


def cpu_has_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX), so bf16 is a speed-up.
    Read from /proc/cpuinfo's flags where there is one (a llama.cpp server runs without torch),
    else asked of torch (tests/test_io.py holds the two to the same answer)."""
    flags = cpu_flags()
    if flags is not None:
        return bool(flags & {"avx512_bf16", "amx_tile"})
    import torch  # heavy: only where the kernel gives no flags

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


TRIM_HEAP = os.environ.get("DMOE_TRIM_HEAP", "1") != "0"  # 0: keep the freed heap (the benchmarks' baseline)


def release_freed_memory() -> bool:
    """Give freed heap pages back to the operating system (glibc's ``malloc_trim``): loading a
    base through transformers frees about 150 MB that glibc otherwise keeps in the process's
    RSS. True when it ran; a no-op where there is no glibc (or with DMOE_TRIM_HEAP=0)."""
    if not TRIM_HEAP:
        return False
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


# --------------------------------------------------------------- OpenMP threads of a server
# torch's CPU kernels run on OpenMP (libgomp in the PyPI wheels), and every thread that enters
# a parallel region gets its own team of worker threads. Once a process holds more of those
# threads than CPUs, libgomp stops spinning between parallel regions (its "throttled" spin
# count) and every region ends with a sleep and a futex wake-up: a server that loads the model
# on its main thread and decodes on the engine thread made about 49,000 voluntary context
# switches per 64-step run and decoded 35-50% slower than the same engine on the main thread
# (bench/thread_decode.py). So: the loading thread gives its team back once loading is done
# (``release_openmp_pool``), and threads that only do side work (routing, adapter loads) run
# their torch ops on one thread (``serial_openmp``), so the engine thread's team is the only one.
OMP_POOL = os.environ.get("DMOE_OMP_POOL_RELEASE", "1") != "0"  # 0: keep every team (the baseline)


_GOMP: list[Any] = []  # torch's libgomp once found (not before torch is loaded: then None, looked up again)


def _libgomp() -> Any | None:
    """The libgomp torch loaded in this process (wheels bundle their own copies: sentencepiece's
    is another library with its own threads), or None."""
    if _GOMP:
        return _GOMP[0]
    path = torch_libgomp_path()
    if path is None:
        return None
    try:
        _GOMP.append(ctypes.CDLL(path))
    except OSError:
        return None
    return _GOMP[0]


def torch_libgomp_path() -> str | None:
    """The file of the libgomp torch loaded in this process, or None (torch not loaded, or
    built without OpenMP)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line and "/" in line}
    except OSError:
        return None
    found = sorted(p for p in paths if "/torch/lib/" in p)
    return found[0] if found else None


def release_openmp_pool() -> bool:
    """Free the calling thread's OpenMP worker threads (``omp_pause_resource_all(omp_pause_hard)``;
    libgomp frees only the caller's pool). Call it on the thread that loaded the model, once it
    will not run torch work again. True when it ran."""
    gomp = _libgomp() if OMP_POOL else None
    if gomp is None or not hasattr(gomp, "omp_pause_resource_all"):
        return False
    return gomp.omp_pause_resource_all(2) == 0  # omp_pause_hard


def serial_openmp() -> bool:
    """Run the calling thread's own torch CPU ops on one thread (its OpenMP ``nthreads-var``), so
    it never starts a team of its own. For threads that do side work next to the engine."""
    gomp = _libgomp() if OMP_POOL else None
    if gomp is None:
        return False
    gomp.omp_set_num_threads(1)
    return True


def serially(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` after ``serial_openmp()``: for ``asyncio.to_thread`` side work."""
    serial_openmp()
    return fn(*args, **kwargs)


# ---------------------------------------------------------------------- work kept out of a lean process
ISOLATED_ERROR = "dmoe-isolated-error: "
ISOLATED_TIMEOUT_S = 1800  # a conversion takes seconds to a minute; a hung child never blocks a start for good


def without_torch_here(target: str, *args: str, error: type[DmoeError]) -> None:
    """Run ``"module:function"(*args)`` in a child interpreter when this process has not imported
    torch, else here. For one-time conversions that need torch (reading PEFT's tensors,
    transformers' GGUF tokenizer reader) inside a process that otherwise runs without it (the
    llama.cpp engine's server): torch would stay in its RSS, about 210 MB, until a restart. A
    DmoeError the function raises comes back as ``error`` with its message."""
    import importlib
    import subprocess
    import sys

    module, func = target.split(":")
    if "torch" in sys.modules:
        getattr(importlib.import_module(module), func)(*args)
        return
    code = ("import sys\nfrom dmoe.io import _isolated_main\n_isolated_main(sys.argv[1], sys.argv[2:])")
    try:
        r = subprocess.run([sys.executable, "-c", code, target, *args], capture_output=True, text=True, timeout=ISOLATED_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise error(f"{func} did not finish in {ISOLATED_TIMEOUT_S} s in a child process") from None
    if r.returncode != 0:
        said = [line.removeprefix(ISOLATED_ERROR) for line in r.stderr.splitlines() if line.startswith(ISOLATED_ERROR)]
        raise error(said[-1] if said else f"{func} failed in a child process: {r.stderr.strip()[-800:]}")


def _isolated_main(target: str, args: list[str]) -> None:
    import importlib
    import sys

    module, func = target.split(":")
    try:
        getattr(importlib.import_module(module), func)(*args)
    except DmoeError as exc:
        print(ISOLATED_ERROR + str(exc).replace("\n", " "), file=sys.stderr)
        sys.exit(3)
