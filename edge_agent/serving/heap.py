"""Give the heap that loading left behind back to the operating system.

Loading a model reads its file, parses it and builds a session: ONNX Runtime keeps the
session, and glibc's malloc keeps the freed parse buffers (megabytes for a 1.1M-parameter
model) mapped in the process unless asked to return them. ``trim`` asks (``malloc_trim(0)``)
after each model swap, which is rare and takes about a millisecond; on a C library without it
(musl, macOS) it does nothing. Measured by ``make bench`` ("resident memory, one 1.1M-param
model loaded") and docs/serving.md, "Agent footprint".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable

__all__ = ["trim"]

log = logging.getLogger(__name__)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim: Callable[[int], int] = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


def trim() -> bool:
    """Return freed heap to the OS where the C library can; whether it could."""
    call = _malloc_trim()
    if call is None:
        return False
    call(0)
    return True
