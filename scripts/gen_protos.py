"""Generate the Python modules and .pyi stubs for protos/edgefleet/v1/*.proto.

`make protos` writes them next to the sources; the test suite generates into a temporary
directory and compares, so committed code that no longer matches its .proto fails CI.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent.parent / "protos"
PACKAGE = Path("edgefleet") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(proto_root: Path, out_root: Path) -> dict[str, bytes]:
    """Run protoc on every .proto under proto_root into out_root; return {file name: bytes}."""
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    sources = sorted((proto_root / PACKAGE).glob("*.proto"))
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{include}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(p.relative_to(proto_root)) for p in sources),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return _generated(out_root / PACKAGE)


def _generated(directory: Path) -> dict[str, bytes]:
    return {
        p.name: p.read_bytes()
        for p in sorted(directory.iterdir())
        if p.name.endswith(GENERATED_SUFFIXES)
    }


def stale_files(proto_root: Path, scratch: Path) -> list[str]:
    """Generated files under proto_root that differ from (or are missing in) a fresh run."""
    fresh = generate(proto_root, scratch)
    committed = _generated(proto_root / PACKAGE)
    return sorted(n for n in set(fresh) | set(committed) if fresh.get(n) != committed.get(n))


def main() -> int:
    for name in generate(PROTO_ROOT, PROTO_ROOT):
        print(PROTO_ROOT.name / PACKAGE / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
