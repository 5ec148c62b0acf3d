"""What machine a benchmark ran on: CPU model, the flags that matter to us, cores, memory."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

INTERESTING_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni",
                     "amx_tile", "amx_int8", "amx_bf16", "sha_ni", "aes")


def machine_info() -> dict[str, Any]:
    model, flags = "", set[str]()
    cores: set[tuple[str, str]] = set()  # (physical id, core id): physical cores
    package = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
            elif key == "physical id":
                package = value.strip()
            elif key == "core id":
                cores.add((package, value.strip()))
    except OSError:
        pass
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        memory = 0
    return {
        "cpu_model": model or platform.processor(),
        "cpu_flags": {f: f in flags for f in INTERESTING_FLAGS},
        "cores": os.cpu_count(),  # logical CPUs
        "physical_cores": len(cores) or None,
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_bytes": memory,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
