"""`trainer`: run the whole pipeline, or one step of it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fleetcore.cli import print_json, run_main
from trainer.config import Pipeline
from trainer.pipeline import STEPS, Run, Workdir

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainer",
        description="Edgefleet trainer: ingest, train, evaluate, compress, export, profile, "
                    "bundle (signed). Steps are cached by the hash of their inputs.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", *STEPS):
        s = sub.add_parser(name, help="every step, then report.json" if name == "run"
                           else f"only the {name} step (its inputs must exist)")
        s.add_argument("pipeline", type=Path, help="PIPELINE.toml")
        s.add_argument("--workdir", required=True, type=Path)
        s.add_argument("--publisher-key", type=Path,
                       help="publisher private key (PEM); else [bundle] publisher_key or "
                            "$EDGEFLEET_PUBLISHER_KEY")
        s.add_argument("--json", action="store_true", help="print the report as JSON (run)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def body() -> int:
        pipeline = Pipeline.load(args.pipeline)
        args.workdir.mkdir(parents=True, exist_ok=True)
        run = Run(pipeline, Workdir(args.workdir.resolve()), publisher_key=args.publisher_key)
        if args.command != "run":
            try:
                run.run_step(args.command)
            finally:
                run.close()
            return 0
        report = run.run_all()
        if args.json:
            print_json(report)
        else:
            m, s, lat = report["metrics"], report["sizes"], report["latency_us"]
            print(f"snapshot    {report['dataset']['snapshot']}")
            print(f"accuracy    fp32 {m['fp32']['accuracy']:.4f}  compressed "
                  f"{m['compressed']['accuracy']:.4f}  (drop {m['accuracy_drop_points']:.2f} "
                  "points)")
            print(f"size        fp32 {s['onnx_fp32']:,} B  compressed {s['onnx_compressed']:,} B"
                  f"  ({s['ratio']:.3f}x)")
            print(f"latency     batch64 {lat['fp32']['batch64']:.0f} -> "
                  f"{lat['compressed']['batch64']:.0f} us ({lat['ratio_batch64']:.3f}x)")
            print(f"bundle      {report['bundle']['path']}")
            print(f"report      {run.workdir.report}")
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
