"""C++ kernels for MindSpore's CPU "aot" ``Custom`` ops (``dwconv.cc``, ``groupnorm.cc``, ``activations.cc``,
``sumsq.cc``, ``update.cc``, ``maxpool.cc``, ``batchnorm.cc``, ``denseconv.cc``): compiled with g++ at first use
into a cache directory, one library per source content and flags, so an edited source is rebuilt."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

CXXFLAGS = ("-O3", "-fopenmp-simd", "-pthread", "-shared", "-fPIC", "-std=c++17")


def cache_dir() -> Path:
    """``$MSDET_CACHE`` or ``$XDG_CACHE_HOME/msdet`` (default ``~/.cache/msdet``)."""
    if os.environ.get("MSDET_CACHE"):
        return Path(os.environ["MSDET_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "msdet"


def local_includes(source: Path) -> list[Path]:
    """The headers next to ``source`` that it includes with quotes (``#include "parallel.h"``): part of its code."""
    names = re.findall(r'^\s*#include\s+"([^"]+)"', source.read_text(), flags=re.MULTILINE)
    return [source.with_name(n) for n in names]


def build_library(source: Path, directory: Path | None = None, flags: tuple[str, ...] = ()) -> Path:
    """Compile ``source`` (``CXXFLAGS`` + ``flags``) into ``directory`` once per content: the file name holds a hash
    of source, its local headers and flags, so an edited source or header gets a new library; written to a temporary
    name and renamed (atomic for readers)."""
    code = b"".join(p.read_bytes() for p in (source, *local_includes(source)))
    cxxflags = (*CXXFLAGS, *flags)
    digest = hashlib.sha256(code + " ".join(cxxflags).encode()).hexdigest()[:16]
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


def load(source: Path, fallback: str, flags: tuple[str, ...] = ()) -> Path | None:
    """The built library of ``source``, or None after a one-line warning that ``fallback`` is used instead
    (no g++, or the build failed)."""
    if shutil.which("g++") is None:
        warnings.warn(f"g++ not found: {fallback}", stacklevel=4)
        return None
    try:
        return build_library(source, flags=flags)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or str(exc)
        warnings.warn(f"building {source.name} failed, {fallback}: {detail.strip()}", stacklevel=4)
        return None


class Kernel:
    """The switch of one kernel library for networks built from now on: ``enable(True)`` builds it (cached) or,
    without g++ or when the build fails, stays off after a warning that ``fallback`` is used. ``flags`` are
    compiler options this source needs on top of ``CXXFLAGS``."""

    def __init__(self, source: Path, fallback: str, flags: tuple[str, ...] = ()) -> None:
        self.source, self.fallback, self.flags = source, fallback, flags
        self.library: Path | None = None
        self.on = False

    def enable(self, on: bool) -> bool:
        """Switch on or off; returns whether it is on."""
        if on and self.library is None:
            self.library = load(self.source, self.fallback, self.flags)
            on = self.library is not None
        self.on = bool(on)
        return self.on
