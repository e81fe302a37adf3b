"""Compiling the kernel sources of this package (``*.cc`` next to their ``*.py``) with g++ at first use, into a
cache directory, one library per source content, flags, compiler and instruction set, so an edited source, another
compiler or another CPU gets its own build; and what the host can build.

``MSDET_KERNEL_ISA=avx2`` builds without AVX-512: the sources' AVX-512 copies (GCC ``target_clones``, picked at load
time) are left out and ``-mno-avx512f`` is passed (docs/performance.md, "CPU kernels").
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

CXXFLAGS = ("-O3", "-fopenmp-simd", "-pthread", "-shared", "-fPIC", "-std=c++17")
#: the machines the sources are written for (x86-64 with its instruction-set copies, aarch64 plain C++)
MACHINES = ("x86_64", "amd64", "aarch64", "arm64")
#: ``MSDET_KERNEL_ISA`` values: unset or empty builds every copy the sources have; ``avx2`` leaves out AVX-512
KERNEL_ISAS = ("", "avx2")
#: x86 instruction-set flags of /proc/cpuinfo, best first: the first one present names the host's ISA
X86_ISAS = ("avx512f", "avx2", "avx", "sse4_2", "sse2")


def cache_dir() -> Path:
    """``$MSDET_CACHE`` or ``$XDG_CACHE_HOME/msdet`` (default ``~/.cache/msdet``)."""
    if os.environ.get("MSDET_CACHE"):
        return Path(os.environ["MSDET_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "msdet"


def local_includes(source: Path) -> list[Path]:
    """The headers next to ``source`` that it includes with quotes (``#include "parallel.h"``): part of its code."""
    names = re.findall(r'^\s*#include\s+"([^"]+)"', source.read_text(), flags=re.MULTILINE)
    return [source.with_name(n) for n in names]


def kernel_isa() -> str:
    """``$MSDET_KERNEL_ISA``: "" (every instruction-set copy) or "avx2" (no AVX-512); other values are refused."""
    value = os.environ.get("MSDET_KERNEL_ISA", "").strip().lower()
    if value not in KERNEL_ISAS:
        raise ValueError(f"MSDET_KERNEL_ISA={value!r}: expected one of {', '.join(repr(v) for v in KERNEL_ISAS)}")
    return value


def isa_flags() -> tuple[str, ...]:
    """The compiler options of ``$MSDET_KERNEL_ISA``: without AVX-512, the sources drop that copy
    (``MSDET_NO_AVX512``, isa.h) and g++ may not emit it anywhere else."""
    return ("-DMSDET_NO_AVX512", "-mno-avx512f") if kernel_isa() == "avx2" else ()


def cpu_isa() -> str:
    """The host's instruction set as the kernels see it: on x86 the best of ``X86_ISAS`` in /proc/cpuinfo's flags,
    elsewhere ``platform.machine()``; then ``ONEDNN_MAX_CPU_ISA=...`` (caps the dense conv's oneDNN 3),
    ``DNNL_MAX_CPU_ISA=...`` (MindSpore's oneDNN 2) and ``MSDET_KERNEL_ISA=...`` when set. Part of every library's
    cache key and, through the kernel report, of the resume key."""
    machine = platform.machine().lower()
    isa = machine
    if machine in ("x86_64", "amd64"):
        flags = _cpuinfo_flags()
        isa = next((f for f in X86_ISAS if f in flags), machine)
    parts = [isa]
    for cap in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        if os.environ.get(cap):
            parts.append(f"{cap}={os.environ[cap]}")
    if kernel_isa():
        parts.append(f"MSDET_KERNEL_ISA={kernel_isa()}")
    return " ".join(parts)


def _cpuinfo_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:\s*(.*)$", text, flags=re.MULTILINE)
    return set(match.group(1).split()) if match else set()


@functools.cache
def _compiler_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], check=True, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.splitlines()[0].strip() if out else ""


def compiler() -> str:
    """The first line of ``g++ --version``, "" without g++. Part of every library's cache key."""
    path = shutil.which("g++")
    return _compiler_version(path) if path else ""


def unsupported_host() -> str | None:
    """Why this host builds no kernel at all (one phrase), or None: no g++, or a machine the sources are not
    written for."""
    if shutil.which("g++") is None:
        return "g++ not found"
    if platform.machine().lower() not in MACHINES:
        return f"machine {platform.machine()} is not x86-64 or aarch64"
    return None


def build_library(source: Path, directory: Path | None = None, flags: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` (``CXXFLAGS`` + ``$MSDET_KERNEL_ISA``'s + ``flags``) into ``directory`` once per
    content: the file name holds a hash of source, its local headers, flags, compiler version and ISA
    (:func:`cpu_isa`), so an edited source or header, another g++ or another CPU gets a new library; written to
    a temporary name and renamed (atomic for readers)."""
    code = b"".join(p.read_bytes() for p in (source, *local_includes(source)))
    cxxflags = (*CXXFLAGS, *isa_flags(), *flags)
    key = "\0".join((" ".join(cxxflags), compiler(), cpu_isa()))
    digest = hashlib.sha256(code + key.encode()).hexdigest()[:16]
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / f"{source.stem}-{digest}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)
    os.close(fd)
    try:
        subprocess.run(["g++", *cxxflags, "-o", tmp, str(source)], check=True, capture_output=True, text=True)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return target
