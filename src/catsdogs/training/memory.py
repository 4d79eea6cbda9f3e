"""The C library's memory policy while training: keep freed memory for reuse (glibc only)."""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_GLIBC_DEFAULT_THRESHOLD = 128 * 1024


def _glibc() -> Any | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def freed_memory_kept() -> Iterator[bool]:
    """While open, glibc's malloc keeps freed memory for reuse instead of handing it back.

    By default a large tensor is mmap-ed and unmapped when freed, so every forward and backward
    pass page-faults its activations in again: on this 2-core machine that kernel time made a Lite2
    forward pass 3.8× slower (README, "Training"). On exit the defaults come back and the kept
    memory is returned, so what runs next (export, evaluation) does not add its peak to training's.
    Yields False, changing nothing, where the C library is not glibc.
    """
    libc = _glibc()
    largest = ctypes.c_int(2**31 - 1)
    kept = libc is not None and all(libc.mallopt(p, largest) for p in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD))
    try:
        yield kept
    finally:
        if libc is not None:
            for parameter in (_M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD):
                libc.mallopt(parameter, ctypes.c_int(_GLIBC_DEFAULT_THRESHOLD))
            libc.malloc_trim(0)
