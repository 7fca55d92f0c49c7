"""dmoe's CPU kernels for decode steps (``lora_cpu.c``, ``decode_cpu.c``), built once into one
library and called through ctypes.

    kernel = native_kernel()        # the multi-LoRA kernel; None where it cannot be built
    kernel.add_(y, x, A, B, w, off, len)
    glue = native_decode()          # the work between a decode step's matmuls; None likewise

A decode step of 8 rows runs a LoRA at 120 sites (30 layers x q|k|v, o, gate|up, down).
Through torch each site is two oneDNN matmuls and a multiply, about 85 us on this CPU, most
of it per-call overhead and weight packing for a few hundred thousand multiply-adds; the C
kernel does a site in one call and reads only the columns each part owns (the fused B is
block-diagonal). ``lora_ops.lora_add_dense_`` stays the reference it is tested against, and
the path for prefills, CUDA and compiled blocks. Decode steps only, whatever their rows: a
prefill's rows are its whole batch's tokens, so a row-count rule would send the same request's
prefill down one path alone and the other under load, and greedy replies would change with the
load (tests/test_native.py; the cluster's failover test caught it).

The same holds for ``decode_cpu.c`` (``NativeDecode``): the norms, RoPE, cache writes,
attention and SwiGLU of a Llama-family decode step, three calls a layer where torch ran about
fifty small ops (``model.Transformer.forward``; the torch path is its reference,
tests/test_decode_native.py).

The sources are compiled with the system C compiler (``$CC``, else ``cc``) at ``-O3
-march=native`` on first use and cached under ``$DMOE_HOME/native``, keyed by the sources,
the compiler and this CPU's flags, and written atomically. No compiler, or a failed build,
logs one warning and leaves the torch path. ``DMOE_NATIVE_LORA=0`` turns the LoRA kernel off
and ``DMOE_NATIVE_DECODE=0`` the decode-step glue (the baselines in benchmarks).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import TypeVar

import torch

from dmoe.io import cpu_flags, dmoe_home, torch_libgomp_path

log = logging.getLogger("dmoe.engine.native")

HERE = Path(__file__).parent
SOURCES = (HERE / "lora_cpu.c", HERE / "decode_cpu.c")  # compiled together into one library
HEADERS = (HERE / "cpu_common.h",)
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp-simd", "-fPIC", "-shared", "-std=c11"]
_I64 = ctypes.c_int64
_PTR = ctypes.c_void_p


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc)


def openmp_flags() -> list[str]:
    """Link the kernel's OpenMP team to the libgomp torch itself loaded, so the kernel runs on
    torch's own worker threads (a second OpenMP runtime would bring a second pool, the two
    spinning against each other on the same cores). No such libgomp: a serial build."""
    gomp = torch_libgomp_path()
    if gomp is None:
        return []
    d = os.path.dirname(gomp)
    # --as-needed drops the driver's own -lgomp, which torch's file already satisfies
    return ["-fopenmp", f"-L{d}", "-Wl,--as-needed", f"-l:{os.path.basename(gomp)}", f"-Wl,-rpath,{d}"]


def library_path(cc: str) -> Path:
    """Where the build for these sources, compiler, OpenMP runtime and CPU lives."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    parts = [*(f.read_text() for f in SOURCES + HEADERS), cc, version, " ".join(FLAGS + openmp_flags()), " ".join(sorted(cpu_flags() or ())) or os.uname().machine]
    key = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]
    return dmoe_home() / "native" / f"dmoe_cpu-{key}.so"


def build(cc: str, target: Path) -> None:
    """Compile the sources into ``target`` atomically (a temporary file, then a rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, "-o", tmp, *map(str, SOURCES), *openmp_flags(), "-lm"], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise OSError(f"{cc} failed: {proc.stderr.strip()[:500]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Site(ctypes.Structure):
    """A checked slot range of one layer (``NativeLoRA.site``): lora_cpu.c's ``struct lora_site``."""

    _fields_ = [("A", _PTR), ("B", _PTR), ("slots_bf16", _I64), ("n_slots", _I64), ("n_parts", _I64), ("r", _I64),
                ("off", _PTR), ("len", _PTR), ("d_in", _I64), ("d_out", _I64)]


class NativeLoRA:
    """ctypes binding of ``dmoe_lora_add``. ``site`` checks a layer's slot buffers once and keeps
    their addresses; ``run_`` is the per-step call (a few microseconds of Python); ``add_`` is
    both, for one-off calls and tests."""

    def __init__(self, path: Path, threads: int | None = None):
        self.path = path
        self.threads = threads  # the kernel's OpenMP team; None: torch's thread count at each call
        lib = ctypes.CDLL(str(path))
        fn = lib.dmoe_lora_add
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.POINTER(Site), _I64, _PTR, ctypes.c_int, _PTR, ctypes.c_int, _PTR, _I64, ctypes.c_int]
        self._fn = fn

    @staticmethod
    def site(A: torch.Tensor, B: torch.Tensor, off: torch.Tensor, lens: torch.Tensor) -> Site:
        """A slot range's buffers, checked: A (S, P, r, d_in) and B (S, P, r, d_out) contiguous CPU
        tensors of one dtype (bf16 or fp32); off, lens (P,) int64: each part's output columns.
        The caller keeps the tensors alive while the site is used."""
        ok = (torch.bfloat16, torch.float32)
        if (A.dim() != 4 or B.dim() != 4 or A.shape[:3] != B.shape[:3] or A.dtype not in ok or B.dtype != A.dtype
                or A.device.type != "cpu" or B.device.type != "cpu" or not A.is_contiguous() or not B.is_contiguous()):
            raise ValueError(f"native LoRA: slots A{tuple(A.shape)} {A.dtype} B{tuple(B.shape)} {B.dtype} must be "
                             "contiguous CPU (S, P, r, d) buffers of one dtype, bf16 or fp32")
        s, p, r = A.shape[:3]
        for t in (off, lens):
            if t.dtype != torch.int64 or t.device.type != "cpu" or not t.is_contiguous() or t.shape != (p,):
                raise ValueError(f"native LoRA: part offsets and lengths must be ({p},) int64 CPU tensors")
        if int((off + lens).max()) > B.shape[-1] or int(off.min()) < 0 or int(lens.min()) < 0:
            raise ValueError(f"native LoRA: part columns {off.tolist()} + {lens.tolist()} fall outside d_out {B.shape[-1]}")
        return Site(A.data_ptr(), B.data_ptr(), A.dtype == torch.bfloat16, s, p, r, off.data_ptr(), lens.data_ptr(),
                    A.shape[-1], B.shape[-1])

    def run_(self, site: Site, y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``y`` (N, T, d_out) += the deltas of ``x`` (N, T, d_in), both contiguous, in the model's
        dtype; w (N, S) fp32 contiguous: one row per sequence. Checked by the caller (LoRALinear)."""
        n, t = x.shape[0], x.shape[1]
        rc = self._fn(site, n * t, x.data_ptr(), x.dtype == torch.bfloat16, y.data_ptr(), y.dtype == torch.bfloat16,
                      w.data_ptr(), t, self.threads or torch.get_num_threads())
        if rc != 0:
            raise MemoryError("native LoRA: no memory for the kernel's scratch buffers")
        return y

    def add_(self, y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, w: torch.Tensor,
             off: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """``y`` (N, T, d_out) += each row's deltas in place, every input checked (see ``site``)."""
        site = self.site(A, B, off, lens)
        ok = (torch.bfloat16, torch.float32)
        if (x.dim() != 3 or y.dim() != 3 or x.shape[:2] != y.shape[:2] or x.shape[2] != site.d_in or y.shape[2] != site.d_out
                or x.dtype not in ok or y.dtype not in ok or not x.is_contiguous() or not y.is_contiguous()
                or x.device.type != "cpu" or y.device.type != "cpu"):
            raise ValueError(f"native LoRA: x{tuple(x.shape)} y{tuple(y.shape)} must be contiguous CPU (N, T, d) "
                             f"tensors, bf16 or fp32, with d_in {site.d_in} and d_out {site.d_out}")
        if w.dtype != torch.float32 or not w.is_contiguous() or w.shape != (x.shape[0], site.n_slots):
            raise ValueError(f"native LoRA: w{tuple(w.shape)} {w.dtype} must be ({x.shape[0]}, {site.n_slots}) fp32, contiguous")
        return self.run_(site, y, x, w)


class NativeDecode:
    """ctypes binding of ``decode_cpu.c``: the work between a Llama-family decode step's matmuls.
    Arguments are the callers' contiguous CPU tensors, passed by address and not checked here:
    ``model.Transformer._decode_native`` builds them and checks each step's positions and slots
    against the cache first. Every call returns None or raises MemoryError."""

    def __init__(self, path: Path, threads: int | None = None):
        self.path = path
        self.threads = threads  # the attention's OpenMP team; None: torch's thread count at each call
        lib = ctypes.CDLL(str(path))
        self._norm = lib.dmoe_add_rmsnorm
        self._norm.restype = ctypes.c_int
        self._norm.argtypes = [_PTR, _PTR, _PTR, _PTR, _I64, _I64, ctypes.c_float, ctypes.c_int]
        self._silu = lib.dmoe_silu_mul
        self._silu.restype = ctypes.c_int
        self._silu.argtypes = [_PTR, _PTR, _I64, _I64, ctypes.c_int]
        self._attend = lib.dmoe_rope_attend
        self._attend.restype = ctypes.c_int
        self._attend.argtypes = [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64, _I64,
                                 ctypes.c_float, _PTR, ctypes.c_int, ctypes.c_int]

    @staticmethod
    def _ok(rc: int, what: str) -> None:
        if rc != 0:
            raise MemoryError(f"native decode: no memory for {what}'s scratch buffers")

    def add_rmsnorm_(self, x: torch.Tensor, d: torch.Tensor | None, w: torch.Tensor, out: torch.Tensor, eps: float) -> None:
        """x (m, dim) += d (None: no add), in place; out (m, dim) = RMSNorm(x) * w, Llama's order."""
        self._ok(self._norm(x.data_ptr(), None if d is None else d.data_ptr(), w.data_ptr(), out.data_ptr(),
                            x.shape[0], x.shape[-1], eps, x.dtype == torch.bfloat16), "rmsnorm")

    def silu_mul(self, gu: torch.Tensor, out: torch.Tensor) -> None:
        """out (m, hidden) = silu(gate) * up, from gate|up (m, 2 * hidden)."""
        self._ok(self._silu(gu.data_ptr(), out.data_ptr(), out.shape[0], out.shape[-1], out.dtype == torch.bfloat16), "silu")

    def rope_attend(self, qkv: torch.Tensor, shape: tuple[int, int, int], cos: torch.Tensor, sin: torch.Tensor,
                    slot: torch.Tensor, pos: torch.Tensor, k_ptr: int, v_ptr: int, max_seq: int, window: int,
                    scale: float, out: torch.Tensor) -> None:
        """One decode step's attention (``dmoe_rope_attend``): ``shape`` is (nh, nkv, hd); k_ptr,
        v_ptr address this layer's cache (slots, max_seq, nkv, hd) in the activations' dtype."""
        nh, nkv, hd = shape
        self._ok(self._attend(qkv.data_ptr(), out.shape[0], nh, nkv, hd, cos.data_ptr(), sin.data_ptr(), slot.data_ptr(),
                              pos.data_ptr(), k_ptr, v_ptr, max_seq, window, scale, out.data_ptr(),
                              out.dtype == torch.bfloat16, self.threads or torch.get_num_threads()), "attention")


_lock = threading.Lock()
_path: Path | None = None
_tried = False
_bindings: dict[type, "NativeLoRA | NativeDecode"] = {}  # one binding of each class to the library
_B = TypeVar("_B", NativeLoRA, NativeDecode)


def native_library() -> Path | None:
    """The built library, or None (no compiler, a failed build: logged once, the torch path runs)."""
    global _path, _tried
    with _lock:
        if _tried:
            return _path
        _tried = True
        cc = _compiler()
        if cc is None:
            log.warning("no C compiler (%s) found: decode steps run on the torch path, slower; "
                        "install gcc or set CC to build dmoe's native CPU kernels", os.environ.get("CC", "cc"))
            return None
        try:
            path = library_path(cc)
            if not path.exists():
                log.info("building the native CPU kernels with %s -> %s", cc, path)
                build(cc, path)
            ctypes.CDLL(str(path))  # loads: a broken file is found here, once
            _path = path
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("the native CPU kernels could not be built (%s): decode steps run on the torch path", e)
            _path = None
        return _path


def _binding(cls: type[_B], switch: str) -> _B | None:
    """``cls`` bound to the library, once; None when ``switch`` is "0" or there is no library."""
    if os.environ.get(switch, "1") == "0":
        return None
    path = native_library()
    if path is None:
        return None
    with _lock:
        bound = _bindings.get(cls)
        if not isinstance(bound, cls) or bound.path != path:
            bound = cls(path)
            _bindings[cls] = bound
        return bound


def native_kernel() -> NativeLoRA | None:
    """The multi-LoRA kernel, or None (off by ``DMOE_NATIVE_LORA=0``, or no library)."""
    return _binding(NativeLoRA, "DMOE_NATIVE_LORA")


def native_decode() -> NativeDecode | None:
    """The decode-step glue, or None (off by ``DMOE_NATIVE_DECODE=0``, or no library)."""
    return _binding(NativeDecode, "DMOE_NATIVE_DECODE")


def reset_for_tests() -> None:
    """Forget the library and its bindings, so the next lookup builds or finds it again (environment changes in tests)."""
    global _path, _tried
    with _lock:
        _path, _tried = None, False
        _bindings.clear()
