"""`trainer`: the training pipeline's entry point (its steps arrive with the trainer issue)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="trainer",
        description="Edgefleet trainer: ingest, train, compress, export, bundle and sign.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a pipeline (PIPELINE.toml)")
    run.add_argument("pipeline")
    run.add_argument("--workdir", required=True)
    args = p.parse_args(argv)
    print(f"error: `trainer {args.command}` is not implemented yet", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
