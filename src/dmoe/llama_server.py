"""The real llama-server (llama.cpp's HTTP server), found or built once: for the conformance
tests against it and for benchmarks. dmoe never needs it to serve.

    dmoe llama-server build          # once: minutes on 2 cores, then cached
    dmoe llama-server path           # where it is

It is found, in this order: an explicit path (``--llama-server``), ``$DMOE_LLAMA_SERVER``, or
the cached build under ``$DMOE_HOME/llama-server/``. The build uses the llama.cpp that the
installed ``llama-cpp-python`` vendors (its PyPI sdist), so the llama.cpp engine and
llama-server run one llama.cpp. Only the server target is built, on every core, with the web
UI off: nothing is fetched but the sdist from PyPI.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from dmoe.errors import DmoeError
from dmoe.io import atomic_dir, dmoe_home

ENV = "DMOE_LLAMA_SERVER"
SOURCE_PACKAGE = "llama-cpp-python"
CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",  # no UI download at build time
    "-DLLAMA_OPENSSL=OFF",
]

log = logging.getLogger("dmoe.llama_server")


class LlamaServerError(DmoeError):
    """llama-server cannot be found or built."""


def source_version() -> str:
    try:
        return importlib.metadata.version(SOURCE_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise LlamaServerError(f"{SOURCE_PACKAGE} is not installed; its sdist is where llama-server is built from "
                               "(make install, or pass --llama-server PATH)") from None


def cached_path(version: str | None = None) -> Path:
    return dmoe_home() / "llama-server" / f"{SOURCE_PACKAGE}-{version or source_version()}" / "llama-server"


def find_llama_server(explicit: str | os.PathLike | None = None) -> Path | None:
    """The binary to use, or None when there is none yet (an explicit path that is not an
    executable file is an error, never a silent fall-back)."""
    for given, what in ((explicit, "--llama-server"), (os.environ.get(ENV), f"${ENV}")):
        if given:
            p = Path(given)
            if not (p.is_file() and os.access(p, os.X_OK)):
                raise LlamaServerError(f"{what} {p} is not an executable file")
            return p
    try:
        p = cached_path()
    except LlamaServerError:
        return None
    return p if p.is_file() else None


def build_llama_server(jobs: int | None = None, force: bool = False) -> Path:
    """Build llama-server from the installed llama-cpp-python's sdist (cached; a second call
    returns at once). Raises LlamaServerError with the build log's tail on failure."""
    version = source_version()
    target = cached_path(version)
    if target.is_file() and not force:
        return target
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise LlamaServerError(f"building llama-server needs {tool}; install it (Debian: apt-get install cmake g++)")
    jobs = jobs or os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="dmoe-llama-server-") as tmp:
        work = Path(tmp)
        log.info("downloading the %s %s sdist", SOURCE_PACKAGE, version)
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
              f"{SOURCE_PACKAGE}=={version}", "-d", str(work)], "pip download")
        archives = list(work.glob("*.tar.gz"))
        if not archives:
            raise LlamaServerError(f"pip downloaded no sdist of {SOURCE_PACKAGE}=={version}")
        with tarfile.open(archives[0]) as tar:
            tar.extractall(work / "src", filter="data")
        src = next((work / "src").glob("*/vendor/llama.cpp"), None)
        if src is None:
            raise LlamaServerError(f"the {SOURCE_PACKAGE} {version} sdist vendors no llama.cpp")
        build = work / "build"
        log.info("building llama-server with %d jobs (minutes on a small machine)", jobs)
        _run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], "cmake configure")
        _run(["cmake", "--build", str(build), "--target", "llama-server", f"-j{jobs}"], "cmake build")
        binary = build / "bin" / "llama-server"
        if not binary.is_file():
            raise LlamaServerError(f"the build finished without {binary}")
        with atomic_dir(target.parent, replace=True) as out:
            shutil.copy2(binary, out / "llama-server")
            (out / "BUILD.txt").write_text(f"{SOURCE_PACKAGE} {version}, vendored llama.cpp\ncmake {' '.join(CMAKE_FLAGS)}\n")
    return target


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        raise LlamaServerError(f"{what} failed (exit {proc.returncode}):\n" + "\n".join(tail))
