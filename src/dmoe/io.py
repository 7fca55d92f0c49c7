"""Generic file I/O: atomic writes, content hashes, the cache root, JSONL, CPU features.

Every file dmoe writes goes through :func:`atomic_write_text`, :func:`atomic_write_bytes`
or :func:`atomic_dir`: a reader (or a crash) sees the old content or the new one,
never half of it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dmoe.errors import DmoeError


def dmoe_home() -> Path:
    """The cache root: ``$DMOE_HOME`` or ``~/.cache/dmoe``."""
    return Path(os.environ.get("DMOE_HOME") or Path.home() / ".cache" / "dmoe")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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


@contextmanager
def atomic_dir(target: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Build a directory in a hidden temp folder beside ``target``; rename it into place
    when the block ends without an error, else remove it.

        with atomic_dir(out) as tmp:
            (tmp / "model.safetensors").write_bytes(...)

    ``replace=False``: if ``target`` appeared meanwhile (another process won the race),
    the new copy is dropped and the existing one kept. ``replace=True``: an existing
    ``target`` is swapped out (renamed aside, then removed) after the new one is complete.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    tmp.chmod(0o755)
    try:
        yield tmp
        if replace and target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, target)
            except OSError:
                if not target.is_dir():  # not a lost race: a real failure
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


def cpu_has_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AVX512-BF16 or AMX), so bf16 is a speed-up."""
    import torch  # heavy: only callers that choose a dtype pay for it

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
