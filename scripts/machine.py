"""What machine a benchmark ran on: CPU model, the flags that matter to us, cores, memory."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8",
                     "sha_ni", "aes")


def machine_info() -> dict[str, Any]:
    model, flags = "", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 0
    return {
        "cpu_model": model or platform.processor(),
        "cpu_flags": {f: f in flags for f in INTERESTING_FLAGS},
        "cores": os.cpu_count(),
        "memory_bytes": memory,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
