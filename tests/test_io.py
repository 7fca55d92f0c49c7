"""dmoe.io: atomic writes leave the old content or the new, never half; one JSONL reader
that names the file and line."""

from __future__ import annotations

import json
import os

import pytest

from dmoe.errors import DmoeError
from dmoe.io import atomic_dir, atomic_write_bytes, atomic_write_text, read_jsonl


class Boom(RuntimeError):
    pass


def test_atomic_write_replaces_whole_and_leaves_no_temp_files(tmp_path):
    f = tmp_path / "sub" / "a.txt"
    atomic_write_text(f, "old")
    atomic_write_bytes(f, b"new")
    assert f.read_bytes() == b"new"
    assert sorted(p.name for p in f.parent.iterdir()) == ["a.txt"]


def test_atomic_dir_renames_on_success_and_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(Boom):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise Boom()
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        (tmp / "model.bin").write_bytes(b"1")
    assert (target / "model.bin").read_bytes() == b"1"
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "model.bin").write_bytes(b"2")
    assert (target / "model.bin").read_bytes() == b"2" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with atomic_dir(target) as tmp:  # replace=False and the target exists (a lost race): the existing copy stays
        (tmp / "model.bin").write_bytes(b"3")
    assert (target / "model.bin").read_bytes() == b"2" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_read_jsonl_names_the_line_editors_show(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text(json.dumps({"a": 1}) + "\n\n" + json.dumps({"a": 2}) + "\n{broken\n")
    with pytest.raises(DmoeError, match=r"rows.jsonl:4: line 4 is not valid JSON"):
        read_jsonl(f)
    assert read_jsonl(f, torn_tail_ok=True) == [(1, {"a": 1}), (3, {"a": 2})]
    with pytest.raises(DmoeError, match="questions file .* not found"):
        read_jsonl(tmp_path / "nope.jsonl", what="questions file")
    with pytest.raises(DmoeError, match="is not a file"):
        read_jsonl(tmp_path)
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DmoeError, match="not UTF-8"):
        read_jsonl(tmp_path / "bin.jsonl")


def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_replacing_a_directory_swaps_it_in_one_step_and_keeps_what_the_block_did_not_write(tmp_path, monkeypatch):
    import dmoe.io as dio

    target = tmp_path / "expert"
    with atomic_dir(target, manifest=True) as tmp:
        (tmp / "weights").write_text("old")
        (tmp / "log").write_text("kept")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("kept too")
    swaps = []
    real = dio._exchange
    monkeypatch.setattr(dio, "_exchange", lambda a, b: swaps.append(real(a, b)) or swaps[-1])
    with atomic_dir(target, replace=True, carry_over=True, manifest=True) as tmp:
        (tmp / "weights").write_text("new")
    assert swaps == [True]  # renameat2(RENAME_EXCHANGE): no moment without the folder
    assert (target / "weights").read_text() == "new" and (target / "log").read_text() == "kept"
    assert (target / "sub" / "x").read_text() == "kept too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expert"]
    assert dio.verify_manifest(target)


def test_a_swap_killed_between_its_renames_is_repaired_by_the_next_writer(tmp_path):
    """Where the exchange is not available, the swap is two renames; a kill between them
    leaves the old folder aside under the dead writer's id, and the next writer puts it back."""
    from dmoe.io import clean_stale

    target = tmp_path / "router"
    aside = tmp_path / f".router.{_dead_pid()}.old.tmp"
    aside.mkdir()
    (aside / "router.json").write_text("{}")
    half = tmp_path / f".router.{_dead_pid()}.abc.tmp"  # the new one, half built
    half.mkdir()
    clean_stale(target)
    assert (target / "router.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["router"]
    live = tmp_path / f".router.{os.getpid()}.def.tmp"  # a live writer's temp folder is left alone
    live.mkdir()
    clean_stale(target)
    assert live.is_dir()


def test_verify_manifest_names_the_damaged_file(tmp_path):
    from dmoe.io import verify_manifest, write_manifest

    (tmp_path / "a.bin").write_bytes(b"abc" * 100)
    assert not verify_manifest(tmp_path)  # none written: nothing to check (a folder made by hand)
    write_manifest(tmp_path)
    assert verify_manifest(tmp_path)
    (tmp_path / "a.bin").write_bytes(b"abd" * 100)
    with pytest.raises(DmoeError, match=r"a.bin does not match the digest written with it: .*\. Fix it\."):
        verify_manifest(tmp_path, fix="Fix it.")
    (tmp_path / "a.bin").write_bytes(b"ab")
    with pytest.raises(DmoeError, match="a.bin has 2 bytes, not the 300 written"):
        verify_manifest(tmp_path)
    (tmp_path / "a.bin").unlink()
    with pytest.raises(DmoeError, match="a.bin is missing"):
        verify_manifest(tmp_path)


def test_file_lock_lets_one_holder_in_at_a_time(tmp_path):
    import threading

    from dmoe.io import file_lock

    lock = tmp_path / ".x.lock"
    order = []

    def second():
        with file_lock(lock):
            order.append("second")

    with file_lock(lock):
        t = threading.Thread(target=second)
        t.start()
        t.join(0.5)  # bounded: the second holder must still be waiting
        assert t.is_alive() and order == []
        order.append("first")
    t.join(30)
    assert not t.is_alive() and order == ["first", "second"]


def test_release_freed_memory_gives_a_fragmented_heap_back(monkeypatch):
    """Freed heap pages under a live block stay in the RSS until ``malloc_trim``: the server
    calls it after loading (the HF model it was built from is freed by then)."""
    import ctypes
    import sys

    from dmoe import io

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc_trim")
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def fragment() -> int:
        blocks = [libc.malloc(8192) for _ in range(12_000)]  # ~94 MB on the heap (under the mmap threshold)
        for b in blocks:
            ctypes.memset(b, 1, 8192)
        for b in blocks[:-1]:  # the last one pins the heap's top: glibc cannot trim it on free
            libc.free(b)
        return blocks[-1]

    monkeypatch.setattr(io, "TRIM_HEAP", False)
    pin = fragment()
    before = rss_mb()
    assert io.release_freed_memory() is False and rss_mb() > before - 20
    monkeypatch.setattr(io, "TRIM_HEAP", True)
    assert io.release_freed_memory() is True
    assert rss_mb() < before - 60, (before, rss_mb())
    libc.free(pin)


def test_the_loading_threads_openmp_pool_is_freed_and_side_threads_start_none():
    """io.release_openmp_pool frees the calling thread's OpenMP workers (the loading thread's, so
    the engine thread's team is the only one and libgomp keeps spinning instead of sleeping), and
    a thread after io.serial_openmp runs torch work without starting a team of its own."""
    import subprocess
    import sys

    code = """
import os, threading, torch
from dmoe import io
def tasks(): return len(os.listdir('/proc/self/task'))
x = torch.randn(4_000_000)
n0 = tasks(); x.exp(); n1 = tasks()
freed = io.release_openmp_pool(); n2 = tasks()
grew = []
def side():
    io.serial_openmp(); a = tasks(); x.exp(); grew.append(tasks() - a)
t = threading.Thread(target=side); t.start(); t.join()
again = []
def engine():
    a = tasks(); x.exp(); again.append(tasks() - a)
t = threading.Thread(target=engine); t.start(); t.join()
print(torch.get_num_threads(), n1 - n0, freed, n1 - n2, grew[0], again[0])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    threads, started, freed, gone, side, engine = int(out[0]), int(out[1]), out[2], int(out[3]), int(out[4]), int(out[5])
    if threads < 2:
        pytest.skip("one OpenMP thread here: no worker pools to free")
    assert started == threads - 1 and freed == "True" and gone == started  # the loading thread's workers are gone
    assert side == 0  # a side thread's torch work started no team
    assert engine == threads - 1  # a thread that does not opt out still gets its full team (the engine's)


def test_cpu_has_bf16_reads_the_flags_torch_reads():
    import torch

    from dmoe.io import cpu_has_bf16

    assert cpu_has_bf16() == bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
