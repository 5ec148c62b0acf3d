"""`trainer`: run the whole pipeline, or one step of it."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import threading
from pathlib import Path

from fleetcore import pki, regions
from fleetcore.cli import print_json, run_main
from fleetcore.errors import AlreadyExistsError, EdgefleetError, NotFoundError
from fleetcore.files import atomic_write, ensure_private_dir
from trainer.bundle import cosign_bundle
from trainer.config import Pipeline
from trainer.ingest.batch import source_key
from trainer.ingest.follow import follow
from trainer.pipeline import STEPS, Run, Workdir
from trainer.store import FeatureStore, RegionNotAllowedError

__all__ = ["main"]

MAX_ERROR_CHARS = 2000  # one readable line, even from a library's long message


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trainer",
        description="Edgefleet trainer: ingest, train, evaluate, compress, export, profile, "
                    "bundle (signed). Steps are cached by the hash of their inputs.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    k = sub.add_parser("keygen", help="create a publisher (model-signing) key pair")
    k.add_argument("--out", required=True, type=Path, help="directory for publisher.key/.pub")
    k.add_argument("--force", action="store_true")
    c = sub.add_parser("cosign", help="add a co-signature by another publisher key to a signed "
                       "bundle (model.sig.N; for a fleet whose root asks for k-of-n publishers)")
    c.add_argument("bundle", type=Path, help="the bundle directory (signed: it has model.sig)")
    c.add_argument("--key", required=True, type=Path, help="publisher private key (PEM)")
    for name in ("run", *STEPS):
        s = sub.add_parser(name, help="every step, then report.json" if name == "run"
                           else f"only the {name} step (its inputs must exist)")
        s.add_argument("pipeline", type=Path, help="PIPELINE.toml")
        s.add_argument("--workdir", required=True, type=Path)
        s.add_argument("--publisher-key", type=Path,
                       help="publisher private key (PEM); else [bundle] publisher_key or "
                            "$EDGEFLEET_PUBLISHER_KEY")
        s.add_argument("--json", action="store_true", help="print the report as JSON (run)")
        s.add_argument("--bundle-version", type=int, metavar="N",
                       help="override [bundle] version (a retraining job's next version)")
        s.add_argument("--samples", type=Path, metavar="FILE",
                       help="labelled samples from devices (a retraining job's samples.json): "
                            "ingested as a snapshot per region and trained on with the base data")
        s.add_argument("--baseline", type=Path, metavar="BUNDLE_DIR",
                       help="the current model's bundle: after the run, compare it with the new "
                            "model on the held-out samples and write acceptance.json")
        s.add_argument("--margin", type=float, default=0.0,
                       help="minimum effect over --baseline: accuracy points (0..1) for "
                            "classification, MAE reduction in the target's units for regression")
        s.add_argument("--alpha", type=_alpha, default=0.05,
                       help="significance of the paired acceptance test (McNemar exact for "
                            "classification, Wilcoxon signed-rank for regression); default 0.05")
        if name == "ingest":
            s.add_argument("--follow", action="store_true",
                           help="consume the pipeline's stream (mqtt://, nats://) until SIGTERM, "
                                "cutting a snapshot every data.snapshot_rows rows or "
                                "data.snapshot_seconds seconds")
    lin = sub.add_parser("lineage", help="the snapshots of the pipeline's source, newest first, "
                                         "with where each came from")
    lin.add_argument("pipeline", type=Path, help="PIPELINE.toml")
    lin.add_argument("--workdir", required=True, type=Path)
    lin.add_argument("--json", action="store_true")
    return p


def _alpha(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not in (0, 1), e.g. 0.05")
    return value


def keygen(out: Path, *, force: bool = False) -> tuple[Path, Path]:
    """Write an ECDSA P-256 publisher key pair; refuse to overwrite one without ``force``."""
    key_path, pub_path = out / "publisher.key", out / "publisher.pub"
    if key_path.exists() and not force:
        raise AlreadyExistsError(f"{key_path} exists; pass --force to replace it")
    ensure_private_dir(out)
    key = pki.generate_key()
    atomic_write(key_path, pki.private_key_pem(key), mode=0o600)
    atomic_write(pub_path, pki.public_key_pem(key))
    return key_path, pub_path


def _store(pipeline: Pipeline, workdir: Path) -> FeatureStore:
    path = Path(pipeline.store.path)
    return FeatureStore(path if path.is_absolute() else workdir.resolve() / path,
                        allowed_regions=pipeline.store.allowed_regions)


def _follow(pipeline: Pipeline, workdir: Path) -> int:
    workdir.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with _store(pipeline, workdir) as store:
        if not regions.allows(store.allowed_regions, pipeline.data.region):
            raise RegionNotAllowedError(
                f"{pipeline.path.name}: data.region = {pipeline.data.region!r} is not allowed by "
                f"the feature store {store.path} (allowed_regions {store.allowed_regions})")
        follow(store, pipeline.data, pipeline.base_dir, stop,
               lambda m: print(m, file=sys.stderr, flush=True))
    return 0


def _lineage(pipeline: Pipeline, workdir: Path, *, as_json: bool) -> int:
    with _store(pipeline, workdir) as store:
        found = store.cursor(source_key(pipeline.data))
        if found is None:
            ingest = workdir / "ingest.json"
            head = Run.read_json(ingest)["snapshot"] if ingest.exists() else None
        else:
            head = found[0]
        if head is None:
            raise NotFoundError(f"no snapshot of {pipeline.path.name}'s source in {store.path} "
                                "yet; run `trainer ingest` first")
        chain = store.chain(head)
    if as_json:
        print_json({"cursor": found[1] if found else None, "snapshots": chain})
        return 0
    for snap in chain:
        origin = snap.get("origin") or {}
        extra = ", ".join(f"{k} {v}" for k, v in origin.items()
                          if k in ("rows_new", "malformed", "watermark", "positions", "files",
                                   "pages", "query_digest", "request_digest") and v is not None)
        print(f"{snap['id']}  {snap['rows']} rows  {snap['ingested_at']}  {snap['source']}"
              f"{'  ' + extra if extra else ''}")
    return 0


def _key_command(args: argparse.Namespace) -> int:
    if args.command == "keygen":
        key, pub = keygen(args.out, force=args.force)
        print(f"private key {key} (0600; keep it in the training environment)")
        print(f"public key  {pub} (give it to the control plane: [pki] publisher_keys, or "
              "`fleet publishers add`)")
        return 0
    if not (args.bundle / "model.sig").is_file():
        raise NotFoundError(f"{args.bundle} is not a signed bundle (no model.sig); "
                            "hint: `trainer run` or `trainer bundle` signs it first")
    print(f"co-signed: {cosign_bundle(args.bundle, args.key)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def body() -> int:
        if args.command in ("keygen", "cosign"):
            return _key_command(args)
        pipeline = Pipeline.load(args.pipeline)
        if args.command == "lineage":
            return _lineage(pipeline, args.workdir, as_json=args.json)
        if args.command == "ingest" and args.follow:
            return _follow(pipeline, args.workdir)
        if args.bundle_version is not None:
            pipeline = dataclasses.replace(
                pipeline, bundle=dataclasses.replace(pipeline.bundle, version=args.bundle_version)
            )
            pipeline.validate()
        args.workdir.mkdir(parents=True, exist_ok=True)
        run = Run(pipeline, Workdir(args.workdir.resolve()), publisher_key=args.publisher_key,
                  samples=args.samples, baseline=args.baseline, margin=args.margin,
                  alpha=args.alpha)
        if args.command != "run":
            try:
                run.preflight([args.command])
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
            if report["task"] == "classification":
                print(f"accuracy    fp32 {m['fp32']['accuracy']:.4f}  compressed "
                      f"{m['compressed']['accuracy']:.4f}  (drop "
                      f"{m['accuracy_drop_points']:.2f} points)")
            else:
                f, c = m["fp32"], m["compressed"]
                print(f"mae         fp32 {f['mae']:.4f}  compressed {c['mae']:.4f}")
                print(f"rmse        fp32 {f['rmse']:.4f}  compressed {c['rmse']:.4f}")
                print(f"r2          fp32 {f['r2']:.4f}  compressed {c['r2']:.4f}")
            print(f"size        fp32 {s['onnx_fp32']:,} B  compressed {s['onnx_compressed']:,} B"
                  f"  ({s['ratio']:.3f}x)")
            print(f"latency     batch64 {lat['fp32']['batch64']:.0f} -> "
                  f"{lat['compressed']['batch64']:.0f} us ({lat['ratio_batch64']:.3f}x)")
            print(f"bundle      {report['bundle']['path']}")
            if "acceptance" in report:
                a = report["acceptance"]
                print(f"acceptance  {'accepted' if a['accepted'] else 'REJECTED'}: "
                      f"{a['summary']} ({a['data']})")
            print(f"report      {run.workdir.report}")
        return 0

    def one_line_errors() -> int:
        # run_main prints "error: MESSAGE"; a message must stay one line (a TOML parser's or
        # an OS error's text may hold newlines).
        try:
            return body()
        except (EdgefleetError, OSError, ValueError) as exc:
            text = " ".join(str(exc).split())
            if len(text) > MAX_ERROR_CHARS:
                text = text[:MAX_ERROR_CHARS] + " ..."
            print(f"error: {text}", file=sys.stderr)
            return 1

    return run_main(one_line_errors)


if __name__ == "__main__":
    sys.exit(main())
