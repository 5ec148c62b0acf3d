"""Committed generated code must match the .proto sources (make protos regenerates it)."""

from __future__ import annotations

import shutil
from pathlib import Path

from scripts.gen_protos import PROTO_ROOT, stale_files


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    stale = stale_files(PROTO_ROOT, tmp_path / "fresh")
    assert stale == [], f"generated protobuf code is stale: {stale}; run `make protos`"


def test_stale_generated_code_is_detected(tmp_path: Path) -> None:
    copy = tmp_path / "protos"
    shutil.copytree(PROTO_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    proto = copy / "edgefleet" / "v1" / "common.proto"
    proto.write_text(proto.read_text() + "\nmessage AddedLater { string x = 1; }\n")
    assert stale_files(copy, tmp_path / "fresh") == [
        "common_pb2.py",
        "common_pb2.pyi",
    ]


def test_missing_generated_file_is_detected(tmp_path: Path) -> None:
    copy = tmp_path / "protos"
    shutil.copytree(PROTO_ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "edgefleet" / "v1" / "admin_pb2_grpc.py").unlink()
    assert stale_files(copy, tmp_path / "fresh") == ["admin_pb2_grpc.py"]
